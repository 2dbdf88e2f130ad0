import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Offline, a small fixed KV cache (GiB), and one thread per process: the CI machine has 2 shared cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """family -> folder of its saved tiny model and processor; "clip" -> a tiny CLIP model (CDPruner's relevance)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in tiny.FAMILIES:
        tiny.build(family, root / family)
        out[family] = str(root / family)
    tiny.build_clip(root / "clip")
    out["clip"] = str(root / "clip")
    return out
