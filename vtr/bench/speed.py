"""Speed benchmark: the dense model, each method, and the ideal (the unpatched model fed only the kept tokens),
measured in one run, interleaved, on the same inputs.

    vtr-bench                                   # LLaVA-1.5-7B widths, random weights, 3 layers, CPU-sized grid
    vtr-bench --model Qwen/Qwen2-VL-7B-Instruct --methods dart,fastv --ratios 0.778,0.889 --repeats 10

Per configuration it reports time to first token (the prefill forward: vision encoder, LLM, LM head on the last
token), its vision / LLM split, selection time, decode tokens/s over the pruned cache, peak memory, KV-cache size,
estimated LLM prefill FLOPs and kept tokens per stage; every method also as ratios to the dense model and to the
ideal. Medians over repeats; CUDA events after warm-up on GPU, perf_counter on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtr

from ..methods import lookup
from . import models
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
        budget = ",".join(f"{k}={v}" for k, v in self.budget.items())
        return f"{self.method}[{budget}]" + (" ideal" if self.kind == "ideal" else "")


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


class Runner:
    """Runs configurations on one model and one input batch."""

    def __init__(self, model, inputs: dict, decode_tokens: int):
        self.model, self.inputs, self.decode_tokens = model, inputs, decode_tokens
        self.clock = Clock(model.device)
        self.timer = StageTimer(model, self.clock)
        self.n_layers = len(model.model.language_model.layers)
        self.lm_inputs: dict | None = None  # what the language model receives in the dense prefill
        self.kept_index: dict[str, torch.Tensor] = {}

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
        ttft = self.clock.seconds(start, end)
        vision, llm = self.timer.seconds("vision"), self.timer.seconds("llm")
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
                      n_kept=n_kept,
                      stages=stages)

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
        index = self.kept_index[Config("method", config.method, config.budget, config.options).label]
        if index is None:  # the method kept everything
            index = torch.arange(self.lm_inputs["embeds"].shape[1], device=self.model.device)[None]
        embeds, mask, positions = _kept_inputs(self.lm_inputs, index)
        inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        return self._prefill_and_decode(inputs, None, [embeds.shape[1]] * self.n_layers)

    def close(self):
        self.timer.remove()


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
    grid = [Config("dense")]
    for method in methods:
        accepted = _options_for(method, options)
        for budget in budgets:
            grid.append(Config("method", method, budget, accepted))
            grid.append(Config("ideal", method, budget, accepted))
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
    bar = _progress((warmup + repeats) * len(grid), progress)
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
        if config.kind == "ideal":
            row["vision_s"] = dense["vision_s"]
            row["ttft_s"] = row["ttft_s"] + dense["vision_s"]  # the LM-only prefill plus the dense vision time
        rows.append(row)
    by_label = {r["config"]: r for r in rows}
    for row in rows:
        row["ttft_speedup_vs_dense"] = _ratio(dense["ttft_s"], row["ttft_s"])
        row["llm_speedup_vs_dense"] = _ratio(dense["llm_s"], row["llm_s"])
        row["decode_speedup_vs_dense"] = _ratio(dense["decode_step_s"], row["decode_step_s"])
        if row["kind"] == "method":
            ideal = by_label[row["config"] + " ideal"]
            row["ttft_vs_ideal"] = _ratio(ideal["ttft_s"], row["ttft_s"])  # 1.0 = as fast as the ideal
    return rows


def _medians(samples: list[Sample], text_config) -> dict:
    first = samples[0]
    batch = first.batch
    return {
        "ttft_s": median([s.ttft for s in samples]),
        "vision_s": median([s.vision for s in samples]),
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


def _ratio(a, b):
    return None if a is None or not b else a / b


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=not enabled, desc="measuring", leave=False, file=sys.stderr)
    except ImportError:
        class Silent:
            def update(self, n):
                pass

            def close(self):
                pass
        return Silent()


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':<28} {'kept/visual':>12} {'TTFT ms':>9} {'xdense':>7} {'xideal':>7} {'vision':>8} "
            f"{'select':>8} {'LLM ms':>8} {'dec tok/s':>9} {'KV MB':>7} {'peak MB':>8} {'TFLOP':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kept = "-" if not r["n_kept"] else f"{sum(r['n_kept'])}/{sum(r['n_visual'])}"
        lines.append(
            f"{r['config']:<28} {kept:>12} {_ms(r['ttft_s']):>9} {_x(r['ttft_speedup_vs_dense']):>7} "
            f"{_x(r.get('ttft_vs_ideal')):>7} {_ms(r['vision_s']):>8} {_ms(r['selection_s']):>8} {_ms(r['llm_s']):>8} "
            f"{_f(r['decode_tokens_per_s']):>9} {r['kv_cache_bytes'] / 2**20:>7.1f} "
            f"{_mb(r['peak_memory_bytes']):>8} {r['llm_prefill_tflops']:>7.3f}")
    return "\n".join(lines)


def _mb(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _ms(s):
    return "-" if s is None else f"{s * 1000:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def plot(rows: list[dict], path: Path) -> Path | None:
    """Speedup (TTFT vs dense) and memory (peak on GPU, KV cache on CPU) against the pruning ratio (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = sorted({r["method"] for r in rows if r["kind"] == "method" and "ratio" in r})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    dense = next(r for r in rows if r["kind"] == "dense")
    memory_key = "peak_memory_bytes" if dense["peak_memory_bytes"] is not None else "kv_cache_bytes"
    for method in methods:
        for kind, style in (("method", "-o"), ("ideal", ":x")):
            points = sorted((r["ratio"], r) for r in rows if r["method"] == method and r["kind"] == kind
                            and "ratio" in r)
            if not points:
                continue
            xs = [0.0] + [p[0] for p in points]
            label = method if kind == "method" else f"{method} (ideal)"
            axes[0].plot(xs, [1.0] + [p[1]["ttft_speedup_vs_dense"] for p in points], style, label=label)
            mem = [dense[memory_key]] + [p[1][memory_key] for p in points]
            axes[1].plot(xs, [m / 2**20 for m in mem], style, label=label)
    axes[0].set(xlabel="ratio of visual tokens removed", ylabel="TTFT speedup vs dense", title="Prefill speed")
    what = "peak memory of the prefill" if memory_key == "peak_memory_bytes" else "KV cache after the prefill"
    axes[1].set(xlabel="ratio of visual tokens removed", ylabel=f"{what} (MiB)", title="Memory")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vtr-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-1.5-7b",
                   help=f"shipped config ({', '.join(models.SHIPPED)}), a config.json, or a hub id / checkpoint")
    p.add_argument("--random-init", action="store_true", help="random weights from the model's config (no download "
                   "of weights); implied for shipped configs")
    p.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (random init)")
    p.add_argument("--vision-layers", type=int, default=None, help="keep only this many vision layers (random init)")
    p.add_argument("--methods", default="divprune,dart")
    p.add_argument("--ratios", default="0.778,0.889", help="fractions of visual tokens removed")
    p.add_argument("--keep", default="", help="visual tokens kept per image (instead of --ratios)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method option for every method that has it, e.g. --set layer=2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens around the image (synthetic inputs)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (synthetic inputs)")
    p.add_argument("--image", default=None, help="an image file to use with a real checkpoint's processor")
    p.add_argument("--question", default="Describe the image in detail.")
    p.add_argument("--decode-tokens", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 2 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="results", help="directory for the JSON and PNG")
    p.add_argument("--tag", default=None, help="file name stem (default: model and time)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


DEFAULT_CPU_SHAPE = {"layers": 3, "vision_layers": 2}


def main(argv=None) -> None:
    """The ``vtr-bench`` command."""
    run(argv)


def run(argv=None) -> dict:
    """Parse the command line, measure, print the table, write the JSON and PNG; returns the result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    shipped = args.model in models.SHIPPED or args.model.endswith(".json")
    args.random_init = args.random_init or shipped
    if shipped and device.type == "cpu" and args.layers is None and args.vision_layers is None:
        # The built-in default: 7B widths at a depth a 2-core CPU measures in about a minute.
        args.layers, args.vision_layers = DEFAULT_CPU_SHAPE["layers"], DEFAULT_CPU_SHAPE["vision_layers"]
    repeats = args.repeats or (10 if device.type == "cuda" else 2)
    options = dict(_parse_option(s) for s in args.set)
    budgets = ([{"keep": int(k)} for k in args.keep.split(",") if k] or
               [{"ratio": float(r)} for r in args.ratios.split(",") if r])
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        lookup(method)  # fail on a typo before loading the model

    started = time.time()
    model, processor = models.load(args.model, args.random_init, args.layers, args.vision_layers, args.dtype,
                                   args.attn, args.device)
    load_s = time.time() - started
    if processor is not None and args.image:
        inputs = _processor_inputs(model, processor, args)
    else:
        inputs = models.synthetic_inputs(model, args.batch, args.prompt_tokens, args.image_size)
    grid = build_grid(methods, budgets, options)
    rows = run_grid(model, inputs, grid, repeats, args.warmup, args.decode_tokens, progress=not args.quiet)
    settings = dict(vars(args))
    settings.update(repeats=repeats, device=str(device), dtype=str(next(model.parameters()).dtype),
                    prompt_length=int(inputs.get("input_ids", inputs.get("inputs_embeds")).shape[1]),
                    load_seconds=round(load_s, 2))
    result = {"environment": models.environment(), "settings": settings, "results": rows,
              "wall_seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"speed-{Path(args.model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    png = None if args.no_plot else plot(rows, out / f"{stem}.png")
    print(f"{args.model} ({'random weights, ' if processor is None else ''}{settings['dtype']}, "
          f"{args.layers or 'all'} layers, {settings['prompt_length']}-token prompt, batch {args.batch}) on "
          f"{result['environment']['gpu'] or result['environment']['cpu']}; medians of {repeats} interleaved runs")
    print(format_table(rows))
    print(f"wrote {json_path}" + (f" and {png}" if png else "") + f" ({result['wall_seconds']} s)")
    return result


def _parse_option(text: str):
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _processor_inputs(model, processor, args) -> dict:
    from PIL import Image
    image = Image.open(args.image).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt] * args.batch, images=[image] * args.batch, return_tensors="pt", padding=True)
    dtype = next(model.parameters()).dtype
    return {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) for k, v in inputs.items()}


if __name__ == "__main__":
    main()
