"""Hot-path kernels: fused Triton implementations on CUDA tensors, PyTorch references everywhere else.

``VTR_KERNELS=torch`` forces the references, ``VTR_KERNELS=triton`` forces Triton (on CPU this needs
``TRITON_INTERPRET=1`` set before vtr is imported); the default ``auto`` uses Triton for CUDA tensors when it is
installed. Both paths give the same selections; see ``reference.py`` for the semantics.
"""
from __future__ import annotations

import os

import torch

from . import reference

__all__ = ["attention_scores", "compaction_index", "gather_positions", "gather_rows", "greedy_maxmin",
           "pivot_least_similar", "backend"]


def backend(tensor) -> str:
    """'triton' or 'torch': which implementation runs for this tensor under the current ``VTR_KERNELS``."""
    mode = os.environ.get("VTR_KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"VTR_KERNELS must be auto, torch or triton, not {mode!r}")
    if mode == "torch":
        return "torch"
    from . import triton_ops
    if mode == "triton":
        if not triton_ops.AVAILABLE:
            raise RuntimeError("VTR_KERNELS=triton but triton is not importable")
        return "triton"
    return "triton" if triton_ops.AVAILABLE and tensor.is_cuda else "torch"


def _dispatch(name):
    ref = getattr(reference, name)

    def run(*args, **kwargs):
        first = next(a for a in args if hasattr(a, "is_cuda"))
        # The fused kernels compute in fp32; scores in another dtype (score_dtype="model") take the reference.
        if kwargs.get("dtype", torch.float32) == torch.float32 and backend(first) == "triton":
            kwargs.pop("dtype", None)
            from . import triton_ops
            fused = getattr(triton_ops, name, None)
            if fused is not None:
                return fused(*args, **kwargs)
        return ref(*args, **kwargs)

    run.__name__, run.__doc__ = name, ref.__doc__
    return run


compaction_index = _dispatch("compaction_index")
gather_rows = _dispatch("gather_rows")
gather_positions = _dispatch("gather_positions")
attention_scores = _dispatch("attention_scores")
greedy_maxmin = _dispatch("greedy_maxmin")
pivot_least_similar = _dispatch("pivot_least_similar")
