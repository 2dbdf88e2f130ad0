"""What the command-line tools share before any model is built: the model names they accept, result file names,
the help format and a progress bar. Nothing here imports torch, so ``--help`` answers at once."""
from __future__ import annotations

import argparse
import ast
import difflib
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}
TINY_PREFIX = "tiny-"  # tiny-<family>: vtr.testing.tiny_model(<family>) and its offline processor
TINY_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                 "internvl", "gemma3", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")  # vtr.testing's
METHODS_DIR = Path(__file__).resolve().parent.parent / "methods"


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


def method_options() -> dict[str, set[str]]:
    """Registered method name -> its option names, read from the method files' source (no torch import; a test
    checks it equals ``vtr.methods()`` and the dataclasses' fields). The base options (ratio, keep, positions, ...)
    are included."""
    trees = {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(METHODS_DIR.glob("*.py"))}

    def fields(cls: ast.ClassDef) -> set[str]:
        return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                and "ClassVar" not in ast.unparse(s.annotation)}

    classes = {node.name: node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    out = {}
    for cls in classes.values():
        if not any(ast.unparse(d) == "register" for d in cls.decorator_list):
            continue
        name = next((s.value.value for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                     and s.target.id == "name" and isinstance(s.value, ast.Constant)), None)
        options, base = fields(cls), [ast.unparse(b) for b in cls.bases]
        while base and base[0] in classes:  # inherited options (Method's ratio, keep, positions, ...)
            options |= fields(classes[base[0]])
            base = [ast.unparse(b) for b in classes[base[0]].bases]
        out[name] = options
    return out


def check_names(parser: argparse.ArgumentParser, model: str | None = None, methods: list[str] = (),
                options: dict | None = None, files: dict | None = None) -> None:
    """Refuse, before torch is imported or a model is built, an unknown tiny model, an unknown method (with close
    matches), an option (``--set``) that none of ``methods`` has, and a missing input file (``files``: flag ->
    path). Exits through ``parser.error``."""
    if model is not None and kind_of(model) == "tiny" and model[len(TINY_PREFIX):] not in TINY_FAMILIES:
        parser.error(f"unknown tiny model {model!r}; choose from {', '.join(TINY_PREFIX + f for f in TINY_FAMILIES)}")
    known = method_options()
    for method in methods:
        if method not in known:
            close = difflib.get_close_matches(method, list(known), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            parser.error(f"unknown method {method!r}.{hint} Registered methods: {', '.join(sorted(known))}")
    unknown = sorted(set(options or {}) - set().union(*(known[m] for m in methods))) if methods else []
    if unknown:
        parser.error(f"--set {', '.join(unknown)}: no option of that name in {', '.join(methods)}")
    for flag, path in (files or {}).items():
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file")
