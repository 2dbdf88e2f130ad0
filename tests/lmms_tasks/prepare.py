"""Writes what the local lmms-eval task needs to run offline: ``data/mc.parquet`` next to ``vtr_mc.yaml`` (four
random images with a four-way question each) and, with ``--model FAMILY``, a tiny random model of that family with
its processor saved to ``--out`` (``vtr.testing.tiny_model``), so that ``lmms-eval --include_path tests/lmms_tasks
--tasks vtr_mc`` runs without a network. The commands are in docs/evaluation.md.

    python tests/lmms_tasks/prepare.py --model qwen2_vl --out tiny-qwen2_vl
"""
from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = [(64, 64), (48, 80), (64, 48), (40, 64)]


def write_data(folder: Path = HERE) -> Path:
    """``folder/data/mc.parquet``: the multiple-choice documents of ``vtr_mc.yaml``."""
    import datasets

    from vtr.testing import random_image
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    features = datasets.Features({"question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    path = folder / "data" / "mc.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"question": ["what is in this image ?"] * len(images),
                                "choices": [["cat", "dog", "red", "blue"]] * len(images),
                                "answer": ["ABCD"[i] for i in range(len(images))], "image": images},
                               features=features).to_parquet(path)
    return path


def save_tiny_model(family: str, out: Path) -> Path:
    from vtr.testing import tiny_model
    model, processor = tiny_model(family)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a tiny family to save, e.g. qwen2_vl (default: none)")
    p.add_argument("--out", default=None, help="where to save the tiny model (default: tiny-<family>)")
    args = p.parse_args(argv)
    print(f"wrote {write_data()}")
    if args.model:
        print(f"saved {save_tiny_model(args.model, Path(args.out or f'tiny-{args.model}'))}")


if __name__ == "__main__":
    main()
