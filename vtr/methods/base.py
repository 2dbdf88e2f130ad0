"""The base class every pruning method derives from, and what a method sees when it selects."""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..signals import SelectionContext, SpanCandidates


class Stage(str, Enum):
    """Where a method removes tokens. The engine owns the sequence surgery of each stage."""

    VISION = "vision"  # inside the vision encoder, after chosen vision layers (FlowCut-style progressive pruning)
    PRE_LLM = "pre_llm"  # between the vision side and decoder layer 0
    LAYER = "layer"  # before decoder layer K; layers < K keep the full sequence and KV cache
    KV_CACHE = "kv_cache"  # during decoding: layers >= L attend to a per-step subset of the visual cache (DyCoke)


IMPLEMENTED_STAGES = (Stage.VISION, Stage.PRE_LLM, Stage.LAYER)
# Stages whose removals the language model never sees: its input is already the pruned sequence.
BEFORE_LM = (Stage.VISION, Stage.PRE_LLM)


# Not frozen: torch.compile cannot rebuild a frozen dataclass instance made in traced code after a graph break
# (methods read their stage list while selecting); hashable and compared by value all the same.
@dataclass(unsafe_hash=True)
class StageSpec:
    """stage, and layer: the first decoder layer that runs on the pruned sequence (0 for pre_llm).
    post_attention (``layer`` stages): select inside layer ``layer - 1``, after its self-attention and residual add,
    on that residual stream; that layer's MLP block then already runs on the pruned sequence (its attention and KV
    cache on the previous one). Otherwise the stage selects on the hidden states entering layer ``layer``."""

    stage: Stage
    layer: int = 0
    # this stage's position policy when it differs from the method's (None: the method's ``positions``): a ``layer``
    # stage with "original" after a ``compact`` pre_llm stage keeps the positions its tokens had at the language
    # model's input (HoliTom, PruneVid: the stage before the LLM renumbers the sequence, the one inside it keeps gaps)
    positions: str | None = None
    # ``layer`` stages: also cut the KV caches of the layers before this one down to the stage's kept tokens once
    # the prefill has filled them (PruneVid), so that later forward calls (decoding) attend to the kept tokens
    # only, in every layer. The prefill itself is unchanged. Not with tokens a merging stage adds.
    slice_earlier: bool = False
    # with ``slice_earlier``: the first layer whose cache is cut (MustDrop leaves the layers before its first
    # pruning layer whole)
    slice_from: int = 0
    post_attention: bool = False


@dataclass
class Merge:
    """What a merging method's ``select`` returns: the tokens kept and new states for some tokens.

    keep: ``[budget]`` distinct indices into the candidates, as a plain selection.
    slots: ``[m]`` the kept tokens (a subset of ``keep``, indices into the candidates) whose language-model input
    embedding (``pre_llm`` stage) or hidden state entering the stage layer (``layer`` stages) is replaced; each such
    token stays in its own slot and takes that slot's position under the stage's position policy.
    embeds: ``[m, D]`` their new embeddings (language-model input space, or hidden states at a ``layer`` stage; the
    model's dtype).
    sources: ``m`` index tensors into the candidates: the tokens merged into each replaced token (itself
    included); reported in ``handle.last.merged``.
    added: ``[a, D]`` new tokens (``layer`` stages: hidden states entering the stage layer, SparseVLM's recycled
    cluster means), inserted after the group's last kept token in the given order. They are candidates of later
    stages like the image's own tokens. Under ``positions="compact"`` they are numbered right after the kept tokens
    (the sequence renumbered); under ``"original"`` each takes the position of its anchor.
    added_sources: ``a`` index tensors into the candidates: the tokens merged into each added token.
    added_anchors: ``[a]`` indices into the candidates: whose position each added token takes under ``"original"``.
    deepstack: ``[m, levels * D]`` (``pre_llm`` stages on Qwen3-VL models) the replaced tokens' DeepStack features,
    level after level (the layout ``SelectionContext.with_deepstack`` appends); None keeps each slot's own.
    """

    keep: torch.Tensor
    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    embeds: torch.Tensor | None = None
    sources: list = field(default_factory=list)
    added: torch.Tensor | None = None
    added_sources: list = field(default_factory=list)
    added_anchors: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None


@dataclass
class VisionMerge:
    """What a merging method's ``vision_step`` returns (ToMe, MustDrop's spatial merge) instead of plain indices.

    keep: ``[n_crops, k]`` indices into each crop's current patches ([CLS] excluded: the engine keeps it), as a
    plain ``vision_step`` selection.
    into: ``[n_crops, n_patches]`` for every current patch, the position in ``keep`` (``0 .. k-1``) of the kept
    patch it merges into (a kept patch: its own position), or -1 for a patch dropped without merging.

    The engine merges by token size, ToMe's ``merge_wavg``: each kept patch becomes the size-weighted mean of
    itself and the patches merged into it, its size the sum of theirs (every token starts with size 1)."""

    keep: torch.Tensor
    into: torch.Tensor


POSITION_POLICIES = ("original", "compact", "span_prefix")
SCORE_DTYPES = ("float32", "model")

SEED = {"min": 0, "max": 2 ** 32 - 1}  # field metadata of a seed option (a torch.Generator seed)


def choices(*allowed) -> dict:
    """Field metadata of a ``str`` option that takes one of ``allowed``."""
    return {"choices": allowed}


@dataclass
class Method:
    """Base class of a pruning method: a dataclass of its options, a keep-count rule and a selection rule.

    Budget: exactly one of ``ratio`` (fraction of each image's visual tokens removed, in [0, 1)) and ``keep``
    (visual tokens kept per image, >= 1). ``ratio=0`` keeps every token for every method.
    positions: ``"original"`` (kept tokens keep their RoPE positions, decoding continues after the unpruned length)
    or ``"compact"`` (positions renumbered without the pruned tokens, decoding continues after the pruned length)
    or ``"span_prefix"`` (stages before the language model only: the kept tokens of each image or video take the
    first positions of its original span, in order, as FlowCut's Qwen-VL code gives the shortened image span; every
    other token keeps its position and decoding continues after the unpruned length).
    ``None`` takes the method's default, which is what its official code does: ``default_positions`` on models with
    1-D RoPE, ``original`` on M-RoPE models (Qwen-VL), where kept visual tokens keep their 3-D grid positions.

    scope: ``"image"`` (one budget per image or video over all its tokens) or ``"crop"`` (one budget per anyres
    tile of LLaVA-NeXT images, plus one for the base image).

    score_dtype: ``"float32"`` (default: scores, norms and similarities in fp32 whatever the model dtype) or
    ``"model"`` (in the model's dtype, as the official code computes them, so a paper's bf16 run can be reproduced
    token for token: in bf16 many scores tie and fp32 breaks those ties differently). Attention scores take the
    softmax itself in fp32 and cast it, as eager attention does; merges (averages of kept states) stay fp32 and
    DPC-KNN clustering fp64 whatever the option. Methods that compute no scores (``random``, ``uniform``) refuse
    ``"model"``.

    Keep count: at least one token per image (per tile under ``scope="crop"``) whatever the ratio, unless the
    method's own rule says otherwise; each method's docstring gives its rule.

    Vision-side methods declare ``needs={"vision"}`` and read the vision tower's signals from the selection
    context; ``model_classes`` restricts a method to the models its official code defines it for (``vtr.patch``
    refuses the others with ``unsupported_reason``) and ``visual_kinds`` to images. A merging method's ``select``
    returns a ``Merge``.

    Subclasses set the class attributes, add their options as fields (annotated ``int``, ``float``, ``bool`` or
    ``str``; ``field(metadata={"min": m, "max": M})`` bounds numbers, ``metadata=choices(...)`` lists a string's
    values; ``_check_options`` checks them all), and implement ``select``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    # Signals the engine must capture: "attention_inputs" = inputs of layer K-1's self-attention; "layer_inputs" =
    # scores come from the stage layer K's own input norm and projections applied to its input (no capture);
    # "vision" = the vision tower's layers named by ``vision_layers`` (their attention inputs and outputs, see
    # SelectionContext);
    # "clip_text" = a CLIP text tower and the language model's tokenizer, loaded at patch time from the method's
    # ``clip`` and ``tokenizer`` options (see SelectionContext.instruction_embeddings).
    needs: ClassVar[frozenset] = frozenset()
    # Model classes the method supports (None: every model vtr supports). Others are refused at patch time with
    # ``unsupported_reason``. The test matrices read this to skip those combinations.
    model_classes: ClassVar[tuple[str, ...] | None] = None
    unsupported_reason: ClassVar[str] = ""
    # Which visual inputs the method prunes; a prompt with another kind raises (tests skip those combinations),
    # except for video methods whose official code leaves images alone (EVS, VidCom2): images pass whole.
    visual_kinds: ClassVar[tuple[str, ...]] = ("image", "video")
    # Whether row-end newline tokens (LLaVA-NeXT / OneVision) are candidates; otherwise they are always kept.
    newline_candidates: ClassVar[bool] = False
    # The option setting that removes the decode-time (kv_cache) stage, if any (DyCoke: "kv_ratio=0"); errors that
    # refuse that stage on a model quote it.
    decode_stage_off: ClassVar[str] = ""
    # Whether the selection reads the prompt's text (its last token, the text after an image): then the whole
    # prompt must reach the model in one prefill, and generate(prefill_chunk_size=...) is refused.
    needs_whole_prompt: ClassVar[bool] = False
    # the option that sets the decoder layer(s) a layer or kv_cache stage starts at, named in range errors
    layer_option: ClassVar[str] = "layer"
    # Vision stage: where ``vision_step`` runs in each of ``vision_stage_layers``: "output" (on the layer's output)
    # or "attention" (on the residual stream after the layer's self-attention, before its MLP, which then runs on
    # what the step keeps: ToMe).
    vision_merge_point: ClassVar[str] = "output"
    # Whether the selection computes scores or similarities (``score_dtype`` applies); the baselines that read only
    # the layout or a seed refuse ``score_dtype="model"``.
    computes_scores: ClassVar[bool] = True

    ratio: float | None = None
    """Fraction of each image's (or video's) visual tokens removed, in [0, 1); 0 keeps every token. Give exactly one
    of ratio and keep."""
    keep: int | None = None
    """Visual tokens kept per image or video (>= 1), instead of ratio; the method's keep-count rule turns it into its
    exact count."""
    positions: str | None = field(default=None, metadata=choices(*POSITION_POLICIES))
    """RoPE position policy of the kept tokens: "original", "compact" or "span_prefix" (stages before the language
    model only); None takes the method's official default (original on M-RoPE models)."""
    # ``layer`` stages: also cut the KV caches of the layers before this one down to the stage's kept tokens once
    # the prefill has filled them (PruneVid), so that later forward calls (decoding) attend to the kept tokens
    # only, in every layer. The prefill itself is unchanged. Not with tokens a merging stage adds.
    slice_earlier: bool = False
    """Layer stages: also cut the KV caches of the layers before the stage to its kept tokens once the prefill has
    filled them, so decoding attends to the kept tokens only (PruneVid's behaviour)."""
    scope: str = field(default="image", metadata=choices("image", "crop"))
    """Budget unit: "image" (one budget per image or video) or "crop" (one per LLaVA-NeXT anyres tile plus one for
    the base image)."""
    score_dtype: str = field(default="float32", metadata=choices(*SCORE_DTYPES))
    """Precision of scores, norms and similarities: "float32", or "model" (the model's dtype, as the official code
    computes them: reproduces a bf16 run token for token)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy scalars (np.float32, np.int64) as the Python numbers they hold
            setattr(self, f.name, _plain_number(getattr(self, f.name)))
        for name in ("ratio", "keep"):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.name}: {name} must be a number, got {getattr(self, name)!r}")
        if (self.ratio is None) == (self.keep is None):
            raise ValueError(f"{self.name}: give exactly one of ratio= (fraction of visual tokens removed) and "
                             f"keep= (visual tokens kept per image), got ratio={self.ratio!r}, keep={self.keep!r}")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise ValueError(f"{self.name}: ratio must be in [0, 1) (the fraction of visual tokens "
                             f"removed), got {self.ratio!r}")
        if self.keep is not None and not (isinstance(self.keep, int) and self.keep >= 1):
            raise ValueError(f"{self.name}: keep must be an integer >= 1 (visual tokens kept per image), "
                             f"got {self.keep!r}")
        if self.score_dtype == "model" and not self.computes_scores:
            raise ValueError(f"{self.name}: score_dtype='model' does not apply: {self.name} computes no scores")
        self._check_options()

    def _check_options(self) -> None:
        """Every option but the budget, checked at construction by one rule per option type: ``bool`` options take
        ``True`` / ``False`` only; ``int`` options integers (not booleans); ``float`` options finite real numbers
        (not booleans, nan or inf); ``str`` options strings, one of ``metadata["choices"]`` when given; numbers
        within ``metadata["min"]`` / ``["max"]`` (``SEED``: a seed's range). An option annotated ``X | None`` may
        be left ``None`` (resolved per model) where its default is. Raises ``ValueError`` naming the option."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in ("ratio", "keep"):  # checked above, with the budget's own messages
                continue
            value, kind = getattr(self, f.name), hints.get(f.name)
            if value is None and f.default is None:  # an optional option left unset
                continue
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            ok = {int: isinstance(value, int) and not isinstance(value, bool),
                  float: isinstance(value, (int, float)) and not isinstance(value, bool),
                  bool: isinstance(value, bool), str: isinstance(value, str)}.get(kind, True)
            if not ok:
                raise ValueError(f"{self.name}: {f.name} must be of type {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{self.name}: {f.name} must be a finite number, got {value!r}")
            allowed = f.metadata.get("choices")
            if allowed is not None and value not in allowed:
                raise ValueError(f"{self.name}: {f.name} must be one of {allowed}, got {value!r}")
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
                raise ValueError(f"{self.name}: {f.name} must be in {bounds}, got {value!r}")

    # ----------------------------------------------------------------------------------------------- contract
    def stages(self) -> list[StageSpec]:
        """Where this method prunes, in order. Single-stage methods have one entry; a multi-stage method lists its
        stage layers in a ``layers`` option ("3,7,16", resolved at patch time by ``for_depth``)."""
        layers = getattr(self, "layers", None)
        if isinstance(layers, str):
            if not layers:
                raise ValueError(f"{self.name}: layers are resolved at patch time (vtr.patch)")
            return [StageSpec(self.stage, int(k)) for k in layers.split(",")]
        return [StageSpec(self.stage, getattr(self, "layer", 0))]

    def decode_stage(self) -> StageSpec | None:
        """The method's ``kv_cache`` stage, if any: ``StageSpec(Stage.KV_CACHE, L)``. At every single-token decoding
        step the engine computes the new token's attention at layer ``L - 1`` over the whole cache (mean over
        heads), hands each image's or video's visual part of it to ``select_decode``, and layers ``>= L`` attend to
        the visual tokens chosen for that step only (the others masked out; the full cache stays, so later steps
        choose again)."""
        return None

    def select_decode(self, state: dict, row: int, span, scores: torch.Tensor) -> torch.Tensor | None:
        """``kv_cache`` stage: indices (into the visual tokens of ``span`` present in the cache, in sequence order)
        of the ones layers ``>= L`` attend to at this step, or None for all of them. scores: ``[n]`` the step's
        attention (fp32) to those tokens. state: a dict that lives as long as the request (fresh per request)."""
        return None

    def stage_number(self, spec: StageSpec) -> int:
        """0-based position of ``spec`` among this method's stages."""
        return self.stages().index(spec)

    def vision_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        """0-based vision-tower layers whose signals a ``needs={"vision"}`` method reads, given the tower's depth
        and the layer the model takes its visual features from (``vision_feature_layer`` made non-negative: the
        layer whose output the projector reads). Defaults to that feature layer."""
        return (feature_layer,)

    # ------------------------------------------------------------------------------------------ vision stage
    def vision_stage_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        """0-based vision layers after which ``vision_step`` runs (``stage = Stage.VISION`` methods), all below
        ``feature_layer``: the tower's later layers, the projector and the language model see what they keep."""
        return ()

    def vision_target(self, n_tokens: int, n_crops: int) -> int | None:
        """Vision stage: the patches each tower input (crop) of an image keeps once the stage is done, given the
        image's visual token count in the prompt (``n_tokens``, newlines included) and its number of crops. The
        engine checks that every crop ends with exactly this many ([CLS] not counted); None: an adaptive count
        (the steps decide; MustDrop's similarity threshold). Qwen-VL towers (one crop per image): counted in merge
        units (language tokens, 4 patches each), which the engine keeps whole."""
        raise NotImplementedError

    @property
    def proportional_attention(self) -> bool:
        """Vision stage: whether, once tokens have merged, every tower layer adds ``log(size)`` of each key token to
        its attention logits (ToMe's proportional attention; eager and SDPA towers)."""
        return False

    def vision_step(self, ctx, image) -> torch.Tensor | None:
        """Vision stage: called once per image after each of ``vision_stage_layers``, with that layer's signals
        (``vtr.signals.VisionStageContext``) and the image's state (``vtr.signals.VisionImage``: its crops, their
        current patch count, the target, a per-request ``state`` dict the method may keep scores in). Returns
        ``[n_crops, k]`` indices into each crop's current patches ([CLS] excluded: the engine keeps it) to keep, the
        same ``k`` for every crop of the image, or None to keep them all, or a ``VisionMerge`` (CLIP/SigLIP towers)
        to merge the others into kept ones. Qwen-VL towers (``image.unit`` > 1):
        ``[1, k]`` indices into the image's current merge units (``image.n_units``; unit ``u`` is the current
        patches ``u * unit`` to ``u * unit + unit - 1``)."""
        raise NotImplementedError

    def supports(self, model_class: str) -> bool:
        return self.model_classes is None or model_class in self.model_classes

    def budget(self, n: int) -> int:
        """How many of an image's ``n`` visual tokens this method keeps (the default rule: ``keep`` capped at
        ``n``, or ``round(n * (1 - ratio))``, and at least 1)."""
        if self.ratio == 0:
            return n
        if self.keep is not None:
            return min(self.keep, n)
        return min(n, max(1, round(n * (1 - self.ratio))))

    def budget_for(self, ctx: SelectionContext, row: int, group: SpanCandidates) -> int:
        """The exact number of ``group``'s tokens ``select`` keeps in this row. Defaults to ``budget(len(group))``;
        a method whose count depends on more than the image (DART: the text after it) overrides this."""
        return self.budget(len(group))

    def select(self, ctx: SelectionContext, row: int, span: SpanCandidates, budget: int) -> torch.Tensor | Merge:
        """Indices (into ``span.slots``) of exactly ``budget`` distinct tokens to keep, any order, as an integer
        tensor. Called once per image of each row (per tile under ``scope="crop"``), with
        ``0 < budget < len(span)``; the engine rejects anything else, naming the method.

        A merging method returns a ``Merge`` instead: the kept indices plus new input embeddings (``pre_llm``) or
        hidden states (``layer`` stages) for some of the kept tokens, or tokens it adds (``layer`` stages)."""
        raise NotImplementedError

    def for_model(self, family) -> "Method":
        """This method with its model-dependent defaults resolved for a model family (``vtr.patches.Family``: its
        ``name`` and whether it uses M-RoPE); the position policy here (M-RoPE models default to original).
        Raises ``ValueError`` for an option the model cannot honour."""
        if self.positions is not None:
            return self
        return dataclasses.replace(self, positions="original" if family.mrope else self.default_positions)

    def for_depth(self, n_layers: int) -> "Method":
        """This method with its depth-dependent defaults resolved for a language model of ``n_layers`` decoder
        layers (multi-stage methods: their layer lists). Raises ``ValueError`` for layers the model lacks."""
        return self

    @property
    def nominal_retention(self) -> float | None:
        """The fraction of visual tokens the budget names (``1 - ratio``; None for ``keep``), reported in
        ``handle.last.nominal_retention`` beside the actual retention."""
        return 1 - self.ratio if self.ratio is not None else None

    # ----------------------------------------------------------------------------------- layer-averaged budgets
    def layer_average_range(self, n_layers: int) -> tuple[float, float] | None:
        """Methods whose ``ratio`` / ``keep`` name a *layer-averaged* retention (the fraction of an image's visual
        tokens present on average over the decoder layers: PyramidDrop, SparseVLM, VFlowOpt): the range of it
        their schedule reaches on an ``n_layers``-layer model, as fractions, up to the min-1 rule (a stage keeps at
        least one token per image) and rounding to whole tokens. None: a per-stage budget, or one the schedule
        always reaches."""
        return None

    def check_layer_average(self, n_layers: int, n: int | None = None) -> None:
        """Refuse a layer-averaged budget out of the schedule's reach (``layer_average_range``): at patch time for
        ``ratio`` (``n`` None), at the first forward for ``keep`` (``n``: the image's visual tokens). Raises
        ``ValueError`` naming the reachable range."""
        reach = self.layer_average_range(n_layers)
        if reach is None or self.ratio == 0:
            return
        if self.ratio is not None:
            target = 1 - self.ratio
        elif n is None:
            return
        else:
            target = min(1.0, self.keep / n)
        if not reach[0] - 1e-12 <= target <= reach[1] + 1e-12:
            raise unreachable_budget(self, target, reach[0], reach[1], n_layers, n)

    # ----------------------------------------------------------------------------------------------- helpers
    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __call__(self, model):
        """``with method(model) as handle:`` patches ``model`` for the block (kvpress style)."""
        from ..api import patch
        return patch(model, self)


def unreachable_budget(method: Method, target: float, low: float, high: float, n_layers: int,
                       n: int | None = None, why: str = "") -> ValueError:
    """The error for a layer-averaged budget out of a schedule's reach: it names the budget, the reachable range
    (as retention and as ``ratio``) and why. ``n``: the image's visual tokens when the budget is a ``keep``."""
    budget = f"ratio={method.ratio!r}" if method.ratio is not None else f"keep={method.keep!r} (of {n} tokens)"
    if target < low:
        keep = f", keep >= {math.ceil(low * n - 1e-9)}" if n else ""
        bound = f"the lowest it reaches is {low:.2%} (ratio <= {1 - low:.4g}{keep})"
    else:
        keep = f", keep <= {math.floor(high * n + 1e-9)}" if n else ""
        bound = f"the highest it reaches is {high:.2%} (ratio >= {1 - high:.4g}{keep})"
    return ValueError(f"{method.name}: {budget} names a layer-averaged retention of {target:.2%} of each image's "
                      f"(or video's) visual tokens, which its schedule cannot reach on this {n_layers}-layer model: "
                      f"{bound}{'; ' + why if why else ''}")


def layer_list(method: Method, text: str, n_layers: int, lowest: int = 1) -> tuple[int, ...]:
    """Parse a multi-stage method's ``layers`` option ("8,16,24": strictly increasing decoder layers in
    ``[lowest, n_layers - 1]``). Raises ``ValueError`` naming the method and the model's depth."""
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{method.name}: layers must be comma-separated integers, got {text!r}") from None
    if any(b <= a for a, b in zip(layers, layers[1:])) or not layers or layers[0] < lowest \
            or layers[-1] > n_layers - 1:
        raise ValueError(f"{method.name}: layers must be strictly increasing and in [{lowest}, {n_layers - 1}] for "
                         f"this {n_layers}-layer model, got {text!r}")
    return layers


def scale_layers(layers: tuple[int, ...], n_layers: int, depth: int = 32) -> tuple[int, ...]:
    """A schedule written for a ``depth``-layer model at the same fractions of another depth, kept strictly
    increasing and in ``[1, n_layers - 1]``. Raises ``ValueError`` when the model is too shallow."""
    out = []
    for k in layers:
        k = max(1, k * n_layers // depth)
        if out and k <= out[-1]:
            k = out[-1] + 1
        out.append(k)
    if out[-1] > n_layers - 1:
        raise ValueError(f"a {n_layers}-layer model is too shallow for {len(layers)} pruning stages; name fewer "
                         "stage layers with the layers option")
    return tuple(out)


def _plain_number(value):
    """A numpy (or other ``numbers``) scalar as the Python int / float it holds; anything else unchanged."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Number):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value
