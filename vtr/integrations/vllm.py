"""vLLM plugin: vtr's pre-LLM methods inside vLLM's multimodal pruning interface.

Loaded by vLLM in every process (API server, engine core, workers) through the ``vllm.general_plugins`` entry
point that ``pip install vtr[vllm]`` registers; configured without code:

* environment variables ``VTR_METHOD`` (``random``, ``uniform``, ``divprune``), ``VTR_RATIO`` (fraction of each
  image's or video's visual tokens removed, in [0, 1)) or ``VTR_KEEP`` (tokens kept per image or video), and
  ``VTR_OPTIONS`` (the method's options as a JSON object, e.g. ``{"seed": 1}``);
* or, per model, vLLM's ``hf_overrides``: ``{"vtr": {"method": "divprune", "ratio": 0.9}}`` (other keys are the
  method's options), which wins over the environment.

Without either, every model runs exactly as stock vLLM does.

How it prunes (``vtr.integrations.vllm_models``): Qwen2.5-VL and Qwen3-VL are replaced by subclasses whose
processor sizes each placeholder run to the method's keep count from the grid (before the vision pass), and
whose ``embed_multimodal`` keeps the tokens vtr's own ``Method.select`` chooses, each with its original 3-D M-RoPE
position, which vLLM's model runner restores through ``recompute_mrope_positions`` (the interface its EVS video
pruning uses). The language model, its paged KV cache and tensor/pipeline parallelism see a shorter prompt and
nothing else. Methods that prune inside the language model (FastV, DART) and models without that interface
(Qwen2-VL, the LLaVA family) are refused with an error saying why.
"""
from __future__ import annotations

import json
import logging
import os

from ..methods import Method
from ..serving import method_from_options

logger = logging.getLogger(__name__)

# The architectures vtr prunes in vLLM, and those it refuses when configured (they lack the pruning interface).
PRUNED = {"Qwen2_5_VLForConditionalGeneration": "VtrQwen2_5_VL", "Qwen3VLForConditionalGeneration": "VtrQwen3VL"}
REFUSED = ("Qwen2VLForConditionalGeneration", "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
           "LlavaOnevisionForConditionalGeneration")
# vLLM versions whose internals (the names below and in vllm_models) were read and tested.
TESTED_VLLM = ("0.32",)
_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register vtr's model classes (idempotent, cheap: the classes are
    imported by vLLM when a model needs them) and the CPU runner workaround."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm
    from vllm import ModelRegistry

    if not vllm.__version__.startswith(TESTED_VLLM):
        logger.warning("vtr: tested with vLLM %s, running on %s", ", ".join(TESTED_VLLM), vllm.__version__)
    for arch, cls in PRUNED.items():
        ModelRegistry.register_model(arch, f"vtr.integrations.vllm_models:{cls}")
    for arch in REFUSED:
        ModelRegistry.register_model(arch, f"vtr.integrations.vllm_models:Refusing{arch}")
    from .vllm_runner import enable_pruning_flag_on_cpu
    enable_pruning_flag_on_cpu()


def configured_method(hf_config=None, environ=None) -> Method | None:
    """The method vtr prunes with for a model, or None when vtr is not configured (the model then runs stock).

    hf_config: the model's Hugging Face config; its ``vtr`` attribute (set by ``hf_overrides={"vtr": {...}}``)
    wins over the environment. Raises ``ValueError`` / ``TypeError`` for a bad configuration (an unknown method or
    option, a bad budget, a method that cannot run in vLLM), naming the setting."""
    environ = os.environ if environ is None else environ
    settings = getattr(hf_config, "vtr", None)
    source = "hf_overrides['vtr']"
    if settings is None and environ.get("VTR_METHOD"):
        source = "VTR_* environment variables"
        settings = {"method": environ["VTR_METHOD"]}
        for key in ("ratio", "keep"):
            if environ.get(f"VTR_{key.upper()}"):
                settings[key] = environ[f"VTR_{key.upper()}"]
        try:
            settings.update(json.loads(environ.get("VTR_OPTIONS") or "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"vtr: VTR_OPTIONS must be a JSON object of method options: {e}") from None
    if settings is None:
        return None
    if not isinstance(settings, dict) or "method" not in settings:
        raise ValueError(f"vtr: {source} must give a method, e.g. {{'method': 'divprune', 'ratio': 0.9}}; "
                         f"got {settings!r}")
    options = dict(settings)
    name = options.pop("method")
    try:
        if isinstance(options.get("ratio"), str):
            options["ratio"] = float(options["ratio"])
        if isinstance(options.get("keep"), str):
            options["keep"] = int(options["keep"])
    except ValueError:
        raise ValueError(f"vtr: {source}: ratio must be a number and keep an integer, got "
                         f"ratio={options.get('ratio')!r}, keep={options.get('keep')!r}") from None
    return method_from_options(name, **options)
