"""Measuring a grid of configurations on one model and one input batch: the dense model, each method at each
budget, and each method's ideal, interleaved. The ideal of a pre-LLM method is the unpatched language model fed
only the kept tokens; that of a layer-stage method pruning before layer K is the unpatched model running layers
< K on the full sequence and the rest on the kept tokens (``ideal.LayeredIdeal``)."""
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


class Runner:
    """Runs configurations on one model and one input batch."""

    def __init__(self, model, inputs: dict, decode_tokens: int):
        self.model, self.inputs, self.decode_tokens = model, inputs, decode_tokens
        self.clock = Clock(model.device)
        self.timer = StageTimer(model, self.clock)
        self.n_layers = len(model.model.language_model.layers)
        self.lm_inputs: dict | None = None  # what the language model receives in the dense prefill
        self.kept_index: dict[str, torch.Tensor] = {}
        # per method label with a vision or layer stage: (layer, kept index, first layer whose cache the stage
        # cuts or None) of each of its stages before the decoding
        self.layer_stages: dict[str, list] = {}

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
                self.kept_index[config.label] = handle.last.index
                stages = ideal_stages(handle)
                if stages is not None:
                    self.layer_stages[config.label] = stages
            return sample
        finally:
            if capture is not None:
                capture.remove()
            if handle is not None:
                handle.remove()

    def _prefill_and_decode(self, inputs: dict, handle, ideal_layers: list[int] | None = None) -> Sample:
        self.timer.reset()
        self.clock.sync()
        with torch.no_grad(), PeakMemory(self.model.device) as memory:
            start = self.clock.mark()
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            end = self.clock.mark()
        ttft, ttft_cpu = self.clock.seconds(start, end), self.clock.cpu_seconds(start, end)
        vision, llm = self.timer.seconds("vision"), self.timer.seconds("llm")
        vision_cpu = self.timer.seconds("vision", cpu=True)
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
            lengths = ideal_layers or [length] * self.n_layers
            n_visual = n_kept = None
            stages, selection = [], 0.0
        return Sample(ttft=ttft, vision=vision, llm=llm, selection=selection, decode_step=decode,
                      peak_memory=memory.peak, kv_cache=kv, layer_lengths=lengths, batch=batch, n_visual=n_visual,
                      n_kept=n_kept, stages=stages, ttft_cpu=ttft_cpu, vision_cpu=vision_cpu)

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
        """The unpatched language model fed the kept tokens of ``config``'s method (its vision time is the dense
        model's, added by the caller)."""
        label = Config("method", config.method, config.budget, config.options).label
        index = self.kept_index[label]
        if index is None:  # the method kept everything
            index = torch.arange(self.lm_inputs["embeds"].shape[1], device=self.model.device)[None]
        if self.layer_stages.get(label):
            return self._layered_ideal(self.layer_stages[label])
        embeds, mask, positions = _kept_inputs(self.lm_inputs, index)
        inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        return self._prefill_and_decode(inputs, None, [embeds.shape[1]] * self.n_layers)

    def _layered_ideal(self, stages: list) -> Sample:
        """The unpatched layers, each on the tokens of the stage it runs in (the full prompt before the first);
        prefill timed as the LLM part (the caller adds the dense vision time), then greedy decoding steps on its
        cache."""
        from .ideal import LayeredIdeal
        ideal = LayeredIdeal(self.model, self.lm_inputs, stages=stages)
        self.clock.sync()
        with PeakMemory(self.model.device) as memory:
            start = self.clock.mark()
            token = ideal.prefill().argmax(-1, keepdim=True)
            end = self.clock.mark()
        llm, llm_cpu = self.clock.seconds(start, end), self.clock.cpu_seconds(start, end)
        kv = kv_cache_bytes(ideal.cache)
        steps = []
        for _ in range(self.decode_tokens):
            start = self.clock.mark()
            token = ideal.step(token).argmax(-1, keepdim=True)
            steps.append(self.clock.seconds(start, self.clock.mark()))
        batch, length = self.lm_inputs["embeds"].shape[:2]
        lengths = [length] * self.n_layers
        for layer, index, _ in stages:
            lengths[layer:] = [index.shape[1]] * (self.n_layers - layer)
        return Sample(ttft=llm, vision=0.0, llm=llm, selection=0.0, decode_step=median(steps) if steps else None,
                      peak_memory=memory.peak, kv_cache=kv, layer_lengths=lengths, batch=batch, n_visual=None,
                      n_kept=None, stages=[], ttft_cpu=llm_cpu, vision_cpu=None if llm_cpu is None else 0.0)

    def close(self):
        self.timer.remove()


def ideal_stages(handle) -> list | None:
    """The ``stages`` of ``ideal.LayeredIdeal`` for the last request of ``handle``: ``(layer, kept index, first
    layer whose KV cache the stage cuts or None)`` per stage before the decoding (a vision stage and a pre-LLM
    stage at layer 0); None for a method that prunes only before the language model with nothing inside the
    tower (its ideal: the language model fed the kept tokens)."""
    record = handle.last
    if not any(s.stage in ("layer", "vision") for s in record.stages):
        return None
    cuts = {spec.layer: spec.slice_from for spec in handle.method.stages()
            if spec.stage.value == "layer" and spec.slice_earlier}
    return [(s.layer, s.index, cuts.get(s.layer) if s.stage == "layer" else None)
            for s in record.stages if s.stage != "kv_cache" and s.index is not None]


def _kept_inputs(lm_inputs: dict, index: torch.Tensor):
    from ..kernels import gather_positions, gather_rows
    embeds = lm_inputs["embeds"]
    B, L = embeds.shape[:2]
    index = index.expand(B, -1)
    mask = lm_inputs["mask"] if lm_inputs["mask"] is not None else torch.ones(B, L, dtype=torch.long,
                                                                             device=embeds.device)
    positions = lm_inputs["positions"]
    if positions is None:
        positions = torch.arange(L, device=embeds.device).expand(B, L)
    kept_mask = gather_rows(mask.unsqueeze(-1), index, 0).squeeze(-1)
    return gather_rows(embeds, index), kept_mask, gather_positions(positions, index)


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


def run_grid(model, inputs: dict, grid: list[Config], repeats: int, warmup: int, decode_tokens: int,
             progress: bool = True) -> list[dict]:
    """Interleaved measurement: every repeat runs every configuration once, in grid order (dense first: its
    prefill also records the language model's inputs that the ideal runs are cut from)."""
    runner = Runner(model, inputs, decode_tokens)
    samples: dict[str, list[Sample]] = {c.label: [] for c in grid}
    bar = cli.progress((warmup + repeats) * len(grid), progress, "measuring")
    try:
        for rep in range(warmup + repeats):
            for config in grid:
                sample = runner.run(config)
                if rep >= warmup:
                    samples[config.label].append(sample)
                bar.update(1)
    finally:
        bar.close()
        runner.close()
    return summarise(grid, samples, model)


def summarise(grid: list[Config], samples: dict, model) -> list[dict]:
    text = model.config.get_text_config()
    rows = []
    dense = _medians(samples["dense"], text)
    for config in grid:
        row = {"config": config.label, "kind": config.kind, "method": config.method, **config.budget,
               "options": config.options, **_medians(samples[config.label], text)}
        if config.kind == "ideal":  # the LM-only prefill plus the vision time: dense, or the method's own pruned
            # tower for a method that prunes inside it (its design includes that saving)
            own = Config("method", config.method, config.budget, config.options).label
            tower = _medians(samples[own], text) if _in_tower(config.method) else dense
            row["vision_s"] = tower["vision_s"]
            row["ttft_s"] = row["ttft_s"] + tower["vision_s"]
            row["vision_cpu_s"] = tower["vision_cpu_s"]
            if row["ttft_cpu_s"] is not None:
                row["ttft_cpu_s"] = row["ttft_cpu_s"] + tower["vision_cpu_s"]
        rows.append(row)
    by_label = {r["config"]: r for r in rows}
    for row in rows:
        # Interleaving pairs each repeat of a row with the dense run of the same pass; the reported ratio is the
        # median of those per-pass ratios, so a burst of load that slows one pass moves one pair, not a median.
        # (an ideal's samples time the language model only: its row's vision time is added to each)
        vision = row["vision_s"] if row["kind"] == "ideal" else 0.0
        vision_cpu = row["vision_cpu_s"] if row["kind"] == "ideal" else 0.0
        own = samples[row["config"]]
        row["ttft_speedup_vs_dense"], row["ttft_speedup_spread"] = _paired(
            [_ratio(d.ttft, s.ttft + vision) for d, s in zip(samples["dense"], own)])
        row["ttft_per_pass_s"] = [s.ttft + vision for s in own]
        # the same ratios in process CPU time (CPU only): what a loaded machine distorts least (timing.Clock)
        row["ttft_cpu_speedup_vs_dense"], row["ttft_cpu_speedup_spread"] = _paired(
            [_ratio(d.ttft_cpu, _plus(s.ttft_cpu, vision_cpu)) for d, s in zip(samples["dense"], own)])
        row["ttft_cpu_per_pass_s"] = [_plus(s.ttft_cpu, vision_cpu) for s in own]
        row["llm_speedup_vs_dense"] = _ratio(dense["llm_s"], row["llm_s"])
        row["decode_speedup_vs_dense"] = _ratio(dense["decode_step_s"], row["decode_step_s"])
        ideal = by_label.get(row["config"] + " ideal")
        if row["kind"] == "method" and ideal is not None:  # a grid may leave the ideals out (the scaling run)
            # 1.0 = as fast as the ideal; an ideal's own samples time the language model only, so each pass adds
            # the ideal row's vision time (the dense tower's, or the method's own pruned tower's)
            row["ttft_vs_ideal"], row["ttft_vs_ideal_spread"] = _paired(
                [_ratio(i.ttft + ideal["vision_s"], s.ttft) for i, s in
                 zip(samples[ideal["config"]], samples[row["config"]])])
            row["ttft_cpu_vs_ideal"], row["ttft_cpu_vs_ideal_spread"] = _paired(
                [_ratio(_plus(i.ttft_cpu, ideal["vision_cpu_s"]), s.ttft_cpu) for i, s in
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
        "vision_cpu_s": median([s.vision_cpu for s in samples]),
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
