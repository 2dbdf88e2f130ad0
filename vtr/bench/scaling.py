"""How selection cost grows with the number of visual tokens: one model, one image of growing size (one span of
``n`` visual tokens, as a long video is for a per-video method), each method's selection time next to the dense
language-model prefill, interleaved repeats.

    python -m vtr.bench.scaling                                  # Qwen2-VL-7B widths, 576 to 5184 tokens
    python -m vtr.bench.scaling --sizes 672,1344 --methods divprune --repeats 3

The language model is built with ``--layers`` decoder layers (default 2; layer methods prune before layer 1), so
the prefill column is the cost of that many layers: multiply by depth / layers for the full model's order of
magnitude (attention grows faster than linearly). Selection time is what ``handle.last.selection_seconds``
reports. Writes OUT.json.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.scaling", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default="qwen2-vl-7b",
                   help="a shipped Qwen-VL config (qwen2-vl-7b, qwen2.5-vl-7b, qwen3-vl-8b) or tiny-qwen2_vl "
                        "(default: qwen2-vl-7b)")
    p.add_argument("--sizes", default="672,1344,2016",
                   help="image sides in pixels; Qwen-VL gives (side / 28)^2 visual tokens (default: 672,1344,2016 "
                        "= 576, 2304, 5184 tokens)")
    p.add_argument("--methods", default="random,divprune,fastv,dart",
                   help="comma-separated method names (default: random,divprune,fastv,dart)")
    p.add_argument("--ratio", type=float, default=0.889, help="fraction of visual tokens removed (default: 0.889)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers built (default: 2)")
    p.add_argument("--vision-layers", type=int, default=1, help="vision layers built (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed passes per size (default: 3)")
    p.add_argument("--out", default="scaling", help="writes OUT.json (default: scaling)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from . import models
    from .grid import Config, run_grid
    methods = [m for m in args.methods.split(",") if m]
    tiny = args.model.startswith("tiny-")  # a tiny random model (tests): its own depth
    model, _ = models.load(args.model, layers=None if tiny else args.layers,
                           vision_layers=None if tiny else args.vision_layers)
    grid = [Config("dense")] + [Config("method", m, {"ratio": args.ratio},
                                       {"layer": 1} if m in ("fastv", "dart") else {}) for m in methods]
    rows = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        inputs = models.synthetic_inputs(model, image_size=size)
        results = run_grid(model, inputs, grid, args.repeats, warmup=0, decode_tokens=0, progress=not args.quiet)
        dense = next(r for r in results if r["kind"] == "dense")
        row = {"size": size, "n_visual": None, "dense_llm_s": dense["llm_s"], "dense_vision_s": dense["vision_s"],
               "selection_s": {}, "llm_s": {}}
        for r in results:
            if r["kind"] == "method":
                row["n_visual"] = r["n_visual"][0]
                row["selection_s"][r["method"]] = r["selection_s"]
                row["llm_s"][r["method"]] = r["llm_s"]
        rows.append(row)
    depth = len(model.model.language_model.layers)
    print(f"{args.model}, {depth} decoder layers, ratio {args.ratio}, medians of {args.repeats} interleaved "
          f"passes ({models.environment()['cpu']}); ms")
    head = f"{'visual tokens':>13} {'dense LLM':>10}" + "".join(f"{m + ' sel':>14}{m + ' LLM':>14}" for m in methods)
    print(head)
    for row in rows:
        print(f"{row['n_visual']:>13} {row['dense_llm_s'] * 1e3:>10.0f}" +
              "".join(f"{row['selection_s'][m] * 1e3:>14.1f}{row['llm_s'][m] * 1e3:>14.0f}" for m in methods))
    result = {"environment": models.environment(), "settings": vars(args), "rows": rows}
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}.json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
