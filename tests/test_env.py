"""python -m vtr.env: every part is reported with its version and whether it imports and works."""
import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch
import transformers

from vtr import compat, env


def test_report_runs_as_a_command_and_names_every_part():
    run = subprocess.run([sys.executable, "-m", "vtr.env"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = {line.split()[0]: line for line in run.stdout.splitlines()[1:] if line.strip()}
    for name in ("python", "vtr", "torch", "transformers", "torchvision", "triton", "flash-attn", "decord", "av",
                 "attention"):
        assert name in lines, f"no {name} line in:\n{run.stdout}"
    assert torch.__version__ in lines["torch"] and transformers.__version__ in lines["transformers"]
    assert "eager: usable" in lines["attention"] and "sdpa: usable" in lines["attention"]


def test_json_report_matches_the_checks():
    run = subprocess.run([sys.executable, "-m", "vtr.env", "--json"], capture_output=True, text=True, timeout=300)
    data = json.loads(run.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["torch"]["ok"] is True and checks["torch"]["version"] == torch.__version__
    assert set(data["attention"]) == set(compat.ATTENTION_BACKENDS)
    if not torch.cuda.is_available():
        assert data["attention"]["flash_attention_2"].startswith("no")


def test_a_torchvision_that_imports_but_whose_operators_are_missing_is_reported(monkeypatch):
    """The broken pair (a CUDA torchvision beside the CPU torch) fails on its first operator."""
    def nms(*args):
        raise RuntimeError("operator torchvision::nms does not exist")
    fake = types.SimpleNamespace(__version__="0.28.0", ops=types.SimpleNamespace(nms=nms))
    real_import = env._import
    monkeypatch.setattr(env, "_import", lambda name: fake if name == "torchvision" else real_import(name))
    check = env.check_torchvision()
    assert check.ok is False and check.version == "0.28.0"
    assert "nms operator fails: RuntimeError: operator torchvision::nms does not exist" in check.detail


def test_a_torchvision_that_fails_to_import_is_reported(monkeypatch):
    def broken(name):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return env.importlib.import_module(name)
    monkeypatch.setattr(env, "_import", broken)
    check = env.check_torchvision()
    assert check.ok is False and "import fails: RuntimeError" in check.detail


def test_missing_optional_parts_are_not_failures(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    monkeypatch.setattr(env, "_import", missing)
    for check in (env.check_torchvision(), env.check_flash_attn(False), env.check_decord(None)):
        assert check.ok is None and check.detail.startswith("not installed")


def test_flash_attention_is_not_usable_without_a_gpu():
    checks = {"torch": env.Check("torch", "x", True, ""), "transformers": env.Check("transformers", "5.23", True, ""),
              "flash-attn": env.Check("flash-attn", "2.8", None, "")}
    assert env.attention_backends(checks, cuda=False)["flash_attention_2"] == "no (needs a CUDA GPU)"
    checks["flash-attn"] = env.Check("flash-attn", "2.8", True, "")
    assert env.attention_backends(checks, cuda=True)["flash_attention_2"] == "usable"
    checks["transformers"] = env.Check("transformers", "5.23", False, "model classes fail to import: ...")
    backends = env.attention_backends(checks, cuda=False)
    assert set(backends.values()) == {"no (transformers' model classes do not import)"}


@pytest.mark.video
def test_the_video_stack_checks_ok_where_it_is_installed(tmp_path):
    """In the cpu-video install (CI's video step) torchvision's operators, PyAV and decord all work."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (the cpu-video extra installs it)")
    assert env.check_torchvision().ok is True
    clip = str(tmp_path / "clip.mp4")
    assert env.check_av(clip).ok is True
    if importlib.util.find_spec("decord") is not None:
        assert env.check_decord(clip).ok is True
