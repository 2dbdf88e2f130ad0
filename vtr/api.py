"""``vtr.patch`` / ``vtr.unpatch``: the one-call entry point."""
from __future__ import annotations

import dataclasses
import threading
import weakref

import torch

from . import compat
from .engine import Engine
from .methods import Method, Stage, lookup
from .methods.base import BEFORE_LM, IMPLEMENTED_STAGES
from .methods.registry import REGISTRY
from .patches import family_of
from .report import PrefillRecord

_PATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, Handle]" = weakref.WeakKeyDictionary()
_PATCH_LOCK = threading.Lock()


class Handle:
    """A patched model, returned by ``vtr.patch``. ``handle.last`` reports the most recent prefill; ``remove()`` (or
    leaving a ``with`` block) restores the model exactly.

    Attributes:
        model (torch.nn.Module): the patched model.
        method (Method): the method instance in use, with its model- and depth-dependent defaults resolved (e.g.
            ``positions``, a multi-stage method's ``layers``).
    """

    def __init__(self, model: torch.nn.Module, method: Method, engine: Engine):
        self.model, self.method, self._engine = model, method, engine

    @property
    def last(self) -> PrefillRecord | None:
        """What the most recent prefill did (per row: visual tokens before, kept indices per stage, time)."""
        return self._engine.last

    @property
    def active(self) -> bool:
        """Whether this handle's patch is still attached (False after ``remove()``)."""
        return _PATCHED.get(self.model) is self

    def remove(self) -> None:
        """Unpatch the model. Requests in flight in other threads finish as they started (this call waits for
        them); requests starting meanwhile run unpatched. Raises ``RuntimeError`` when called from inside a
        ``generate`` the patch is pruning (a streamer callback): remove it after ``generate`` returns."""
        with _PATCH_LOCK:
            if _PATCHED.get(self.model) is not self:
                return
        self._engine.close()
        with _PATCH_LOCK:
            if _PATCHED.get(self.model) is self:
                del _PATCHED[self.model]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Handle({type(self.model).__name__}, {self.method!r}, {state})"


def patch(model: torch.nn.Module, method: str | Method = "dart", *, ratio: float | None = None,
          keep: int | None = None, **options) -> Handle:
    """Patch ``model`` so that every prefill with visual inputs drops visual tokens with ``method``.

    Args:
        model: a supported Hugging Face VLM: ``LlavaForConditionalGeneration`` (LLaVA-1.5),
            ``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration`` (``vtr.patches.supported_model_classes()``).
        method: a registered name (``vtr.methods()``) or a configured ``Method`` instance.
        ratio: fraction of each image's visual tokens removed, in [0, 1). ``ratio=0`` is the identity.
        keep: visual tokens kept per image (>= 1). Give exactly one of ``ratio`` and ``keep``.
        **options: the method's own options with the official defaults (e.g. ``layer=2``, ``positions="compact"``).

    Every check runs before anything is attached; a failed call leaves the model untouched.

    Raises:
        TypeError: ``method`` is neither a registered name nor a ``Method`` instance, an unknown option, an
            unsupported model class.
        ValueError: a bad budget or option value (named in the message), an unsupported attention backend or
            layer type, ``positions="compact"`` on an M-RoPE model, a method whose official code does not cover
            the model (``Method.model_classes``; the message says why), a vision layer the tower lacks.
        RuntimeError: the model is already patched.
    """
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"vtr.patch: got the class {method.__name__}: configure an instance, e.g. "
                        f"vtr.{method.__name__}(ratio=0.5), or pass the name {method.name!r}")
    if isinstance(method, Method):
        if ratio is not None or keep is not None or options:
            raise ValueError("pass ratio/keep/options either to the Method instance or to patch(), not both")
        instance = method
    elif not isinstance(method, str):
        raise TypeError(f"vtr.patch: method must be a registered name ({', '.join(sorted(REGISTRY))}) or a "
                        f"configured Method instance, got {method!r}")
    else:
        cls = lookup(method)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{cls.name} has no option {', '.join(map(repr, unknown))}; its options are "
                            f"{', '.join(sorted(names - {'ratio', 'keep'}))}")
        instance = cls(ratio=ratio, keep=keep, **options)
    family = family_of(model)
    instance = instance.for_model(family).for_depth(len(compat.decoder_layers(compat.text_model(model))))
    _validate(model, instance, family)
    compat.check_transformers_version()
    with _PATCH_LOCK:
        if model in _PATCHED:
            raise RuntimeError(f"model is already patched with {_PATCHED[model].method.name}; call "
                               "handle.remove() or vtr.unpatch(model) first")
        engine = Engine(model, instance, family)
        engine.attach()
        handle = Handle(model, instance, engine)
        _PATCHED[model] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove vtr from ``model`` (no-op if it is not patched)."""
    handle = _PATCHED.get(model)
    if handle is not None:
        handle.remove()


def handle_of(model: torch.nn.Module) -> Handle | None:
    """The ``Handle`` patching ``model``, or None when it is not patched."""
    return _PATCHED.get(model)


def methods() -> dict[str, str]:
    """Registered methods and their one-line descriptions."""
    return {name: cls.summary for name, cls in sorted(REGISTRY.items())}


def _validate(model: torch.nn.Module, method: Method, family) -> None:
    if not any(method.supports(cls.__name__) for cls in type(model).__mro__):
        raise ValueError(f"{method.name} does not support {type(model).__name__}: {method.unsupported_reason} "
                         f"Supported: {', '.join(method.model_classes)}")
    backend = compat.attn_implementation(model)
    if backend not in compat.ATTENTION_BACKENDS:
        raise ValueError(f"{method.name} cannot run with attn_implementation={backend!r}; supported: "
                         f"{', '.join(compat.ATTENTION_BACKENDS)}")
    if "vision" in method.needs:  # the vision layers it reads must exist
        method.vision_layers(len(compat.vision_layers(model)), compat.vision_feature_layer(model))
    if method.stages()[0].stage is Stage.VISION:  # the layers it prunes after must lie below the feature layer
        feature = compat.vision_feature_layer(model)
        layers = method.vision_stage_layers(len(compat.vision_layers(model)), feature)
        if not layers:
            raise ValueError(f"{method.name}: this vision tower has no layer below its feature layer {feature} to "
                             "prune after (the projector reads the first layer's output)")
        # Qwen-VL: the official code also prunes after the last block, whose output the merger reads; a step
        # between a layer's attention and its MLP (ToMe) may run in the feature layer itself. Steps in later layers
        # only read signals (MustDrop's key set): the engine refuses a selection there.
        limit = compat.vision_prune_limit(model, method)
        if any(not 0 <= i < len(compat.vision_layers(model)) for i in layers) or min(layers) >= limit:
            raise ValueError(f"{method.name}: vision-stage layers {list(layers)} must lie below the feature layer "
                             f"{feature} of this vision tower")
    lm = compat.text_model(model)
    types = set(compat.layer_types(lm)) - set(compat.LAYER_TYPES)
    if types:
        raise ValueError(f"vtr supports decoder layers of the types {list(compat.LAYER_TYPES)}; this model also has "
                         f"{sorted(types)}")
    n_layers = len(compat.decoder_layers(lm))
    for spec in method.stages():
        if spec.stage not in IMPLEMENTED_STAGES:
            raise NotImplementedError(f"{method.name}: stage {spec.stage.value!r} is not implemented by the engine")
        if spec.stage is Stage.LAYER and not 1 <= spec.layer < n_layers:
            off = " (0 turns that stage off)" if method.layer_option == "llm_layer" else ""
            raise ValueError(f"{method.name}: {method.layer_option} must be in [1, {n_layers - 1}] for this "
                             f"{n_layers}-layer model{off}, got {spec.layer}")
    decode = method.decode_stage()
    if decode is not None:
        if not 1 <= decode.layer < n_layers:
            raise ValueError(f"{method.name}: {method.layer_option} must be in [1, {n_layers - 1}] for this "
                             f"{n_layers}-layer model, got {decode.layer}")
        if any(s.stage is Stage.LAYER for s in method.stages()):
            raise NotImplementedError(f"{method.name}: a kv_cache stage after layer stages is not implemented")
    method.check_layer_average(n_layers)  # a layer-averaged ratio out of the schedule's reach
    for spec in method.stages():
        if (spec.positions or method.positions) == "span_prefix" and spec.stage not in BEFORE_LM:
            raise ValueError(f"{method.name}: positions='span_prefix' is defined for stages before the language "
                             f"model; its {spec.stage.value} stage at layer {spec.layer} would need it inside it")
    if method.positions == "compact" and family.mrope:
        raise ValueError(f"{method.name}: positions='compact' is not defined for {type(model).__name__}, whose "
                         "M-RoPE gives visual tokens 3-D grid positions; use positions='original' (kept tokens keep "
                         "their 3-D positions)")
