"""The README's test command is the one CI runs, and its examples name real methods and options."""
from pathlib import Path

import vtr

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# test-command") + 1]
    assert command in (ROOT / "README.md").read_text()


def test_readme_method_table_lists_every_registered_method():
    readme = (ROOT / "README.md").read_text()
    for name in vtr.methods():
        assert f"| `{name}` |" in readme


def python_blocks(text: str) -> list[str]:
    blocks, inside = [], None
    for line in text.splitlines():
        if inside is None and line.strip() == "```python":
            inside = []
        elif inside is not None and line.strip() == "```":
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_quickstart_without_weights_runs_the_first_snippet():
    """The Quickstart's tiny model and inputs, then the snippet at the top of the README, exactly as written."""
    blocks = python_blocks((ROOT / "README.md").read_text())
    first = blocks[0]
    tiny = next(b for b in blocks if "from vtr.testing import" in b)
    assert "vtr.patch(model" in first and "model.generate(**inputs)" in first
    namespace = {}
    exec(compile(tiny + "\n" + first, "README.md", "exec"), namespace)
    assert namespace["handle"].last.n_kept == [4] and namespace["handle"].last.n_visual == [64]
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert vtr.handle_of(namespace["model"]) is None  # handle.remove() ran


def test_readme_names_every_shipped_config_and_only_real_extras():
    import importlib.metadata
    import re

    from vtr.bench.cli import SHIPPED
    readme = (ROOT / "README.md").read_text()
    for name in SHIPPED:
        assert f"`{name}`" in readme
    extras = set(importlib.metadata.metadata("vtr").get_all("Provides-Extra"))
    named = {e for group in re.findall(r'\.\[([a-z0-9,-]+)\]', readme) for e in group.split(",")}
    assert named and named <= extras, named - extras
