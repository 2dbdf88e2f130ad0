"""How selection cost grows with the number of visual tokens, from one image (576) to a long video (32k): each
method's selection time and peak extra memory per size, and the dense language-model prefill next to it where a
CPU can run it in minutes.

    python -m vtr.bench.scaling                                     # Qwen2-VL-7B widths, 576 to 32768 tokens
    python -m vtr.bench.scaling --sizes 1x576,16x576 --methods divprune,dart --repeats 3
    python -m vtr.bench.scaling --prefill-sizes 1x576,4x576 --layers 2   # the dense prefill at those sizes too

Sizes are FRAMESxTOKENS: frames x visual tokens per frame (one frame = an image; Qwen-VL: a frame is a temporal
slice, 2 video frames). Selection is measured on synthetic signals at the model's widths
(``vtr.bench.synthetic``: the signals a stage computes, such as the last token's attention row, are computed
inside the timed call with vtr's kernels, as ``handle.last.selection_seconds`` counts them; the model's own
forward is not run), so a 32k-token video's selection can be timed without its prefill. Image-only methods are
measured on one image of the same token count. Peak extra memory: the growth of the process's peak resident
size during the call (CPU, Linux; reset before each call) or the CUDA allocator's peak above what was allocated.

The prefill columns (``--prefill-sizes``) run the real model (``--layers`` decoder layers and
``--vision-layers`` vision layers of the config, random weights) on a synthetic prompt with that video, dense,
and give its vision and language-model times (multiply the LLM time by depth / layers for the full model's order
of magnitude). ``--max-seconds`` bounds the run: a method whose one pass at a size is predicted (from the smaller
sizes, at least quadratic growth) to exceed it is not run there, and repeats stop before their total would.
Interleaved: every repeat runs every method once per size. Writes OUT.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cli

DEFAULT_SIZES = "1x576,4x576,16x576,64x256,128x256"  # 576, 2304, 9216, 16384, 32768 visual tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.scaling", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default="qwen2-vl-7b",
                   help="a shipped config (qwen2-vl-7b, qwen2.5-vl-7b, qwen3-vl-8b, ...), a config.json path, or "
                        "tiny-<family>: its widths for selection, its layers for the prefill (default: qwen2-vl-7b)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"comma-separated FRAMESxTOKENS (default: {DEFAULT_SIZES} = 576 to 32768 tokens)")
    p.add_argument("--methods", default="",
                   help="comma-separated method names (default: every registered method)")
    p.add_argument("--ratio", type=float, default=0.889, help="fraction of visual tokens removed (default: 0.889)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed passes per size (default: 3)")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="time budget per method and size: a size whose one pass is predicted to take longer is "
                        "skipped, and repeats stop before their total would exceed it (default: 120)")
    p.add_argument("--prefill-sizes", default="1x576",
                   help="sizes (FRAMESxTOKENS) at which the dense prefill is measured too; '' skips it "
                        "(default: 1x576)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers built for the prefill (default: 2)")
    p.add_argument("--vision-layers", type=int, default=1, help="vision layers built for the prefill (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", default="scaling", help="writes OUT.json (default: scaling)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr (default: show them)")
    return p


def spread(values: list[float]) -> float | None:
    """Half the range relative to the median (None for fewer than 2 values or a zero median)."""
    from .timing import median
    if len(values) < 2 or not median(values):
        return None
    return (max(values) - min(values)) / 2 / median(values)


def predict(history: list[tuple[int, float]], n: int) -> float | None:
    """Seconds one pass at ``n`` tokens is expected to take from the medians at smaller sizes: the last one grown
    by the measured exponent between the last two sizes, at least quadratically (a safe side for the quadratic
    methods, whose small-size times are dominated by fixed costs). None without a measurement."""
    if not history:
        return None
    n1, t1 = history[-1]
    exponent = 2.0
    if len(history) > 1:
        n0, t0 = history[-2]
        if t0 > 0 and t1 > 0 and n1 > n0:
            import math
            exponent = max(exponent, math.log(t1 / t0) / math.log(n1 / n0))
    return t1 * (n / n1) ** exponent


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    cli.check_names(parser, args.model, [m for m in args.methods.split(",") if m])
    from ..methods.registry import REGISTRY
    from . import models
    from .synthetic import Widths, measure
    from .timing import median
    try:
        sizes = [models.parse_video(s) for s in args.sizes.split(",") if s]
        prefill_sizes = [models.parse_video(s) for s in args.prefill_sizes.split(",") if s]
        methods = [m for m in args.methods.split(",") if m] or sorted(REGISTRY)
        for m in methods:
            if m not in REGISTRY:
                from ..methods import lookup
                lookup(m)  # the error names the registered methods
    except ValueError as error:
        parser.error(str(error))
    if cli.kind_of(args.model) == "tiny":
        from ..testing import tiny_model
        config = tiny_model(args.model[len(cli.TINY_PREFIX):])[0].config
    else:
        config = models.load_config(args.model)
    widths = Widths.of(config)

    # ---------------------------------------------------------------------------------------------- selection
    rows, active, history = [], list(methods), {m: [] for m in methods}  # history: (n, median seconds)
    for frames, per_frame in sorted(sizes, key=lambda s: s[0] * s[1]):
        n = frames * per_frame
        runs, skipped = {m: [] for m in active}, {}
        for m in active:
            guess = predict(history[m], n)
            if guess is not None and guess > args.max_seconds:
                skipped[m] = guess
        for rep in range(args.repeats):
            for m in active:
                done = [r["seconds"] for r in runs[m] if "error" not in r]
                if m in skipped or (done and sum(done) + done[-1] > args.max_seconds) or \
                        (runs[m] and "error" in runs[m][0]):
                    continue  # predicted past the limit, or another pass would exceed it
                result = measure(m, args.ratio, widths, frames, per_frame, args.device, seed=rep)
                runs[m].append(result)
                say(f"{frames}x{per_frame} ({n} tokens) {m}: " + (result["error"] if "error" in result else
                    f"{result['seconds'] * 1e3:.1f} ms"))
        for m in list(active):
            row = {"method": m, "frames": frames, "per_frame": per_frame, "n": n}
            ok = [r for r in runs[m] if "error" not in r]
            if m in skipped:
                row["skipped_predicted_s"] = skipped[m]
                active.remove(m)
            elif not ok:
                row["error"] = runs[m][0]["error"]
                active.remove(m)
            else:
                seconds = [r["seconds"] for r in ok]
                peaks = [r["peak_extra_bytes"] for r in ok if r["peak_extra_bytes"] is not None]
                row.update(seconds=median(seconds), seconds_all=seconds, spread=spread(seconds), kept=ok[0]["kept"],
                           peak_extra_bytes=max(peaks) if peaks else None)
                history[m].append((n, row["seconds"]))
            rows.append(row)

    # ---------------------------------------------------------------------------------------------- prefill
    prefill = []
    if prefill_sizes:
        from .grid import Config, run_grid
        tiny = cli.kind_of(args.model) == "tiny"
        model, _ = models.load(args.model, layers=None if tiny else args.layers,
                               vision_layers=None if tiny else args.vision_layers, device=args.device)
        for frames, per_frame in prefill_sizes:
            say(f"dense prefill, {frames}x{per_frame} ...")
            inputs = models.synthetic_inputs(model, video=(frames, per_frame)) if frames > 1 else \
                models.synthetic_inputs(model, image_size=_image_side(config, per_frame))
            dense = run_grid(model, inputs, [Config("dense")], args.repeats, warmup=1, decode_tokens=0,
                             progress=False)[0]
            prefill.append({"frames": frames, "per_frame": per_frame, "n": frames * per_frame,
                            "llm_s": dense["llm_s"], "vision_s": dense["vision_s"]})

    result = {"environment": models.environment(), "settings": vars(args), "widths": widths.__dict__,
              "selection": rows, "prefill": prefill}
    print(describe(result))
    print(format_table(result))
    out = Path(f"{args.out}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return result


def _image_side(config, tokens: int) -> int:
    """Qwen-VL: the image side in pixels that gives ``tokens`` merged tokens (a square number)."""
    vision = config.vision_config
    side = int(tokens ** 0.5)
    return side * vision.patch_size * vision.spatial_merge_size


def describe(result: dict) -> str:
    s, w, env = result["settings"], result["widths"], result["environment"]
    return (f"{s['model']} widths (hidden {w['hidden']}, {w['heads']} heads / {w['kv_heads']} kv x {w['head_dim']}), "
            f"ratio {s['ratio']}, medians of {s['repeats']} interleaved passes on {s['device']} "
            f"({env['gpu'] or env['cpu']}, {env['cpu_threads']} threads)")


def format_table(result: dict) -> str:
    rows = [r for r in result["selection"]]
    sizes = sorted({(r["frames"], r["per_frame"], r["n"]) for r in rows}, key=lambda s: s[2])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["n"]): r for r in rows}
    head = f"{'selection ms (+-%) / peak MB':<30}" + "".join(f"{f'{f}x{t} = {n}':>24}" for f, t, n in sizes)
    lines = [head, "-" * len(head)]
    for m in methods:
        cells = []
        for _, _, n in sizes:
            r = by.get((m, n))
            if r is None:
                cells.append("-")
            elif "skipped_predicted_s" in r:
                cells.append(f"skipped (~{r['skipped_predicted_s']:.0f} s)")
            elif "error" in r:
                cells.append("n/a")
            else:
                pm = "" if r["spread"] is None else f" +-{r['spread'] * 100:.0f}%"
                mb = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
                cells.append(f"{r['seconds'] * 1e3:.0f}{pm} / {mb}")
        lines.append(f"{m:<30}" + "".join(f"{c:>24}" for c in cells))
    pre = {p["n"]: p for p in result["prefill"]}
    if pre:
        label = f"dense LLM prefill ({result['settings']['layers']} layers)"
        cells = [f"{pre[n]['llm_s'] * 1e3:.0f}" if n in pre else "-" for _, _, n in sizes]
        lines.append(f"{label:<30}" + "".join(f"{c:>24}" for c in cells))
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"{r['method']}: not measured ({r['error']})")
    lines.append("skipped (~N s): not run, one pass predicted to take N s > --max-seconds from the smaller sizes "
                 "(at least quadratic growth). Passes at a size stop before their total would exceed --max-seconds. "
                 "Peak MB: the selection's extra memory (growth of the process's peak resident size on CPU).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
