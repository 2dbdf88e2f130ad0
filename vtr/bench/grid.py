"""Measuring a grid of configurations on one model and one input batch: the dense model, each method at each
budget, and each method's ideal, interleaved. The ideal is stage-correct (``ideal.LayeredIdeal``): each stage of
the method bounded where it acts, the unpatched model fed a pre-LLM stage's kept tokens, layers >= K run on a
layer stage's kept tokens and the layers before on what the earlier stages left."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

import vtr

from ..methods import lookup
from . import cli
from .timing import Clock, PeakMemory, StageTimer, kv_cache_bytes, llm_prefill_flops, median


@dataclass
class Config:
    """One row of the grid: the dense model, a method at a budget, or that method's ideal."""

    kind: str  # "dense" | "method" | "ideal"
    method: str | None = None
    budget: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        settings = ",".join(f"{k}={v}" for k, v in {**self.budget, **self.options}.items())
        return f"{self.method}[{settings}]" + (" ideal" if self.kind == "ideal" else "")


@dataclass
class Sample:
    ttft: float
    vision: float
    llm: float
    selection: float
    decode_step: float | None
    peak_memory: int
    kv_cache: int
    layer_lengths: list[int]
    batch: int
    n_visual: list[int]
    n_kept: list[int]
    stages: list[dict]
    ttft_cpu: float | None = None  # process CPU time of the prefill (None on GPU): see timing.Clock
    vision_cpu: float | None = None
    llm_cpu: float | None = None


class Runner:
    """Runs configurations on one model and one input batch."""

    def __init__(self, model, inputs: dict, decode_tokens: int):
        self.model, self.inputs, self.decode_tokens = model, inputs, decode_tokens
        self.clock = Clock(model.device)
        self.timer = StageTimer(model, self.clock)
        self.n_layers = len(model.model.language_model.layers)
        self.lm_inputs: dict | None = None  # what the language model receives in the dense prefill
        # per method label: what its ideal needs (``ideal.LayeredIdeal``'s stages and their kinds)
        self.stages: dict[str, dict] = {}

    def _capture_lm_inputs(self, module, args, kwargs):
        if self.lm_inputs is None:
            self.lm_inputs = {"embeds": kwargs["inputs_embeds"], "mask": kwargs.get("attention_mask"),
                              "positions": kwargs.get("position_ids")}

    def run(self, config: Config) -> Sample:
        if config.kind == "ideal":
            return self._ideal(config)
        handle = vtr.patch(self.model, config.method, **config.budget, **config.options) if config.method else None
        capture = None
        if handle is None and self.lm_inputs is None:
            capture = self.model.model.language_model.register_forward_pre_hook(self._capture_lm_inputs,
                                                                                with_kwargs=True)
        try:
            sample = self._prefill_and_decode(self.inputs, handle)
            if handle is not None:
                specs = handle.method.stages()
                # every stage that removed tokens, where it acts: before the language model (layer 0: pre_llm,
                # vision) or before (inside, post_attention) decoder layer K
                self.stages[config.label] = {
                    "stages": [(s.layer, s.index) for s in handle.last.stages if s.index is not None],
                    "post_attention": [s.layer for s in specs if s.post_attention],
                    "slice_earlier": [s.layer for s in specs if s.slice_earlier],
                    "slice_from": {s.layer: s.slice_from for s in specs if s.slice_earlier}}
            return sample
        finally:
            if capture is not None:
                capture.remove()
            if handle is not None:
                handle.remove()

    def _prefill_and_decode(self, inputs: dict, handle) -> Sample:
        self.timer.reset()
        self.clock.sync()
        with torch.no_grad(), PeakMemory(self.model.device) as memory:
            start = self.clock.mark()
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            end = self.clock.mark()
        ttft, ttft_cpu = self.clock.seconds(start, end), self.clock.cpu_seconds(start, end)
        # the prefill's stages, read before the decoding steps run the language model again
        vision, vision_cpu = self.timer.seconds("vision"), self.timer.seconds("vision", cpu=True)
        llm, llm_cpu = self.timer.seconds("llm"), self.timer.seconds("llm", cpu=True)
        cache = out.past_key_values
        kv = kv_cache_bytes(cache)
        decode = self._decode(out, token, inputs)
        record = handle.last if handle is not None else None
        batch, length = next(v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")).shape[:2]
        if record is not None:
            lengths = self._layer_lengths(length, record)
            n_visual, n_kept = record.n_visual, record.n_kept
            stages = [{"stage": s.stage, "layer": s.layer, "n_visual": s.n_visual, "n_kept": [len(k) for k in s.kept]}
                      for s in record.stages]
            selection = record.selection_seconds
        else:
            lengths = [length] * self.n_layers
            n_visual = n_kept = None
            stages, selection = [], 0.0
        return Sample(ttft=ttft, vision=vision, llm=llm, selection=selection, decode_step=decode,
                      peak_memory=memory.peak, kv_cache=kv, layer_lengths=lengths, batch=batch, n_visual=n_visual,
                      n_kept=n_kept, stages=stages, ttft_cpu=ttft_cpu, vision_cpu=vision_cpu, llm_cpu=llm_cpu)

    def _decode(self, out, token, inputs) -> float | None:
        """Median time of one greedy decoding step over the prefill's cache."""
        if self.decode_tokens <= 0:
            return None
        cache = out.past_key_values
        mask = inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # unpadded batch: decode as generate does, without a mask
        positions = inputs.get("position_ids")
        steps = []
        with torch.no_grad():
            for _ in range(self.decode_tokens):
                extra = {}
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                    extra["attention_mask"] = mask
                if positions is not None:
                    positions = positions[..., -1:] + 1
                    extra["position_ids"] = positions
                start = self.clock.mark()
                step = self.model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                end = self.clock.mark()
                steps.append(self.clock.seconds(start, end))
        return median(steps)

    def _layer_lengths(self, length: int, record) -> list[int]:
        """Sequence length (padding included) entering each decoder layer."""
        lengths = [length] * self.n_layers
        for stage in record.stages:
            lengths[stage.layer:] = [stage.length] * (self.n_layers - stage.layer)
        return lengths

    def _ideal(self, config: Config) -> Sample:
        """The stage-correct bound of ``config``'s method (``ideal.LayeredIdeal``): its language-model time; the
        time outside the language model (vision, embedding, LM head) is added by ``summarise``."""
        from .ideal import LayeredIdeal
        plan = self.stages[Config("method", config.method, config.budget, config.options).label]
        with LayeredIdeal(self.model, self.lm_inputs, **plan) as ideal:
            self.timer.reset()
            self.clock.sync()
            with torch.no_grad(), PeakMemory(self.model.device) as memory:
                token = ideal.prefill().argmax(-1, keepdim=True)
            llm, llm_cpu = self.timer.seconds("llm"), self.timer.seconds("llm", cpu=True)
            kv = kv_cache_bytes(ideal.cache)
            steps = []
            for _ in range(self.decode_tokens):  # through the model's forward, as the method's steps
                step_start = self.clock.mark()
                token = ideal.step(token).argmax(-1, keepdim=True)
                steps.append(self.clock.seconds(step_start, self.clock.mark()))
        batch, length = self.lm_inputs["embeds"].shape[:2]
        lengths = [length] * self.n_layers
        for layer, index in plan["stages"]:
            lengths[layer:] = [index.shape[1]] * (self.n_layers - layer)
        return Sample(ttft=llm, vision=0.0, llm=llm, selection=0.0, decode_step=median(steps) if steps else None,
                      peak_memory=memory.peak, kv_cache=kv, layer_lengths=lengths, batch=batch, n_visual=None,
                      n_kept=None, stages=[], ttft_cpu=llm_cpu, vision_cpu=None if llm_cpu is None else 0.0,
                      llm_cpu=llm_cpu)

    def close(self):
        self.timer.remove()


def build_grid(methods: list[str], budgets: list[dict], options: dict) -> list[Config]:
    """Dense, then each method at each budget with its ideal. Each ``options`` entry goes to the methods that have
    that option. Raises ValueError for an option no listed method has, and for a budget or option value a
    method refuses (its own message), before anything is measured."""
    grid = [Config("dense")]
    used = set()
    for method in methods:
        accepted = _options_for(method, options)
        used |= set(accepted)
        for budget in budgets:
            lookup(method)(**budget, **accepted)  # the method's own validation, now rather than mid-run
            grid.append(Config("method", method, budget, accepted))
            grid.append(Config("ideal", method, budget, accepted))
    unknown = sorted(set(options) - used)
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: no option of that name in {', '.join(methods)}")
    return grid


def _options_for(method: str, options: dict) -> dict:
    import dataclasses

    names = {f.name for f in dataclasses.fields(lookup(method))}
    return {k: v for k, v in options.items() if k in names}


def validate(model, grid: list[Config], video: bool = False) -> None:
    """Patch the built model with every method configuration of ``grid`` (and unpatch it), so that an option the
    model refuses (a vision layer its tower lacks, a checkpoint that cannot be loaded, a model class or a visual
    input the method does not support) fails before anything is measured. Raises ValueError naming the row."""
    from ..methods import lookup
    for config in grid:
        if config.kind != "method":
            continue
        if video and "video" not in lookup(config.method).visual_kinds:
            raise ValueError(f"{config.label}: {config.method} prunes images only; measure it without --video")
        try:
            handle = vtr.patch(model, config.method, **config.budget, **config.options)
        except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError) as error:
            hint = ""
            if isinstance(error, OSError) and config.method == "cdpruner":
                hint = (" (cdpruner's default relevance on LLaVA loads a CLIP checkpoint; without one, measure the "
                        "language model's relevance with --set relevance=embeddings)")
            raise ValueError(f"{config.label} cannot run on this model: {error}{hint}") from None
        handle.remove()


def run_grid(model, inputs: dict, grid: list[Config], repeats: int, warmup: int, decode_tokens: int,
             progress: bool = True, on_pass=None) -> list[dict]:
    """Interleaved measurement: every repeat runs every configuration once, in grid order (dense first: its
    prefill also records the language model's inputs that the ideal runs are cut from). ``on_pass(rows, done)``,
    when given, receives the summary after each timed pass (``done`` passes so far), so that a stopped run keeps
    what it measured."""
    runner = Runner(model, inputs, decode_tokens)
    samples: dict[str, list[Sample]] = {c.label: [] for c in grid}
    bar = cli.progress((warmup + repeats) * len(grid), progress, "measuring")
    try:
        for rep in range(warmup + repeats):
            for config in grid:
                try:
                    sample = runner.run(config)
                except Exception as error:
                    raise RuntimeError(f"{config.label}: {type(error).__name__}: {error}") from error
                if rep >= warmup:
                    samples[config.label].append(sample)
                bar.update(1)
            if on_pass is not None and rep >= warmup:
                on_pass(summarise(grid, samples, model), rep - warmup + 1)
    finally:
        bar.close()
        runner.close()
    return summarise(grid, samples, model)


def summarise(grid: list[Config], samples: dict, model) -> list[dict]:
    """One row per configuration: medians, ratios to dense and (method rows) to the ideal, in wall and CPU time.
    An ideal's samples time the language model only; its row adds the time the run spends outside the language
    model (vision tower, embedding and scatter of the features, LM head): the dense run's, or for a method that
    prunes inside the tower, the method's own (its design includes that saving; its in-tower selection is then
    counted in the ideal). Configurations with fewer passes than others (a run stopped midway) are paired pass
    by pass as far as they go."""
    text = model.config.get_text_config()
    rows = []
    dense = _medians(samples["dense"], text)
    for config in grid:
        if not samples[config.label]:
            continue
        row = {"config": config.label, "kind": config.kind, "method": config.method, **config.budget,
               "options": config.options, **_medians(samples[config.label], text)}
        if config.kind == "ideal":
            own = Config("method", config.method, config.budget, config.options).label
            source = samples[own] if _in_tower(config.method) else samples["dense"]
            tower = _medians(source, text)
            row["outside_s"] = median([s.ttft - s.llm for s in source])
            row["outside_cpu_s"] = median([None if s.ttft_cpu is None else s.ttft_cpu - s.llm_cpu for s in source])
            row["vision_s"], row["vision_cpu_s"] = tower["vision_s"], tower["vision_cpu_s"]
            row["ttft_s"] = row["ttft_s"] + row["outside_s"]
            if row["ttft_cpu_s"] is not None:
                row["ttft_cpu_s"] = row["ttft_cpu_s"] + row["outside_cpu_s"]
        rows.append(row)
    by_label = {r["config"]: r for r in rows}
    for row in rows:
        # Interleaving pairs each repeat of a row with the dense run of the same pass; the reported ratio is the
        # median of those per-pass ratios, so a burst of load that slows one pass moves one pair, not a median.
        # (an ideal's samples time the language model only: its row's outside time is added to each)
        outside = row["outside_s"] if row["kind"] == "ideal" else 0.0
        outside_cpu = row["outside_cpu_s"] if row["kind"] == "ideal" else 0.0
        own = samples[row["config"]]
        row["ttft_speedup_vs_dense"], row["ttft_speedup_spread"] = _paired(
            [_ratio(d.ttft, s.ttft + outside) for d, s in zip(samples["dense"], own)])
        row["ttft_per_pass_s"] = [s.ttft + outside for s in own]
        # the same ratios in process CPU time (CPU only): what a loaded machine distorts least (timing.Clock)
        row["ttft_cpu_speedup_vs_dense"], row["ttft_cpu_speedup_spread"] = _paired(
            [_ratio(d.ttft_cpu, _plus(s.ttft_cpu, outside_cpu)) for d, s in zip(samples["dense"], own)])
        row["ttft_cpu_per_pass_s"] = [_plus(s.ttft_cpu, outside_cpu) for s in own]
        row["llm_speedup_vs_dense"] = _ratio(dense["llm_s"], row["llm_s"])
        row["decode_speedup_vs_dense"] = _ratio(dense["decode_step_s"], row["decode_step_s"])
        ideal = by_label.get(row["config"] + " ideal")
        if row["kind"] == "method" and ideal is not None:  # a grid may leave the ideals out (the scaling run)
            # 1.0 = as fast as the ideal
            row["ttft_vs_ideal"], row["ttft_vs_ideal_spread"] = _paired(
                [_ratio(i.ttft + ideal["outside_s"], s.ttft) for i, s in
                 zip(samples[ideal["config"]], samples[row["config"]])])
            row["ttft_cpu_vs_ideal"], row["ttft_cpu_vs_ideal_spread"] = _paired(
                [_ratio(_plus(i.ttft_cpu, ideal["outside_cpu_s"]), s.ttft_cpu) for i, s in
                 zip(samples[ideal["config"]], samples[row["config"]])])
    return rows


def _in_tower(method) -> bool:
    from vtr.methods import REGISTRY
    return method in REGISTRY and REGISTRY[method].stage.value == "vision"


def _medians(samples: list[Sample], text_config) -> dict:
    first = samples[0]
    batch = first.batch
    return {
        "ttft_s": median([s.ttft for s in samples]),
        "ttft_spread": _spread([s.ttft for s in samples]),
        "vision_s": median([s.vision for s in samples]),
        "ttft_cpu_s": median([s.ttft_cpu for s in samples]),
        "ttft_cpu_spread": _spread([s.ttft_cpu for s in samples]),
        "vision_cpu_s": median([s.vision_cpu for s in samples]),
        "llm_cpu_s": median([s.llm_cpu for s in samples]),
        "llm_s": median([s.llm for s in samples]),
        "selection_s": median([s.selection for s in samples]),
        "decode_step_s": median([s.decode_step for s in samples]),
        "decode_tokens_per_s": _ratio(batch, median([s.decode_step for s in samples])),
        "peak_memory_bytes": median([s.peak_memory for s in samples]),
        "kv_cache_bytes": first.kv_cache,
        "llm_prefill_tflops": llm_prefill_flops(text_config, first.layer_lengths, batch) / 1e12,
        "layer_lengths": first.layer_lengths,
        "n_visual": first.n_visual,
        "n_kept": first.n_kept,
        "stages": first.stages,
        "repeats": len(samples),
    }


def _paired(ratios: list) -> tuple[float | None, float | None]:
    """(median of the per-pass ratios, its uncertainty: see ``_median_interval``)."""
    ratios = [r for r in ratios if r is not None]
    if not ratios:
        return None, None
    return median(ratios), _median_interval(ratios)


def _median_interval(values: list, resamples: int = 2000, seed: int = 0) -> float | None:
    """Half the width of the 95% bootstrap interval of the median of ``values``, relative to the median (0.03:
    the reported median is good to about +-3%); None for fewer than two values. Unlike the range of the
    values, it shrinks as repeats are added, which is what makes it the figure to read a ratio's stability
    from. Seeded, so a result file recomputes to the same interval."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return (high - low) / 2 / median(values)


def _spread(values: list) -> float | None:
    """Half the range of ``values`` relative to their median (0.05: within +-5% of the median); None for fewer
    than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / 2 / median(values)


def _plus(a, b):
    return None if a is None or b is None else a + b


def _ratio(a, b):
    return None if a is None or not b else a / b
