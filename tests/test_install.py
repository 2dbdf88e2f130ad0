"""The README's install lines resolve to a torch/torchvision pair that loads together, and combinations that
would not are refused by pip at install time. These are pip dry runs against the package index (about a minute);
they run when VTR_INSTALL_CHECKS=1, as in CI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.environ.get("VTR_INSTALL_CHECKS") != "1",
                                reason="pip dry runs against the package index; set VTR_INSTALL_CHECKS=1")


def resolve(extras: str, tmp_path, fresh: bool = True):
    """(pip's exit code, {package: version} it would install, its stderr) for ``pip install ROOT[extras]``, as in an
    empty environment when ``fresh``, else beside what this interpreter has installed."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
               f"{ROOT}[{extras}]"] + (["--ignore-installed"] if fresh else [])
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        return run.returncode, {}, run.stderr
    installs = json.loads(report.read_text())["install"]
    return 0, {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}, ""


@pytest.mark.parametrize("extras,torch,torchvision", [
    ("cpu,bench", "2.13.0", None),          # the README's first command
    ("cpu,video", "2.13.0", None),          # decoders beside the CPU torch; no torchvision that could not load
    ("cpu-video", "2.14.1", "0.29.1"),      # transformers' video processors: the pair that loads together
])
def test_cpu_install_lines_resolve_to_a_working_pair(extras, torch, torchvision, tmp_path):
    code, versions, stderr = resolve(extras, tmp_path)
    assert code == 0, stderr[-3000:]
    assert versions["torch"].startswith(torch)
    assert versions.get("torchvision") == torchvision
    if "video" in extras:
        assert "av" in versions and "decord" in versions


@pytest.mark.parametrize("extras", ["cpu,cpu-video", "cpu,eval"])
def test_combinations_that_would_break_torchvision_are_refused(extras, tmp_path):
    code, _, stderr = resolve(extras, tmp_path)
    assert code != 0 and "ResolutionImpossible" in stderr


def test_video_extra_keeps_the_installed_torch(tmp_path):
    import torch
    if torch.version.cuda is not None:
        pytest.skip("checks the CPU build of torch; this interpreter has a CUDA build")
    code, versions, stderr = resolve("video", tmp_path, fresh=False)
    assert code == 0, stderr[-3000:]
    assert "torch" not in versions and "torchvision" not in versions
