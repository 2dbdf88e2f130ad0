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
