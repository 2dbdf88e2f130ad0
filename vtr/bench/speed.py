"""Speed benchmark: the dense model, each method, and its ideal (the unpatched model with each of the method's
stages bounded where it acts, nothing chosen: ``ideal.LayeredIdeal``), measured in one run, interleaved, on the
same inputs.

    vtr-bench                                   # LLaVA-1.5-7B, random weights, every layer at 1/4 width
    vtr-bench --model qwen3-vl-8b --methods dart,divprune --ratios 0.778,0.889 --clock cpu
    vtr-bench --model Qwen/Qwen2-VL-7B-Instruct --methods dart,fastv --ratios 0.778,0.889 --repeats 10

Per configuration it reports time to first token (the prefill forward: vision encoder, LLM, LM head on the last
token), its vision / LLM split, selection time, decode tokens/s over the pruned cache, peak memory, KV-cache size,
estimated LLM prefill FLOPs and kept tokens per stage; every method also as ratios to the dense model and to the
ideal. Medians over repeats; CUDA events after warm-up on GPU, perf_counter and process CPU time on CPU
(``--clock`` picks the one the table shows). Every row is patched onto the built model before anything is
measured. Writes <out>/speed-<model>-<YYYYmmdd-HHMMSS>.json (hardware, versions, settings, every figure; rewritten
after every timed pass) and a .png of the same name (the PNG needs matplotlib: the bench extra).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import cli

# Shapes a shipped config or config file is built in on CPU (--preset). "full-depth", the default: every decoder
# layer and every vision layer at a quarter of the width, so a layer method prunes the real model's share of the
# depth (30 of 32 layers after DART's layer 2) at about the cost of three full-width layers, and the vision tower
# (and a method's work on its signals) keeps about its real share of the prefill. "3-layer": the real widths, 3
# decoder layers, the whole tower.
PRESETS = {"full-depth": {"layers": None, "vision_layers": None, "width_divisor": 4, "vision_width_divisor": 4},
           "3-layer": {"layers": 3, "vision_layers": None, "width_divisor": 1, "vision_width_divisor": 1}}
SHAPE_FLAGS = ("layers", "vision_layers", "width_divisor", "vision_width_divisor")
DEFAULT_CPU_PRESET = "full-depth"
# Interleaved timed passes on CPU. Two passes left ratios +-10-17% apart on a loaded 2-core machine; the reported
# ratio is the median of the paired per-pass ratios, whose 95% interval narrows with the passes.
CPU_REPEATS = 9
TABLE_LEGEND = ("xdense: dense TTFT / this TTFT. xideal: the ideal's TTFT / this TTFT (method rows only; 1.00x = "
                "as fast as the method's stage-correct ideal: the unpatched model with each stage's kept tokens "
                "dropped where the stage acts, before the language model for a pre-LLM stage, before layer K for a "
                "layer stage, nothing chosen; its time outside the language model is the dense run's). Ratios are "
                "medians of per-pass ratios (each pass pairs a row with the dense run of that pass), in the clock "
                "the header names; +-: half the width of the 95% bootstrap interval of that median, relative to "
                "it. '-': not applicable to the row, or not measured here (peak MB is measured on GPU only).")
TINY_NOTICE = ("note: a tiny random model measures the harness, not speed: its layers are so small that fixed "
               "per-call costs dominate, and its timings say nothing about how fast a method makes a real model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtr-bench", description=__doc__, formatter_class=cli.HelpFormatter)
    shipped = ", ".join(cli.SHIPPED)
    p.add_argument("--model", default="llava-1.5-7b",
                   help=f"a shipped config ({shipped}; random weights), a config.json path (random weights), "
                        "tiny-<family> (a tiny random model, e.g. tiny-qwen2_vl), or a hub id / checkpoint directory "
                        "(its weights and processor) (default: llava-1.5-7b)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from a checkpoint's config instead of its weights; implied for shipped "
                        "configs and config.json files (default: off)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers to build, random weights only (default: all)")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="vision-encoder layers to build, random weights only (default: all)")
    p.add_argument("--width-divisor", type=int, default=None,
                   help="divide the language model's hidden size, MLP size and heads by this, keeping the head "
                        "size; random weights only (default: 1; 4 under --preset full-depth)")
    p.add_argument("--vision-width-divisor", type=int, default=None,
                   help="divide the vision tower's hidden size, MLP size and heads by this, keeping the head size "
                        "and depth; random weights only (default: 1; 4 under --preset full-depth)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shape of a shipped config or config file: 'full-depth' = every decoder and vision layer "
                        "at 1/4 width (real head sizes), so layer methods prune the real share of the depth and "
                        "the tower keeps about its real share of the prefill; '3-layer' = 3 decoder layers and "
                        "the whole tower at full width; --layers, --vision-layers, --width-divisor and "
                        "--vision-width-divisor override it (default on CPU: full-depth for shipped configs, "
                        "3-layer for config files; on GPU the whole model)")
    p.add_argument("--methods", default="divprune,dart",
                   help="comma-separated method names; vtr.methods() lists them (default: divprune,dart)")
    p.add_argument("--ratios", default="0.778,0.889",
                   help="comma-separated fractions of each image's visual tokens to remove (default: 0.778,0.889)")
    p.add_argument("--keep", default="",
                   help="comma-separated visual tokens to keep per image, instead of --ratios (default: unset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method option for every method that has it, e.g. --set layer=2; repeatable "
                        "(default: each method's official defaults)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch, all alike (default: 1)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="text tokens around the image in synthetic prompts (default: 64)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels for synthetic prompts (default: the family's: 336 for LLaVA-1.5, "
                        "two tiles a side for LLaVA-NeXT/OneVision, 672 for Qwen-VL; 64 for tiny models)")
    p.add_argument("--video", default=None, metavar="FRAMESxTOKENS",
                   help="a synthetic video instead of the image: frames x visual tokens per frame, e.g. 16x256 "
                        "(Qwen-VL: temporal slices of 2 frames, square token grids; LLaVA-OneVision: FRAMESx196) "
                        "(default: an image)")
    p.add_argument("--image", default=None,
                   help="an image file, fed through the checkpoint's processor (default: synthetic random pixels)")
    p.add_argument("--question", default="Describe the image in detail.",
                   help="the question asked with --image (default: %(default)r)")
    p.add_argument("--decode-tokens", type=int, default=3,
                   help="greedy decoding steps timed after each prefill; 0 skips decoding (default: 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats (default: {CPU_REPEATS} on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the grid first (default: 1)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16 (default: auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attn", default="sdpa", help="attention backend: sdpa, eager, flash_attention_2 (default: sdpa)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto = cuda if available)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="the time the table's ratios are in: 'wall' (elapsed) or 'cpu' (the process's CPU time, CPU "
                        "only: what other work on a shared machine distorts least); the JSON holds both "
                        "(default: wall)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (default on CPU: 1, what other work on a shared machine disturbs least; "
                        "on a loaded 2-core machine 2 threads left the ratios +-17-67%% uncertain, 1 thread +-3-9%%)")
    p.add_argument("--out", default="results", help="directory for the JSON and PNG (default: ./results)")
    p.add_argument("--tag", default=None,
                   help="file name stem (default: speed-<model name>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (default: write it; needs matplotlib)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress messages or bar on stderr (default: show them)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    """The ``vtr-bench`` command."""
    run(argv)


def run(argv=None) -> dict:
    """Parse the command line, measure, print the table, write the JSON and PNG; returns the result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    # names and files first: a typo costs no torch import and no model build
    cli.check_names(parser, args.model, [m for m in args.methods.split(",") if m],
                    dict(_parse_option(s) for s in args.set), {"--image": args.image})
    say("loading torch and transformers ...")
    import torch

    from . import models

    device = models.resolve_device(args.device)
    threads = torch.get_num_threads()
    if args.threads or device.type == "cpu":
        # One thread by default: a narrow model's many small operations each wait for every intra-op thread, so
        # with 2 threads on a busy machine a burst of other work stretched passes several-fold
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    try:
        return _measure(parser, args, device, say)
    finally:
        torch.set_num_threads(threads)  # run() is also called in-process (tests, notebooks)


def _measure(parser, args, device, say) -> dict:
    from ..methods import lookup
    from . import models
    from .grid import build_grid, run_grid, validate

    kind = cli.kind_of(args.model)
    preset = args.preset
    if preset is None and kind in ("shipped", "config") and device.type == "cpu" and \
            all(getattr(args, flag) is None for flag in SHAPE_FLAGS):
        # a shape a 2-core CPU measures in minutes; a config file's widths need not divide by 4
        preset = DEFAULT_CPU_PRESET if kind == "shipped" else "3-layer"
    if preset is not None:
        if kind not in ("shipped", "config"):
            parser.error(f"--preset shapes shipped configs and config files; {args.model} is not one")
        for flag in SHAPE_FLAGS:
            if getattr(args, flag) is None:
                setattr(args, flag, PRESETS[preset][flag])
    args.preset = preset
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures the process's CPU time, which says nothing about GPU work; use wall")
    if kind == "tiny":
        say(TINY_NOTICE)
        if args.image_size is None:
            args.image_size = 64  # the tiny models' own image scale (64 visual tokens on LLaVA-1.5 and Qwen-VL)
    repeats = args.repeats or (10 if device.type == "cuda" else CPU_REPEATS)
    options = dict(_parse_option(s) for s in args.set)
    video = None
    if args.video is not None:
        if args.image:
            parser.error("--video and --image exclude each other (the video is synthetic)")
        try:
            video = models.parse_video(args.video)
        except ValueError as error:
            parser.error(str(error))
    budgets = ([{"keep": int(k)} for k in args.keep.split(",") if k] or
               [{"ratio": float(r)} for r in args.ratios.split(",") if r])
    methods = [m for m in args.methods.split(",") if m]
    try:
        for method in methods:
            lookup(method)  # fail on a typo before loading the model
        grid = build_grid(methods, budgets, options)  # and on an option or budget a method refuses
        plan = models.plan(args.model, args.random_init, args.layers, args.vision_layers, args.dtype, args.device,
                           width_divisor=args.width_divisor or 1, vision_width_divisor=args.vision_width_divisor or 1)
    except (TypeError, ValueError, OSError, models.NotEnoughMemory) as error:
        parser.error(str(error))

    started = time.time()
    say(f"building {plan.describe()} ...")
    model, processor = models.build(plan, args.attn)
    load_s = time.time() - started
    if processor is not None and args.image:
        inputs = _processor_inputs(model, processor, args)
    else:
        try:
            inputs = models.synthetic_inputs(model, args.batch, args.prompt_tokens, args.image_size, video=video)
        except (ValueError, NotImplementedError) as error:
            parser.error(str(error))
    length = int(inputs.get("input_ids", inputs.get("inputs_embeds")).shape[1])
    try:
        validate(model, grid, video=video is not None)  # every row patches this model, before any is measured
    except ValueError as error:
        parser.error(str(error))
    say(f"measuring {len(grid)} configurations (dense; {', '.join(methods)} and their ideals at "
        f"{_count(len(budgets), 'budget')}) on a {length}-token prompt, batch {args.batch}: "
        f"{_count(args.warmup, 'warm-up pass')} + {_count(repeats, 'timed pass')}")
    settings = dict(vars(args))
    settings.update(repeats=repeats, device=str(device), dtype=str(next(model.parameters()).dtype),
                    prompt_length=length, load_seconds=round(load_s, 2), random_weights=plan.random_weights,
                    layers=plan.layers, layers_total=plan.total_layers, vision_layers=plan.vision_layers,
                    vision_layers_total=plan.total_vision_layers, width_divisor=plan.width_divisor,
                    vision_width_divisor=plan.vision_width_divisor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or result_stem(args.model)
    json_path = out / f"{stem}.json"
    environment = models.environment()

    def write(rows, done):
        """The result so far, after each timed pass: a stopped run keeps the passes it measured."""
        result = {"environment": environment, "settings": settings, "results": rows, "passes_done": done,
                  "complete": done == repeats, "wall_seconds": round(time.time() - started, 1)}
        partial = json_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(result, indent=1, default=str))
        partial.replace(json_path)  # a reader never sees half a file
        return result

    rows = run_grid(model, inputs, grid, repeats, args.warmup, args.decode_tokens, progress=not args.quiet,
                    on_pass=write)
    result = write(rows, repeats)
    title = describe_run(result)
    png = None if args.no_plot else plot(rows, out / f"{stem}.png", title, args.clock)
    print(title)
    if kind == "tiny":
        print(TINY_NOTICE)
    print(format_table(rows, args.clock))
    print(TABLE_LEGEND)
    print(f"wrote {json_path}" + (f" and {png}" if png else "") + f" ({result['wall_seconds']} s)")
    if png is None and not args.no_plot:
        print("skipped the PNG: matplotlib is not installed (pip install matplotlib, or the bench extra)",
              file=sys.stderr)
    return result


def result_stem(model: str) -> str:
    """``speed-<model name>-<YYYYmmdd-HHMMSS>``; the model name is kept whole (``speed-llava-1.5-7b-...``)."""
    return f"speed-{cli.model_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe_run(result: dict) -> str:
    """One line naming what was measured: model, weights, depth, dtype, prompt, batch, device, threads, clock and
    repeats."""
    s, env = result["settings"], result["environment"]
    depth = ("all layers" if s.get("layers") is None else
             f"{s['layers']} of {s['layers_total']} layers")
    if s.get("width_divisor", 1) != 1:
        depth += f" at 1/{s['width_divisor']} width"
    if s.get("vision_layers_total"):
        vision = s.get("vision_layers") or s["vision_layers_total"]
        depth += f", {vision} of {s['vision_layers_total']} vision layers"
        if s.get("vision_width_divisor", 1) != 1:
            depth += f" at 1/{s['vision_width_divisor']} width"
    visual = f", video {s['video']} (frames x tokens)" if s.get("video") else ""
    where = env["gpu"] or f"{env['cpu']}, {_count(s.get('threads') or env['cpu_threads'], 'thread')}"
    clock = "process CPU time" if s.get("clock") == "cpu" else "wall time"
    done = result.get("passes_done", s["repeats"])
    passes = f"{s['repeats']}" if done == s["repeats"] else f"{done} of {s['repeats']}"
    return (f"{s['model']} ({'random' if s.get('random_weights') else 'real'} weights, {depth}, "
            f"{s['dtype'].removeprefix('torch.')}, {s['prompt_length']}-token prompt{visual}, batch {s['batch']}) on "
            f"{s['device']} ({where}); ratios in {clock}, medians of {passes} interleaved runs")


def format_table(rows: list[dict], clock: str = "wall") -> str:
    """The printed table; the ratios in ``clock`` ("wall" or "cpu": see ``--clock``)."""
    cpu = clock == "cpu"
    dense, ideal = ("ttft_cpu_speedup_vs_dense", "ttft_cpu_vs_ideal") if cpu else ("ttft_speedup_vs_dense",
                                                                                    "ttft_vs_ideal")
    ttft = "ttft_cpu_s" if cpu else "ttft_s"
    head = (f"{'config':<28} {'kept/visual':>12} {'TTFT ms':>9} {'xdense':>7} {'+-':>6} {'xideal':>7} {'+-':>6} "
            f"{'vision':>8} {'select':>8} {'LLM ms':>8} {'dec tok/s':>9} {'KV MB':>7} {'peak MB':>8} {'TFLOP':>7}")
    if cpu:
        head = head.replace("TTFT ms", "TTFT cpu")
    lines = [head, "-" * len(head)]
    for r in rows:
        kept = "-" if not r["n_kept"] else f"{sum(r['n_kept'])}/{sum(r['n_visual'])}"
        lines.append(
            f"{r['config']:<28} {kept:>12} {_ms(r[ttft]):>9} {_x(r[dense]):>7} "
            f"{_pm(r.get(dense.replace('speedup_vs_dense', 'speedup_spread'))):>6} {_x(r.get(ideal)):>7} "
            f"{_pm(r.get(ideal + '_spread')):>6} {_ms(r['vision_s']):>8} {_ms(r['selection_s']):>8} "
            f"{_ms(r['llm_s']):>8} "
            f"{_f(r['decode_tokens_per_s']):>9} {r['kv_cache_bytes'] / 2**20:>7.1f} "
            f"{_mb(r['peak_memory_bytes']):>8} {r['llm_prefill_tflops']:>7.3f}")
    return "\n".join(lines)


def _pm(v):
    return "-" if v is None else f"{v * 100:.0f}%"


def _mb(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _ms(s):
    return "-" if s is None else f"{s * 1000:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def ideal_legend(row: dict) -> str:
    """What a method's ideal is, from the stages it ran (``row["stages"]``): the legend entry of its dashed line."""
    stages = row.get("stages") or []
    layers = [s["layer"] for s in stages if s["stage"] == "layer"]
    before = any(s["stage"] in ("pre_llm", "vision") for s in stages)
    parts = []
    if any(s["stage"] == "vision" for s in stages):
        parts.append("its own tower")
    if before:
        parts.append("fed the kept tokens")
    if layers:
        parts.append("layers " + "/".join(map(str, layers)) + " on each stage's kept tokens")
    return "ideal: unpatched, " + ", ".join(parts) if parts else "ideal: unpatched"


def plot(rows: list[dict], path: Path, title: str | None = None, clock: str = "wall") -> Path | None:
    """Speedup (TTFT vs dense, in ``clock``) and memory (peak on GPU, KV cache on CPU) against the pruning ratio
    (PNG). Each method has one colour: solid with circles for the method, dashed with crosses for its ideal (the
    legend says what the ideal runs, stage by stage); error bars are the ``+-`` of each ratio; y = 1 marks the
    dense model. Only measured points are drawn. Returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    speedup = "ttft_cpu_speedup_vs_dense" if clock == "cpu" else "ttft_speedup_vs_dense"
    spread = speedup.replace("speedup_vs_dense", "speedup_spread")
    methods = sorted({r["method"] for r in rows if r["kind"] == "method" and "ratio" in r})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    dense = next(r for r in rows if r["kind"] == "dense")
    memory_key = "peak_memory_bytes" if dense["peak_memory_bytes"] is not None else "kv_cache_bytes"
    for i, method in enumerate(methods):
        colour = colours[i % len(colours)]
        own = [r for r in rows if r["method"] == method and r["kind"] == "method" and "ratio" in r]
        for kind, style in (("method", "-o"), ("ideal", "--x")):
            points = sorted((r["ratio"], r) for r in rows if r["method"] == method and r["kind"] == kind
                            and "ratio" in r and r.get(speedup) is not None)
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1][speedup] for p in points]
            errors = [(p[1].get(spread) or 0) * p[1][speedup] for p in points]
            label = method if kind == "method" else f"{method} {ideal_legend(own[0])}" if own else method
            axes[0].errorbar(xs, ys, yerr=errors, fmt=style, color=colour, label=label, capsize=2, markersize=4)
            axes[1].plot(xs, [p[1][memory_key] / 2**20 for p in points], style, color=colour, label=label)
    axes[0].axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="dense")
    axes[1].axhline(dense[memory_key] / 2**20, color="grey", linewidth=0.8, linestyle=":", label="dense")
    which = "process CPU time" if clock == "cpu" else "wall time"
    axes[0].set(xlabel="ratio of visual tokens removed", ylabel=f"TTFT speedup vs dense ({which})",
                title="Prefill speed (error bars: 95% interval of the median ratio)")
    what = "peak memory of the prefill" if memory_key == "peak_memory_bytes" else "KV cache after the prefill"
    axes[1].set(xlabel="ratio of visual tokens removed", ylabel=f"{what} (MiB)", title="Memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else ("es" if noun.endswith("s") else "s"))


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
