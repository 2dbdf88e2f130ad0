"""Every registered method against its stage-correct ideal, in one run: the per-method speed table.

    python -m vtr.bench.methods --out benchmarks/results --tag cpu-methods     # the table in docs/benchmarks.md
    python -m vtr.bench.methods --tiny --repeats 1 --warmup 0                  # the harness on tiny models, seconds

Each method is measured by the speed benchmark (``vtr.bench.speed``) on the model and input its official code
targets, with the shipped configs' CPU shape (``--preset full-depth``: every decoder and vision layer at a quarter
of the width, so selection and the tower's signals weigh what they weigh in the real model): the image methods
on LLaVA-1.5-7B (one 336 px image, 576 tokens), the video methods on Qwen2-VL-7B with a synthetic video
(``--video``, default 8 temporal slices of 144 tokens), VFlowOpt on LLaVA-OneVision-7B (one anyres image). Each
group is one ``vtr-bench`` run (dense, then each method and its ideal at each ratio, interleaved), in process CPU
time with one thread on CPU (``--clock cpu``: what other work on a shared machine distorts least), so every ratio
pairs runs of the same pass. CDPruner's relevance is the language model's embeddings (``relevance=embeddings``:
the CLIP text tower it uses on LLaVA by default is a checkpoint this offline tool does not load; the DPP is the
same).

Writes ``OUT/TAG-<group>.json`` and ``.png`` per group (the speed benchmark's files, rewritten after every pass, so
a stopped run keeps what it measured), then ``OUT/TAG.json`` (every method's row) and ``OUT/TAG.md`` (the
table), and prints the table. The default run is 10 passes of about 450 s of CPU time each (prefills, on the
2-core machine under load: 223 s for the video group and 91 s for OneVision, measured in one pass each; about
120 s for the image group, from its dense, DivPrune and DART rows; plus one decoding step per row), so 60 to 90
minutes with one thread (``--repeats`` scales it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import cli

# (group, model, extra vtr-bench arguments, methods): every registered method once
GROUPS = [
    ("image", "llava-1.5-7b", [], ["random", "uniform", "divprune", "cdpruner", "fastv", "dart", "pdrop",
                                   "sparsevlm", "vispruner", "visionzip", "fastervlm", "hiprune", "flowcut",
                                   "tome", "prumerge", "mustdrop"]),
    ("video", "qwen2-vl-7b", ["--video", "{video}"], ["dycoke", "holitom", "framefusion", "prunevid", "fastvid",
                                                      "evs", "vidcom2"]),
    ("onevision", "llava-onevision-7b", [], ["vflowopt"]),
]
TINY = {"llava-1.5-7b": "tiny-llava", "qwen2-vl-7b": "tiny-qwen2_vl", "llava-onevision-7b": "tiny-llava_onevision"}
OPTIONS = ["relevance=embeddings"]  # cdpruner's only (checked: no other method has the option)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.methods", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--ratios", default=None,
                   help="comma-separated fractions of visual tokens removed (default: 0.778,0.889; --tiny: 0.5, "
                        "which the layer-averaged schedules reach on the tiny models' 4 layers)")
    p.add_argument("--repeats", type=int, default=9, help="timed passes per group (default: 9)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per group first (default: 1)")
    p.add_argument("--video", default="8x144",
                   help="the video groups' synthetic video, FRAMESxTOKENS (default: 8x144; --tiny: 3x16)")
    p.add_argument("--groups", default=",".join(g[0] for g in GROUPS),
                   help="groups to run (default: all: " + ", ".join(g[0] for g in GROUPS) + ")")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random models instead of the shipped configs: checks the run, measures nothing "
                        "(default: off)")
    p.add_argument("--decode-tokens", type=int, default=1,
                   help="greedy steps timed after each prefill (the table compares prefills) (default: 1)")
    p.add_argument("--out", default="results", help="directory for the files (default: ./results)")
    p.add_argument("--tag", default="methods", help="file name stem (default: methods)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (default: show it)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from . import speed
    wanted = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(wanted) - {g[0] for g in GROUPS})
    if unknown:
        build_parser().error(f"unknown group {', '.join(unknown)}; choose from {', '.join(g[0] for g in GROUPS)}")
    started = time.time()
    out = Path(args.out)
    groups, rows = {}, []
    for name, model, extra, methods in GROUPS:
        if name not in wanted:
            continue
        video = "3x16" if args.tiny and args.video == "8x144" else args.video
        ratios = args.ratios or ("0.5" if args.tiny else "0.778,0.889")
        argv = ["--model", TINY[model] if args.tiny else model, "--methods", ",".join(methods),
                "--ratios", ratios, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                "--decode-tokens", str(args.decode_tokens), "--clock", "cpu" if not _cuda() else "wall",
                "--out", str(out), "--tag", f"{args.tag}-{name}"]
        argv += [a.format(video=video) for a in extra]
        if "cdpruner" in methods:
            argv += [x for option in OPTIONS for x in ("--set", option)]
        if args.quiet:
            argv.append("--quiet")
        if not args.quiet:
            print(f"[{name}] vtr-bench {' '.join(argv)}", file=sys.stderr, flush=True)
        result = speed.run(argv)
        groups[name] = {"argv": argv, "title": speed.describe_run(result), "file": f"{args.tag}-{name}.json"}
        rows += [dict(_summary(r), group=name, model=argv[1]) for r in result["results"] if r["kind"] == "method"]
    summary = {"groups": groups, "rows": rows, "tiny": args.tiny, "wall_seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1, default=str))
    table = format_table(summary)
    (out / f"{args.tag}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.md')} ({summary['wall_seconds']} s)")
    return summary


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _summary(row: dict) -> dict:
    cpu = row.get("ttft_cpu_vs_ideal") is not None
    prefix = "ttft_cpu" if cpu else "ttft"
    return {"method": row["method"], "ratio": row.get("ratio"), "options": row["options"],
            "kept": sum(row["n_kept"]), "visual": sum(row["n_visual"]), "clock": "cpu" if cpu else "wall",
            "vs_ideal": row.get(f"{prefix}_vs_ideal"), "vs_ideal_pm": row.get(f"{prefix}_vs_ideal_spread"),
            # the method's time over its ideal's (1.03: 3% slower), the reciprocal of the harness's xideal
            "over_ideal": 1 / row[f"{prefix}_vs_ideal"] if row.get(f"{prefix}_vs_ideal") else None,
            "vs_dense": row.get(f"{prefix}_speedup_vs_dense"),
            "vs_dense_pm": row.get(f"{prefix}_speedup_spread"),
            "ttft_s": row.get(f"{prefix}_s"), "selection_s": row["selection_s"], "stages": row["stages"]}


def format_table(summary: dict) -> str:
    """Markdown: one row per method and ratio; "time / ideal" is the method's TTFT over its ideal's (1.00 = as
    fast as the ideal, 1.03 = 3% slower), ± the 95% interval of that median ratio."""
    lines = []
    for name, group in summary["groups"].items():
        lines.append(f"- {name}: {group['title']} (`{group['file']}`)")
    lines += ["", "| method | model | ratio | kept / visual | time / ideal | ± | speedup vs dense | ± | "
                  "selection (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary["rows"], key=lambda r: (r["method"], r["ratio"] or 0)):
        lines.append(f"| {r['method']} | {r['model']} | {r['ratio']} | {r['kept']} / {r['visual']} | "
                     f"{_x(r['over_ideal'])} | {_pm(r['vs_ideal_pm'])} | {_x(r['vs_dense'])} | "
                     f"{_pm(r['vs_dense_pm'])} | {r['selection_s'] * 1e3:.1f} |")
    if summary.get("tiny"):
        lines.append("")
        lines.append("Tiny random models: these numbers check the run and say nothing about speed.")
    return "\n".join(lines)


def _x(v):
    return "-" if v is None else f"{v:.2f}"


def _pm(v):
    return "-" if v is None else f"{v * 100:.0f}%"


if __name__ == "__main__":
    main()
