"""vLLM plugin: vtr's pre-LLM methods inside vLLM's multimodal pipeline, for LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

Loaded by vLLM in every process (API server, engine core, workers) through the ``vllm.general_plugins`` entry
point that ``pip install vtr[vllm]`` registers; configured without code:

* environment variables ``VTR_METHOD`` (see ``vtr.serving.servable_methods()``), ``VTR_RATIO`` (fraction of each
  image's or video's visual tokens removed, in [0, 1)) or ``VTR_KEEP`` (tokens kept per image or video), and
  ``VTR_OPTIONS`` (the method's options as a JSON object, e.g. ``{"seed": 1}``);
* or, per model, vLLM's ``hf_overrides``: ``{"vtr": {"method": "divprune", "ratio": 0.9}}`` (other keys are the
  method's options), which wins over the environment;
* and per request, on a server so configured, ``mm_processor_kwargs={"vtr": {...}}`` (the OpenAI server needs
  ``--trust-request-mm-kwargs``): the request's keys override the server's settings, and a request naming another
  method gives all of that method's settings. ``{"vtr": {"ratio": 0}}`` serves a request dense. The settings are
  part of the multimodal hash, so the encoder cache and the prefix cache never mix requests with other settings.

Without either, every model runs exactly as stock vLLM does. A bad configuration is refused in the API server's
process, before the engine starts, with one line naming the cause (``VtrConfigError``); a bad request setting is
refused with an error response.

How it prunes: ``vtr.integrations.vllm_models`` (the model classes), ``vllm_signals`` (the vision tower's signals
captured inside vLLM's tower), ``vllm_metrics`` (Prometheus metrics through vLLM's stat-logger plugin entry point),
``vllm_runner`` (the CPU runner workaround).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass

from ..methods import Method
from .. import serving

logger = logging.getLogger(__name__)

# The architectures vtr prunes in vLLM, and the class that does it for each.
PRUNED = {"LlavaForConditionalGeneration": "VtrLlava", "LlavaNextForConditionalGeneration": "VtrLlavaNext",
          "LlavaOnevisionForConditionalGeneration": "VtrLlavaOnevision",
          "Qwen2VLForConditionalGeneration": "VtrQwen2VL", "Qwen2_5_VLForConditionalGeneration": "VtrQwen2_5_VL",
          "Qwen3VLForConditionalGeneration": "VtrQwen3VL", "Qwen3VLMoeForConditionalGeneration": "VtrQwen3VLMoe",
          "Qwen3_5ForConditionalGeneration": "VtrQwen3_5", "Qwen3_5MoeForConditionalGeneration": "VtrQwen3_5Moe"}
# vLLM versions whose internals (the names in vllm_models, vllm_signals, vllm_runner) were read and tested.
TESTED_VLLM = ("0.32",)
REQUEST_KEY = "vtr"  # mm_processor_kwargs={"vtr": {...}}
_registered = False


class VtrConfigError(ValueError):
    """A bad vtr setting (server or request), in one line naming the cause."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register vtr's model classes (idempotent, cheap: the classes are
    imported by vLLM when a model needs them), the CPU runner workaround, the one-line report of a bad server
    configuration, and the metrics channel of this process's engine."""
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
    from .vllm_runner import enable_pruning_flag_on_cpu
    enable_pruning_flag_on_cpu()
    from .vllm_metrics import channel_directory
    channel_directory()  # set before vLLM spawns its engine processes, which inherit it
    _check_models_when_configured(ModelRegistry)
    _report_config_errors_in_one_line()


def _check_models_when_configured(registry) -> None:
    """Check vtr's settings where vLLM resolves a model's architecture (``ModelConfig``, in the API server's
    process, before any engine starts): a bad setting, or vtr configured for a model it does not prune, raises
    ``VtrConfigError`` there."""
    original = registry.inspect_model_cls
    if getattr(original, "_vtr", False):
        return

    def inspect_model_cls(architectures, model_config, *args, **kwargs):
        info, arch = original(architectures, model_config, *args, **kwargs)
        config = getattr(model_config, "hf_config", None)
        settings = server_settings(config)
        if settings is not None:
            if arch not in PRUNED:
                raise VtrConfigError(f"vtr: {arch} is not a model vtr prunes in vLLM (it prunes {', '.join(PRUNED)}); "
                                     "unset VTR_METHOD / hf_overrides['vtr'] to serve it")
            method_for(settings, ModelFacts.of(config), "server settings")
        return info, arch

    inspect_model_cls._vtr = True
    registry.inspect_model_cls = inspect_model_cls


def _report_config_errors_in_one_line() -> None:
    """An uncaught ``VtrConfigError`` (a bad server configuration, raised while the API server builds the model's
    config, before any engine process starts) prints its one line, not a traceback."""
    previous = sys.excepthook
    if getattr(previous, "_vtr", False):
        return

    def hook(kind, error, trace):
        found = config_error(error)
        if found is not None:
            print(str(found), file=sys.stderr)
            return
        previous(kind, error, trace)

    hook._vtr = True
    sys.excepthook = hook


def config_error(error: BaseException | None) -> VtrConfigError | None:
    """The ``VtrConfigError`` behind ``error``: itself, its cause or context, or (pydantic, which validates vLLM's
    ``ModelConfig``) the error one of its validation errors wraps."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, VtrConfigError):
            return error
        errors = getattr(error, "errors", None)
        if callable(errors):
            try:
                wrapped = [item.get("ctx", {}).get("error") for item in errors()]
            except Exception:
                wrapped = []
            found = next((e for e in wrapped if isinstance(e, VtrConfigError)), None)
            if found is not None:
                return found
        error = error.__cause__ or error.__context__
    return None


def server_settings(hf_config=None, environ=None) -> dict | None:
    """The server's vtr settings for a model (``{"method": ..., "ratio" | "keep": ..., options}``), or None when
    vtr is not configured (the model then runs stock).

    hf_config: the model's Hugging Face config; its ``vtr`` attribute (set by ``hf_overrides={"vtr": {...}}``)
    wins over the ``VTR_*`` environment variables. Raises ``VtrConfigError`` for a bad configuration (an unknown
    method, a bad budget or option, a method vLLM cannot run), naming the setting."""
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
            options = json.loads(environ.get("VTR_OPTIONS") or "{}")
        except json.JSONDecodeError as e:
            raise VtrConfigError(f"vtr: VTR_OPTIONS must be a JSON object of method options: {e}") from None
        if not isinstance(options, dict):
            raise VtrConfigError(f"vtr: VTR_OPTIONS must be a JSON object of method options, got {options!r}")
        settings.update(options)
    if settings is None:
        return None
    settings = normalized(settings, source)
    configure(settings, source)
    return settings


def normalized(settings, source: str) -> dict:
    """``settings`` as a plain dict with a method name and numeric budget; ``VtrConfigError`` naming ``source``."""
    if not isinstance(settings, dict) or not isinstance(settings.get("method"), str):
        raise VtrConfigError(f"vtr: {source} must give a method, e.g. {{'method': 'divprune', 'ratio': 0.9}}; got "
                             f"{settings!r}")
    settings = dict(settings)
    try:
        if isinstance(settings.get("ratio"), str):
            settings["ratio"] = float(settings["ratio"])
        if isinstance(settings.get("keep"), str):
            settings["keep"] = int(settings["keep"])
    except ValueError:
        raise VtrConfigError(f"vtr: {source}: ratio must be a number and keep an integer, got "
                             f"ratio={settings.get('ratio')!r}, keep={settings.get('keep')!r}") from None
    return settings


def request_settings(server: dict | None, request) -> dict | None:
    """The settings of one request: the server's, overridden by the request's ``mm_processor_kwargs["vtr"]``
    (``request``; None: the server's). A request naming another method than the server's stands alone (the server's
    options belong to its method). Raises ``VtrConfigError`` for a bad request setting and for a request setting on
    a server without vtr."""
    if request is None:
        return server
    if server is None:
        raise VtrConfigError("vtr: this model is served without vtr (no VTR_METHOD, no hf_overrides['vtr']), so "
                             "mm_processor_kwargs['vtr'] cannot be honoured; start the server with vtr configured "
                             "(e.g. VTR_METHOD=divprune VTR_RATIO=0) to choose per request")
    if not isinstance(request, dict):
        raise VtrConfigError(f"vtr: mm_processor_kwargs['vtr'] must be an object of settings, got {request!r}")
    if "method" in request and request["method"] != server["method"]:
        settings = dict(request)
    else:
        settings = {**server, **request}
        if "ratio" in request and "keep" not in request:
            settings.pop("keep", None)
        if "keep" in request and "ratio" not in request:
            settings.pop("ratio", None)
    return normalized(settings, "mm_processor_kwargs['vtr']")


def configure(settings: dict, source: str = "settings") -> Method:
    """The configured method of normalized ``settings``, checked (``vtr.serving.configure``); ``VtrConfigError``."""
    return _configured(json.dumps(settings, sort_keys=True), source)


@functools.lru_cache(maxsize=256)
def _configured(key: str, source: str) -> Method:
    options = json.loads(key)
    name = options.pop("method")
    try:
        return serving.configure(name, **options)
    except (TypeError, ValueError) as error:
        message = str(error) if str(error).startswith("vtr:") else f"vtr: {error}"
        raise VtrConfigError(message.replace("vtr: ", f"vtr: {source}: ", 1) if source != "settings"
                             else message) from None


@dataclass(frozen=True)
class ModelFacts:
    """What vtr needs to know about a served model from its Hugging Face config."""

    architecture: str
    family: object  # vtr.patches.Family
    n_layers: int
    vision_layers: int
    feature_layer: int

    @staticmethod
    def of(hf_config) -> "ModelFacts":
        from ..patches import FAMILIES
        arch = (getattr(hf_config, "architectures", None) or [""])[0]
        family = next((f for f in FAMILIES if arch in f.model_classes), None)
        if family is None:
            raise VtrConfigError(f"vtr: {arch or type(hf_config).__name__} is not a model vtr prunes in vLLM; it "
                                 f"prunes {', '.join(PRUNED)}")
        text = hf_config.get_text_config()
        vision = hf_config.vision_config
        depth = getattr(vision, "depth", None) or vision.num_hidden_layers
        chosen = getattr(hf_config, "vision_feature_layer", -1)
        feature = chosen % (depth + 1) - 1 if isinstance(chosen, int) else depth - 1
        return ModelFacts(arch, family, text.num_hidden_layers, depth, feature)


def method_for(settings: dict, facts: ModelFacts, source: str = "settings") -> Method:
    """``settings``' method resolved for the model (``vtr.serving.for_family``); ``VtrConfigError``."""
    return _method_for(json.dumps(settings, sort_keys=True), facts, source)


@functools.lru_cache(maxsize=256)
def _method_for(key: str, facts: ModelFacts, source: str) -> Method:
    method = configure(json.loads(key), source)
    try:
        return serving.for_family(method, facts.family, facts.architecture, facts.n_layers, facts.vision_layers,
                                  facts.feature_layer)
    except (TypeError, ValueError) as error:
        message = str(error) if str(error).startswith("vtr:") else f"vtr: {error}"
        raise VtrConfigError(message) from None


def configured_method(hf_config=None, environ=None) -> Method | None:
    """The server's configured method (``server_settings``), or None."""
    settings = server_settings(hf_config, environ)
    return None if settings is None else configure(settings)
