"""The README is a front page whose claims hold: CI runs its test command, its two commands use their own venvs,
its support table is the generated one, its examples run, and it and the docs pages name only real extras and
every shipped config. (The docs site's own checks are in tests/test_docs.py.)"""
import importlib.metadata
import re
import sys
from pathlib import Path

import vtr

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))}
sys.path.insert(0, str(ROOT / "docs"))
import generate  # noqa: E402


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# test-command") + 1]
    assert command in README


def test_the_two_commands_use_their_own_venvs():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    venvs = [re.match(r"python3 -m venv (\S+) && \1/bin/pip install", line).group(1) for line in block.splitlines()]
    assert len(venvs) == 2 and len(set(venvs)) == 2, venvs


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 200
    first = python_blocks(README)[0]
    assert README.index("```python") < README.index("## Install")  # what vtr is and the snippet come first
    assert "vtr.patch(model" in first and len(first.splitlines()) <= 5


def test_readme_names_every_registered_method():
    for name in vtr.methods():
        assert f"`{name}`" in README, name


def test_readme_support_table_is_the_generated_one():
    table = README.split("<!-- support-short", 1)[1].split("-->\n", 1)[1].split("<!-- /support-short -->")[0]
    assert table == generate.support_short_md()


def test_readme_states_the_supported_transformers_range():
    requires = importlib.metadata.requires("vtr")
    spec = next(r for r in requires if r.startswith("transformers"))
    low, high = re.search(r">=([\d.]+)", spec).group(1), re.search(r"<([\d.]+)", spec).group(1)
    major, minor = high.split(".")[:2]
    assert f"transformers {low} to {major}.{int(minor) - 1}" in README


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
    """The README's tiny model and inputs, then the snippet at the top of the README, exactly as written."""
    blocks = python_blocks(README)
    first = blocks[0]
    tiny = next(b for b in blocks if "from vtr.testing import" in b)
    assert "vtr.patch(model" in first and "model.generate(**inputs)" in first
    namespace = {}
    exec(compile(tiny + "\n" + first, "README.md", "exec"), namespace)
    assert namespace["handle"].last.n_kept == [4] and namespace["handle"].last.n_visual == [64]
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert vtr.handle_of(namespace["model"]) is None  # handle.remove() ran


def test_docs_name_every_shipped_config_and_only_real_extras():
    from vtr.bench.cli import SHIPPED
    for page in ("docs/benchmarks.md", "docs/models.md"):
        for name in SHIPPED:
            assert f"`{name}`" in DOCS[page], (page, name)
    extras = set(importlib.metadata.metadata("vtr").get_all("Provides-Extra"))
    for name, text in {"README.md": README, **DOCS}.items():
        named = {e for group in re.findall(r'\.\[([a-z0-9,-]+)\]', text) for e in group.split(",")}
        assert named <= extras, (name, named - extras)


def test_readme_and_docs_links_point_at_files():
    """Relative links of the README and the hand-written pages name files that exist (mkdocs --strict checks the
    built site; this also covers the README, which the site does not include)."""
    generated = set(generate.pages())
    for name, text in {"README.md": README, **DOCS}.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            path = (base / target).resolve()
            relative = path.relative_to(ROOT / "docs").as_posix() if (ROOT / "docs") in path.parents else None
            assert path.exists() or relative in generated, (name, target)
