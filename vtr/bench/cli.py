"""What the command-line tools share before any model is built: the model names they accept, result file names,
the help format and a progress bar. Nothing here imports torch, so ``--help`` answers at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}
TINY_PREFIX = "tiny-"  # tiny-<family>: vtr.testing.tiny_model(<family>) and its offline processor


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (its examples)."""


def kind_of(name: str) -> str:
    """``"shipped"`` (a config in vtr/bench/configs), ``"config"`` (a config.json path), ``"tiny"``
    (``tiny-<family>``) or ``"checkpoint"`` (a hub id or a local checkpoint directory)."""
    if name in SHIPPED:
        return "shipped"
    if name.endswith(".json"):
        return "config"
    if name.startswith(TINY_PREFIX):
        return "tiny"
    return "checkpoint"


def model_slug(name: str) -> str:
    """A file-name stem that keeps the model's name: ``llava-1.5-7b`` stays ``llava-1.5-7b``,
    ``Qwen/Qwen2-VL-7B-Instruct`` becomes ``Qwen2-VL-7B-Instruct``, ``configs/my.json`` becomes ``my``."""
    if kind_of(name) == "config":
        return Path(name).name[:-len(".json")]
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return parts[-1] if parts else "model"


def refuse_without_processor(parser: argparse.ArgumentParser, name: str) -> None:
    """Tools that feed a real image need the model's processor; shipped configs and config.json files have none."""
    if kind_of(name) in ("shipped", "config"):
        parser.error(f"--model {name} is a bare config with no processor, and {parser.prog} needs one to turn the "
                     f"image into tokens. Use a checkpoint (hub id or directory) or a tiny random model with its "
                     f"offline processor, e.g. --model tiny-qwen2_vl (vtr-bench measures bare configs).")


def progress(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (the bench extra installs tqdm), or a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class Silent:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return Silent()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
