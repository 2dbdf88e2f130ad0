"""Offline accuracy canary: every registered method's accuracy against the fraction of visual tokens kept, on a
tiny trained LLaVA-1.5 and a synthetic task whose answer sits in 1 to 4 of 64 visual tokens (``canary_task``).

    python -m vtr.bench.canary                       # writes canary.json and canary.png in the current directory
    python -m vtr.bench.canary --samples 128 --kept 0.25 --methods random,divprune

Each answer is scored by one forward pass: the argmax of the last position's logits over the colour words (the
model was trained the same way). In the same run: ``dense`` (the unpatched model), ``random`` (a registered
method), and two oracles that read the generator's ground truth: ``oracle-informative`` keeps the tokens the
colour square overlaps, then background; ``oracle-background`` keeps only background tokens. A correct method
stays between them; a selection bug (wrong slots, shuffled positions, kept indices mapped to the wrong image)
shows as accuracy near or below ``random``. Pre-LLM methods run under both position policies (``original``
keeps the kept tokens' RoPE positions, ``compact`` renumbers them), since the policy changes accuracy; layer
methods prune before layer 1 of the 2-layer model and keep their positions, as their official code does. A
fraction a method cannot reach on the 2-layer tower (ToMe merges at most half of the tokens in its one merging
layer) has no point (None in the JSON, "-" in the table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from . import cli

KEPT = (1.0, 0.5, 0.25, 0.125, 0.0625)
# Options that fit the canary's model: a 2-layer LM (layer methods prune before layer 1, multi-stage ones once), a
# 2-layer CLIP tower (HiPrune's object layer), no CLIP text tower on disk (CDPruner uses the LM's embeddings of the
# instruction).
OPTIONS = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "pdrop": {"layers": "1"}, "sparsevlm": {"layers": "1"},
           "hiprune": {"object_layer": 1}, "cdpruner": {"relevance": "embeddings"}}


def configurations(methods: list[str]) -> list[tuple[str, str, dict]]:
    """``(label, method name, options)`` for each curve: pre-LLM methods once per position policy."""
    from ..methods import REGISTRY, Stage
    configs = []
    for name in methods:
        options = OPTIONS.get(name, {})
        if REGISTRY[name].stage is Stage.PRE_LLM:
            configs += [(f"{name} ({p})", name, {**options, "positions": p}) for p in ("compact", "original")]
        else:
            configs.append((name, name, options))
    return configs


def run(methods: list[str], kept: tuple[float, ...] = KEPT, n: int = 256, seed: int = 10**6 + 1,
        batch: int = 64, weights: str | None = None, progress: bool = False) -> dict:
    """Accuracy per curve and kept fraction on ``n`` held-out samples (seed ``seed``).

    Returns ``{"chance", "dense", "curves": {label: {"kept": [...], "accuracy": [...], "mean_kept_tokens": [...]}},
    "refused": {method: reason}}`` (methods whose ``vtr.patch`` refuses the canary's model)
    with ``kept`` the requested fractions of the 64 visual tokens (the methods' own rounding gives the counts in
    ``mean_kept_tokens``); a fraction a layer-averaged method cannot reach on the 2-layer model (below 1/2 for
    PyramidDrop and SparseVLM, whose layer 0 runs on every token) has ``None`` in both. Raises ``ValueError`` for
    an unknown method."""
    import torch

    import vtr

    from . import canary_task as task
    from ..methods import lookup
    for name in methods:
        lookup(name)
    model, processor = task.load(weights or task.WEIGHTS)
    images, answers, informative = task.samples(n, seed)
    batches = [(task.inputs(images[i:i + batch], processor), answers[i:i + batch],
                torch.from_numpy(informative[i:i + batch])) for i in range(0, n, batch)]
    colours = task.answer_ids(processor)

    def accuracy(handle=None):
        right, kept_tokens = 0, 0
        for inputs, truth, marks in batches:
            if handle is not None and hasattr(handle.method, "informative"):
                handle.method.informative = marks
            with torch.no_grad():
                logits = model(**inputs).logits[:, -1, colours]
            right += int((logits.argmax(-1).numpy() == truth).sum())
            kept_tokens += sum(handle.last.n_kept) if handle is not None else task.GRID ** 2 * len(truth)
        return right / n, kept_tokens / n

    Oracle = task.Oracle
    curves, refused = [], {}
    for label, name, options in configurations(methods):
        try:  # a method may refuse the canary's tiny model (FlowCut: no vision layer below the feature layer)
            vtr.patch(model, name, ratio=0.5, **options).remove()
            curves.append((label, name, options))
        except ValueError as error:
            refused[name] = str(error)
    curves += [("oracle-informative", Oracle, {"background": False, "positions": "compact"}),
               ("oracle-background", Oracle, {"background": True, "positions": "compact"})]
    bar = cli.progress(len(curves) * len(kept), progress, "canary")
    report = {"chance": 1 / len(task.COLOURS), "n": n, "dense": accuracy()[0], "curves": {}, "refused": refused}
    try:
        for label, method, options in curves:
            curve = report["curves"][label] = {"kept": [], "accuracy": [], "mean_kept_tokens": []}
            for fraction in kept:
                budget = {"ratio": 1 - fraction} if fraction < 1 else {"ratio": 0.0}
                instance = method(**budget, **options) if not isinstance(method, str) else None
                try:
                    with (vtr.patch(model, instance) if instance else
                          vtr.patch(model, method, **budget, **options)) as h:
                        acc, mean_kept = accuracy(h)
                except ValueError as error:  # a layer-averaged budget out of the 2-layer model's reach: no point
                    if "cannot reach" not in str(error):
                        raise
                    acc = mean_kept = None
                curve["kept"].append(fraction)
                curve["accuracy"].append(acc)
                curve["mean_kept_tokens"].append(mean_kept)
                bar.update(1)
    finally:
        bar.close()
    return report


def table(report: dict) -> str:
    """The report as a text table: one row per curve, one column per kept fraction."""
    kept = next(iter(report["curves"].values()))["kept"]
    head = f"{'accuracy (n=' + str(report['n']) + ')':<30}" + "".join(f"{f'kept {k:g}':>12}" for k in kept)
    lines = [head, f"{'dense':<30}" + f"{report['dense']:>12.3f}" * len(kept),
             f"{'chance':<30}" + f"{report['chance']:>12.3f}" * len(kept)]
    for label, curve in report["curves"].items():
        lines.append(f"{label:<30}" + "".join(f"{'-':>12}" if a is None else f"{a:>12.3f}"
                                              for a in curve["accuracy"]))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Accuracy against the kept fraction (log scale), dense and chance as horizontal lines; needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    methods = list(dict.fromkeys(label.split(" ")[0] for label in report["curves"]))
    for label, curve in report["curves"].items():  # one colour per method: solid compact, dotted original
        style = ":" if "original" in label else ("--" if label.startswith("oracle") else "-")
        colour = plt.cm.tab20(methods.index(label.split(" ")[0]) % 20)
        points = [(k, a) for k, a in zip(curve["kept"], curve["accuracy"]) if a is not None]
        if points:
            ax.plot(*zip(*points), style, color=colour, marker="o", markersize=3, label=label)
    ax.axhline(report["dense"], color="black", linewidth=1.5, label="dense")
    ax.axhline(report["chance"], color="grey", linewidth=1, linestyle="-.", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fraction of the 64 visual tokens kept")
    ax.set_ylabel(f"accuracy ({report['n']} held-out samples)")
    ax.set_title("vtr accuracy canary: tiny trained LLaVA-1.5, colour of a square in 1-4 of 64 patches")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.canary", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated method names (default: every registered method)")
    p.add_argument("--kept", default=",".join(map(str, KEPT)),
                   help=f"comma-separated fractions of visual tokens kept (default: {','.join(map(str, KEPT))})")
    p.add_argument("--samples", type=int, default=256, help="held-out samples (default: 256)")
    p.add_argument("--weights", default=None, help="a safetensors file (default: the shipped weights)")
    p.add_argument("--out", default="canary", help="writes OUT.json and OUT.png (default: canary)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_names(parser, methods=[m for m in args.methods.split(",") if m])
    from ..methods import REGISTRY
    methods = [m for m in args.methods.split(",") if m] or sorted(REGISTRY)
    kept = tuple(float(k) for k in args.kept.split(",") if k)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # before minutes of evaluation, not after
    report = run(methods, kept, args.samples, weights=args.weights, progress=not args.quiet)
    print(table(report))
    with open(f"{args.out}.json", "w") as f:
        json.dump(report, f, indent=1)
    try:
        plot(report, f"{args.out}.png")
        print(f"wrote {args.out}.json and {args.out}.png")
    except ImportError:
        print(f"wrote {args.out}.json (no plot: matplotlib is not installed)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
