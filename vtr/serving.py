"""Selection for serving engines (vLLM): one image's or video's features (and the signals the engine captured while
encoding it) in, the kept tokens out.

A serving engine sizes each input's placeholder run when the prompt is processed, before any vision pass, encodes
each input on its own, and runs the language model with one KV-cache slot per prompt token. So it can run a method
whose every stage runs before the language model, whose keep count follows from the input's grid (not from what
the vision pass finds), and which reads only what the engine can hand it for that input: its projected features,
the vision tower's signals captured while it was encoded, the prompt's text carried with it. Such a method runs the
very same ``Method.budget_for`` and ``Method.select`` as ``vtr.patch`` in a Hugging Face model, on the same
``VisualSpan`` (built by the model family's own ``layout``), through ``ServingContext``: the signals of
``vtr.signals`` (tower, video, text) over one input.

    method = serving.configure("divprune", ratio=0.5)                    # checked: servable, options valid
    method = serving.for_family(method, family, "Qwen2_5_VLForConditionalGeneration", n_layers=28)
    n_kept = serving.prompt_count(method, span)                           # at prompt time, from the grid alone
    keep, merged = serving.select(method, span, embeds, InputSignals())   # after the vision pass
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .engine.core import VisionCall
from .engine.prune import Pruning
from .layout import RowLayout, TokenLayout, VisualSpan
from .methods import Method, Stage
from .methods.base import BEFORE_LM, Merge, StageSpec
from .methods.registry import REGISTRY
from .signals import SpanCandidates
from .signals.core import ContextBase
from .signals.text import TextSignals
from .signals.video import VideoSignals
from .signals.vision import TowerSignals

# The option that turns off the part of a multi-stage method that runs inside the language model, leaving the part
# before it, which a serving engine can run (the user says so explicitly: the method's default runs both).
REST_OFF = {"dycoke": ("kv_ratio", 0), "holitom": ("inner_ratio", 0)}
# Methods whose keep count the engine computes with ``budget_for`` over the input's tokens (not ``budget`` of their
# number): the inputs for which that count follows from the grid alone, whatever the features hold.
COUNT_FROM_GRID = {
    "dycoke": lambda method, span: True,  # TTM: whole frames and n_keep tokens of each pruned frame
    # one segment per frame when a video has at most ``segments`` of them, each keeping its salient + context
    "fastvid": lambda method, span: _frames(span) <= method.segments,
    "holitom": lambda method, span: span.kind == "image",  # an image: one frame, no static windows
    "evs": lambda method, span: True,  # max(N, int(F N (1 - ratio))): frames and tokens per frame
    "vidcom2": lambda method, span: method.variant == "vllm",  # vLLM's port reconciles to an exact count
}
# The option a method needs to be served (its default's keep count depends on the input's features), and why.
SERVED_VARIANT = {"vidcom2": ("variant", "vllm", "the authors' keep count is the sum of the frame budgets the "
                              "frames' features set; vLLM's port reconciles it to exactly "
                              "max(F, int(F N (1 - ratio)))")}
# Methods before the language model that the plugin does not serve (yet), refused when the server starts: vLLM
# sizes a prompt's placeholder run before the tower runs, so the keep count must follow from the grid, and the
# serving context must carry what the selection reads.
NOT_SERVED = {
    "prumerge": "its keep count is the number of [CLS]-attention outliers (plus spatial samples) the image's "
                "tower attention holds, which vLLM would need before the tower runs",
}
COUNT_REASONS = {
    "fastvid": "a video of more frames (temporal slices) than `segments` is cut into segments by the similarity "
               "of its frames, and its keep count follows the segments; give segments >= the frame count",
    "holitom": "a video's keep count follows its static windows, found in its frames' features",
}


def _frames(span: VisualSpan) -> int:
    return int(span.frame.max()) + 1 if span.n else 0


def servable_reason(method: Method) -> str | None:
    """Why ``method`` (configured) cannot run in a serving engine, or None if it can."""
    if method.stage is Stage.VISION:
        return (f"{method.name} prunes inside the vision tower, between its layers, which would need vtr's "
                "sequence surgery inside vLLM's tower; vLLM serves the methods that prune between the vision tower "
                f"and the language model ({', '.join(servable_methods())})")
    if method.name in NOT_SERVED:
        return f"{method.name}: {NOT_SERVED[method.name]}"
    try:
        stages = method.stages()
    except ValueError:  # stage layers resolved from the model's depth at patch time: stages inside the LM
        stages = [StageSpec(Stage.PRE_LLM), StageSpec(Stage.LAYER, -1)]
    inside = [s for s in stages if s.stage not in BEFORE_LM]
    if inside or method.stage is not Stage.PRE_LLM:
        if method.name in REST_OFF and stages[0].stage is Stage.PRE_LLM:
            option, value = REST_OFF[method.name]
            return (f"{method.name} also prunes inside the language model (its {option} stage); vLLM can run only "
                    f"its stage before the language model: pass {option}={value} to serve that stage alone")
        layer = inside[0].layer if inside else getattr(method, "layer", None)
        where = f"before decoder layer {layer}" if layer is not None and layer >= 0 else "at several decoder layers"
        return (f"{method.name} prunes inside the language model ({where}): it drops tokens whose keys and values "
                "are already in the layers below, per request, which needs per-layer sequence lengths that paged "
                "attention's KV-cache blocks (one block table per request, shared by all layers) do not have; "
                f"vLLM serves the methods that prune before the language model ({', '.join(servable_methods())})")
    decode = method.decode_stage()
    if decode is not None and method.select_decode({}, 0, SimpleNamespace(offset=0), torch.ones(2)) is not None:
        option, value = REST_OFF.get(method.name, ("its kv_cache stage", "off"))
        return (f"{method.name} also prunes the KV cache at every decoding step (layers >= {decode.layer}), which "
                f"paged attention cannot do per layer; pass {option}={value} to serve its stage before the "
                "language model alone")
    if method.positions == "span_prefix":
        return f"{method.name}: positions='span_prefix' is not available in vLLM (kept tokens keep their positions)"
    if not served_kinds(method) and method.name in SERVED_VARIANT:
        option, value, why = SERVED_VARIANT[method.name]
        return f"{method.name}: {why}; pass {option}={value!r} to serve it"
    return None


def serving_options(name: str) -> dict:
    """The options that make method ``name`` servable where its defaults are not (``{}`` when they are)."""
    return dict([REST_OFF[name]] if name in REST_OFF else [SERVED_VARIANT[name][:2]] if name in SERVED_VARIANT
                else [])


def served_kinds(method: Method) -> tuple[str, ...]:
    """The input kinds (``"image"``, ``"video"``) of ``method`` a serving engine can prune: those whose keep count can
    follow from the grid (a video's can for some videos when it can for a one-frame video; ``check_input`` decides
    each input)."""
    one_frame = SimpleNamespace(kind="video", frame=torch.zeros(1, dtype=torch.long), n=1)
    grid_rule = COUNT_FROM_GRID.get(method.name, lambda method, span: False)
    return tuple(kind for kind in method.visual_kinds
                 if kind == "image" or _count_from_budget(method) or grid_rule(method, one_frame))


def reads_prompt(method: Method) -> bool:
    """Whether ``method``'s selection, as a serving engine runs it (its stages before the language model), reads the
    prompt's text, so that an input's selection depends on the prompt around it (CDPruner's relevance). A method of
    ``REST_OFF`` reads the prompt in the stage that is off when served (HoliTom's inner merge)."""
    return "clip_text" in method.needs or (method.needs_whole_prompt and method.name not in REST_OFF)


_SERVABLE: list[str] = []


def servable_methods() -> list[str]:
    """The registered methods vLLM can serve (with the option that turns the rest off, where one is needed)."""
    if not _SERVABLE:
        _SERVABLE.append("")  # computing the list asks servable_reason, whose messages list it
        out = []
        for name, cls in sorted(REGISTRY.items()):
            try:
                if servable_reason(cls(ratio=0.5)) is None:
                    out.append(name)
                elif serving_options(name) and servable_reason(cls(ratio=0.5, **serving_options(name))) is None:
                    out.append(f"{name} ({', '.join(f'{k}={v}' for k, v in serving_options(name).items())})")
            except (TypeError, ValueError):
                continue
        _SERVABLE[:] = out
    return [name for name in _SERVABLE if name]


def configure(name: str, ratio: float | None = None, keep: int | None = None, **options) -> Method:
    """A configured method for serving, checked: the registered ``name`` with its budget and options.

    Raises ``ValueError`` for an unknown name (listing the methods vLLM can serve), a bad budget or option value,
    and for a method that cannot run in a serving engine (the message says why); ``TypeError`` for an unknown
    option."""
    if name not in REGISTRY:
        servable = servable_methods()
        close = difflib.get_close_matches(str(name), [s.split()[0] for s in servable], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"vtr: unknown method {name!r}.{hint} Methods vLLM serves: {', '.join(servable)}")
    cls = REGISTRY[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"vtr: {name} has no option {', '.join(map(repr, unknown))}; its options are "
                        f"{', '.join(sorted(names - {'ratio', 'keep'}))}")
    try:
        method = cls(ratio=ratio, keep=keep, **options)
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith("vtr:") else f"vtr: {error}") from None
    reason = servable_reason(method)
    if reason:
        raise ValueError(f"vtr: {reason}")
    return method


method_from_options = configure  # the name of vtr <= 0.1's serving API


def for_family(method: Method, family, model_class: str, n_layers: int, vision_layers: int | None = None,
               feature_layer: int | None = None) -> Method:
    """``method`` resolved for a model, as ``vtr.patch`` resolves it (``for_model``, ``for_depth``), and checked
    against what a serving engine can do for it. family: the ``vtr.patches`` family; model_class: the model's
    class name (``LlavaForConditionalGeneration``...); n_layers: decoder layers; vision_layers / feature_layer:
    the vision tower's depth and the 0-based layer the projector reads (for methods that read tower signals).

    Raises ``ValueError`` naming the cause: a method the model's official code does not cover, a position policy
    the engine cannot give (1-D RoPE: kept tokens are numbered consecutively, ``positions="compact"``; M-RoPE: kept
    tokens keep their grid positions, ``"original"``), a vision layer the tower lacks."""
    if not method.supports(model_class):
        raise ValueError(f"vtr: {method.name} does not support {model_class}: {method.unsupported_reason} "
                         f"Supported: {', '.join(method.model_classes)}")
    try:
        method = method.for_model(family).for_depth(n_layers)
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith("vtr:") else f"vtr: {error}") from None
    if family.mrope and method.positions != "original":
        raise ValueError(f"vtr: {method.name}: positions={method.positions!r} is not defined for {model_class}, "
                         "whose M-RoPE gives visual tokens 3-D grid positions: kept tokens keep them "
                         "(positions='original')")
    if not family.mrope and method.positions != "compact":
        raise ValueError(f"vtr: {method.name}: positions={method.positions!r} keeps gaps where tokens were "
                         f"removed, and vLLM numbers {model_class}'s prompt tokens consecutively; pass "
                         "positions='compact' (kept tokens renumbered without gaps)")
    if "vision" in method.needs and vision_layers is not None:
        try:
            method.vision_layers(vision_layers, feature_layer)
        except ValueError as error:
            raise ValueError(f"vtr: {error}") from None
    return method


def layout_span(family, model, kind: str, n: int, embeds: torch.Tensor | None = None, **inputs) -> VisualSpan:
    """The ``VisualSpan`` of one input of ``n`` tokens, from the family's own ``layout`` (``vtr.patches``) on a prompt
    holding only that input. model: the model, or anything with its ``config`` (and, LLaVA-NeXT / OneVision, its
    ``model.image_newline``); inputs: that input's entries of the model's inputs (``image_grid_thw``,
    ``image_sizes``...; a pixel input is assumed); embeds: ``[n, D]`` its language-model inputs (LLaVA-NeXT /
    OneVision find newline tokens among them: rows equal to ``image_newline``)."""
    config = model.config
    token = config.image_token_id if kind == "image" else config.video_token_id
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    inputs = {"input_ids": torch.full((1, n), token), key: torch.empty(1), **inputs}
    embeds = torch.zeros(1, n, 1) if embeds is None else embeds[None]
    (span,) = family.layout(model, inputs, embeds, torch.arange(n)[None]).rows[0].spans
    return span


def check_input(method: Method, span: VisualSpan) -> None:
    """``ValueError`` when ``method`` cannot prune this input in a serving engine: a kind it does not prune, or a
    keep count that depends on the input's content (see ``COUNT_FROM_GRID``)."""
    if span.kind not in method.visual_kinds:
        raise ValueError(f"vtr: {method.name} prunes {' and '.join(k + 's' for k in method.visual_kinds)} only; "
                         f"this request holds {'an' if span.kind == 'image' else 'a'} {span.kind}")
    if not _count_from_budget(method) and method.ratio != 0:
        rule = COUNT_FROM_GRID.get(method.name)
        if rule is None or not rule(method, span):
            why = COUNT_REASONS.get(method.name, "it depends on the input's features")
            raise ValueError(f"vtr: {method.name}: a serving engine sizes the prompt before the vision pass, so the "
                             f"keep count must follow from the {span.kind}'s grid; {why}")


def _count_from_budget(method: Method) -> bool:
    return type(method).budget_for is Method.budget_for


def prompt_count(method: Method, span: VisualSpan, family=None, model=None) -> int:
    """How many of ``span``'s tokens ``method`` keeps, from its grid alone (when the prompt is processed): newline
    tokens the method may not drop, plus each budget group's ``budget_for``, as ``vtr.patch`` counts them. Raises
    ``ValueError`` (``check_input``) when the count depends on the input's content."""
    check_input(method, span)
    embeds = torch.zeros(span.n, 1)  # the count of a method in COUNT_FROM_GRID does not depend on them
    ctx = _CountingContext(method, span, embeds, InputSignals(), family, model)
    candidates = SpanCandidates(span, torch.arange(span.n), torch.arange(span.n))
    eligible = ctx.eligible(candidates)
    total = int((~eligible).sum())
    for group in ctx.groups(candidates.subset(eligible)):
        total += min(len(group), ctx.engine.checked_budget(method.budget_for(ctx, 0, group), len(group)))
    return total


@dataclass
class InputSignals:
    """What a serving engine captured while it encoded one input, for the methods that read more than its
    features (all optional).

    tower: vision layer (0-based) -> (attention module, its input, the layer's output), each ``[C, N, D_v]`` over
    the input's tower inputs (crops of an image, frames of a video; Qwen-VL: ``[S, D_v]`` patches in the tower's
    order), with ``attention`` exposing what ``vtr.compat``'s attention helpers read (``q_proj``/``k_proj``/
    ``num_heads``/``head_dim``/``scale``, or Qwen-VL's fused ``qkv``/``num_heads``/``scaling``).
    extras: vision layer -> the attention call's other arguments (Qwen-VL: ``cu_seqlens``, ``position_embeddings``).
    image_size: the image's (height, width) (anyres models); grid_thw: ``[1, 3]`` its patch grid (Qwen-VL).
    text_embedding: ``[D]`` mean of the language model's input embeddings over the prompt's text tokens.
    instruction: the prompt's text after the input (CLIP relevance); clip: (CLIP model, its tokenizer).
    deepstack: ``[n, D * levels]`` Qwen3-VL's DeepStack features of the input's tokens (span order), level after
    level, as vLLM's Qwen3-VL concatenates them after the merger output (EVS and VidCom2 score the whole row)."""

    tower: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    image_size: tuple | None = None
    grid_thw: torch.Tensor | None = None
    frames: int | None = None
    text_embedding: torch.Tensor | None = None
    instruction: str | None = None
    clip: tuple | None = None
    deepstack: torch.Tensor | None = None


class ServingContext(TowerSignals, VideoSignals, TextSignals, ContextBase):
    """What ``SelectionContext`` gives a pre-LLM method, for one input of a serving engine: its features as row 0
    of ``hidden``, its span as the row's only span, and the signals of ``vtr.signals`` computed from what the engine
    captured (``InputSignals``) by the same code as in ``vtr.patch``."""

    def __init__(self, method: Method, span: VisualSpan, embeds: torch.Tensor, signals: InputSignals, family,
                 model, feature_layer: int | None = None):
        self.engine = _Engine(method, embeds.shape[1], family, model, feature_layer, signals.clip)
        call = VisionCall(image_sizes=[list(signals.image_size)] if signals.image_size is not None else None,
                          grid_thw=signals.grid_thw, kind=span.kind, frames=signals.frames)
        call.layers = {i: list(entry) for i, entry in signals.tower.items()}
        call.extras = dict(signals.extras)
        # one input, encoded once (no generate() row expansion); a request's memo of the signals no stage changes
        request = SimpleNamespace(signals={}, method_state={})
        if span.kind == "video":
            self.fwd = SimpleNamespace(vision=VisionCall(image_sizes=None, video=call), request=request, expansion=1)
        else:
            self.fwd = SimpleNamespace(vision=call, request=request, expansion=1)
        self.hidden = embeds[None]
        self.layout = TokenLayout(rows=[RowLayout(spans=[span], length=span.n)])
        self.spec = StageSpec(Stage.PRE_LLM)
        self._memo = {}
        self._signals = signals

    # the prompt's text, carried to the engine with the input (there is no prompt row here)
    def prompt_text_embedding(self, row: int) -> torch.Tensor | None:
        return self._signals.text_embedding

    def instruction_text(self, row: int, tokens: SpanCandidates) -> str:
        return self._signals.instruction or ""

    def with_deepstack(self, row: int, tokens: SpanCandidates, features: torch.Tensor) -> torch.Tensor:
        deepstack = self._signals.deepstack
        if deepstack is None:
            return features
        return torch.cat([features, deepstack[tokens.slots.to(deepstack.device)].to(features)], -1)



class _CountingContext(ServingContext):
    """``prompt_count``'s context: a method of ``COUNT_FROM_GRID`` may read a signal while it plans (FastVID's
    frame salience); any value of the right shape gives the same count."""

    def video_mean_query_attention(self, row, span, layer=None):
        frames = _frames(span)
        return torch.zeros(frames, span.n // max(frames, 1))

    def video_pooling_head(self, row, span, siglip):
        frames = _frames(span)
        return None, torch.zeros(frames, int((~span.newline).sum()) // max(frames, 1))


class _Engine(Pruning):
    """What a method and the signals read of ``vtr.engine.Engine`` for one input (its method, family, model,
    feature layer, CLIP model, each stage's position policy), and the engine's own checks of what a method returns
    (``vtr.engine.prune``)."""

    def __init__(self, method: Method, hidden_size: int | None = None, family=None, model=None,
                 feature_layer: int | None = None, clip: tuple | None = None):
        self.method, self.family, self.model, self.vision_feature_layer = method, family, model, feature_layer
        self.clip, self.clip_tokenizer = clip or (None, None)
        self.tokenizer = None
        self.lm = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))

    def checked_budget(self, budget, n: int) -> int:
        return self._checked_budget(budget, n)


@dataclass
class Selection:
    """What a method keeps of one input: ``keep`` ``[k]`` ascending token indices; ``slots`` ``[m]`` the kept tokens
    whose embedding is replaced (a subset of ``keep``) and ``embeds`` ``[m, D]`` their new embeddings (``[m, D *
    (1 + levels)]`` where the method merged Qwen3-VL's DeepStack features too, in the layout of vLLM's rows)."""

    keep: torch.Tensor
    slots: torch.Tensor
    embeds: torch.Tensor | None = None

    def apply(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` ``[n, C]`` with the merged rows replaced (their first ``D`` channels), then gathered to the
        kept rows ``[k, C]``."""
        if len(self.slots):
            embeds = embeds.clone()
            embeds[self.slots.to(embeds.device), :self.embeds.shape[1]] = self.embeds.to(embeds.device, embeds.dtype)
        return embeds[self.keep.to(embeds.device)]


def select(method: Method, span: VisualSpan, embeds: torch.Tensor, signals: InputSignals | None = None,
           family=None, model=None, feature_layer: int | None = None) -> Selection:
    """What ``method`` keeps of one input, as ``vtr.patch``'s pre-LLM stage chooses it: newline tokens it may not
    drop, then per budget group ``budget_for`` tokens by ``select`` (a ``Merge`` replaces some kept embeddings).

    embeds: ``[n, D]`` the input's language-model input embeddings in the span's order. Raises ``RuntimeError``
    when the method breaks its contract (as the engine does), ``ValueError`` for an input it cannot prune."""
    ctx = ServingContext(method, span, embeds, signals or InputSignals(), family, model, feature_layer)
    checks = ctx.engine
    candidates = SpanCandidates(span, torch.arange(span.n, device=embeds.device),
                                torch.arange(span.n, device=embeds.device))
    eligible = ctx.eligible(candidates).to(embeds.device)
    keep, slots, merged = [candidates.slots[~eligible]], [], []
    for group in ctx.groups(candidates.subset(eligible)):
        budget = checks.checked_budget(method.budget_for(ctx, 0, group), len(group))
        if budget >= len(group):
            keep.append(group.slots)
            continue
        chosen = method.select(ctx, 0, group, budget)
        if isinstance(chosen, Merge):
            levels = ctx._signals.deepstack.shape[-1] // embeds.shape[-1] if ctx._signals.deepstack is not None else 0
            merge = checks._checked_merge(chosen, ctx.spec, budget, len(group), levels)
            if len(merge.slots):
                slots.append(group.slots[merge.slots.to(group.slots.device)])
                # merged DeepStack features (VisionZip on Qwen3-VL) follow the embedding, as vLLM's rows hold them
                merged.append(merge.embeds if merge.deepstack is None else
                              torch.cat([merge.embeds, merge.deepstack.to(merge.embeds)], -1))
            chosen = merge.keep
        keep.append(group.slots[checks._checked(chosen, budget, len(group)).to(group.slots.device)])
    keep = torch.cat(keep).sort().values
    slots = torch.cat(slots) if slots else keep[:0]
    return Selection(keep=keep, slots=slots, embeds=torch.cat(merged) if merged else None)


# ------------------------------------------------------------------------------------ the vtr 0.1 serving API
def kept_count(method: Method, n: int) -> int:
    """How many of an input's ``n`` visual tokens ``method`` keeps by its ``budget`` rule (methods whose count is
    ``budget`` of the token count; others: ``prompt_count``)."""
    return min(n, method.budget(n))


def select_tokens(method: Method, embeds: torch.Tensor, grid: tuple[int, int, int], kind: str = "image"
                  ) -> torch.Tensor:
    """Indices of the tokens ``method`` keeps of one raster-ordered ``(t, h, w)`` grid of ``embeds`` ``[n, D]``
    (a Qwen-VL image or video, in language-model tokens), ascending; ``[kept]`` int64 on ``embeds``'s device. For
    methods that read only the features (``select`` takes the signals)."""
    n = embeds.shape[0]
    if math.prod(grid) != n:
        raise ValueError(f"vtr: a {grid} grid does not cover {n} tokens")
    span = VisualSpan(kind=kind, index=0, positions=torch.arange(n), grid=tuple(int(g) for g in grid))
    return select(method, span, embeds).keep.to(embeds.device)
