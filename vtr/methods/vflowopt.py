from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Merge, Method, Stage, StageSpec, layer_list, scale_layers, unreachable_budget
from .registry import register

OFFICIAL_DEPTH = 28  # LLaVA-OneVision-7B's Qwen2-7B, where the official LLM stages are layers 9 and 18
OFFICIAL_LAYERS = (9, 18)
OFFICIAL_SIDE = 27  # SigLIP-so400m at 384 px: the 27 x 27 patch grid the released m was searched on

# The released configurations (``llava_onevision_training_free.py``), by layer-averaged visual-token retention:
# (t, alpha_v, m, vision keep ratio, LLM stage keep ratios).
PRESETS = {
    0.10: (39.26492840997221, 0.0, 17.386981849158786, 0.11661529508161146, (1.0, 0.6011)),
    0.25: (34.759552803070484, 0.0, 15.580797034937687, 0.2651026358526424, (0.9833433139039235, 0.8773258179532721)),
    0.50: (28.683047941520474, 0.0, 11.756787150848968, 0.7233201448753168, (0.748747637472693, 0.487)),
}


def layer_average(vit: float, llm: tuple[float, ...], layers: tuple[int, ...], n_layers: int) -> float:
    """Fraction of an image's tokens present on average over the decoder layers: ``vit`` of them before the first
    stage layer, then each stage keeping its ratio of the previous count (before rounding), as the official
    search's budget constraint counts them."""
    bounds, kept, total = (0,) + tuple(layers) + (n_layers,), vit, 0.0
    for s in range(len(bounds) - 1):
        if s:
            kept *= llm[s - 1]
        total += (bounds[s + 1] - bounds[s]) * kept
    return total / n_layers


def nearest_preset(retention: float) -> float:
    return min(PRESETS, key=lambda p: (abs(p - retention), p))


def solve_schedule(retention: float, layers: tuple[int, ...], n_layers: int, vit: float | None = None,
                   llm: tuple[float, ...] | None = None) -> tuple[float, tuple[float, ...]]:
    """(vision keep ratio, LLM stage keep ratios) whose layer average is ``retention``, starting from the nearest
    released preset (or the given ``vit`` / ``llm``).

    A released retention (0.10, 0.25, 0.50) with neither override gives the preset itself. Otherwise, as the
    official search does, the last LLM ratio is solved for the target; if that needs a ratio outside [0, 1]
    (the target is out of the preset's reach) the vision ratio is scaled instead, the LLM ratios kept; and if the
    vision ratio would then exceed 1, the vision stage alone keeps ``retention`` (LLM ratios 1). With ``llm``
    given only the vision ratio is solved (capped at 1); with both given they are returned unchanged."""
    preset = PRESETS[nearest_preset(retention)]
    if vit is not None and llm is not None:
        return vit, llm
    if vit is None and llm is None and abs(nearest_preset(retention) - retention) < 1e-9 \
            and len(layers) == len(preset[4]):
        return preset[3], preset[4]
    if llm is not None:
        return min(1.0, retention / layer_average(1.0, llm, layers, n_layers)), llm
    v = preset[3] if vit is None else vit
    base = preset[4]
    if len(base) != len(layers):
        base = (1.0,) * len(layers)
    # the average is linear in the last ratio: avg(last) = avg(0) + last * (avg(1) - avg(0))
    low = layer_average(v, base[:-1] + (0.0,), layers, n_layers)
    high = layer_average(v, base[:-1] + (1.0,), layers, n_layers)
    last = (retention - low) / (high - low) if high > low else 2.0
    if 0 <= last <= 1:
        return v, base[:-1] + (last,)
    if vit is not None:
        return v, base[:-1] + (min(1.0, max(0.0, last)),)
    scaled = retention / layer_average(1.0, base, layers, n_layers)
    if scaled <= 1:
        return scaled, base
    return retention, (1.0,) * len(layers)


@register
@dataclass
class VFlowOpt(Method):
    """VFlowOpt (Yang et al., ICCV'25): visual-token importance from the vision tower's global tokens, a grid-group
    weighted merge of the least important tokens before the language model, then further drops at two decoder
    layers by the same importance, with hyper-parameters found by Bayesian optimisation (released presets).

    Vision signal (``vision_layer``, default the feature layer: official layer 25 of the 26-layer SigLIP tower
    HF's LLaVA-OneVision runs, the last one; on other depths the tower's feature layer too): per crop, ``A`` =
    softmax attention mean over heads ``[N, N]`` (fp32), ``received = A.mean(0)``, global tokens ``G = {j:
    received_j > t * mean(received)}``, importance ``A[G].mean(0)`` (a probability-like score, unitless) plus
    ``alpha_v * softmax(E)``, ``E`` the crop's per-patch pixel entropy in bits (``alpha_v=0`` in every released
    preset, the default); newline tokens get importance 1 (official). The crop maps are laid out over the image
    as OneVision packs its features (unpadded, and bilinearly resized with the grid under ``anyres_max``).

    Before the LLM, per image of ``L`` tokens (base grid + unpadded anyres grid with its newline column):
    ``drop = round(L * (1 - r_vit))``, ``extra = int(L / m**2)``; the ``drop + extra`` least important tokens
    (stable ascending sort) are bucketed by ``(grid, floor(row / m), floor(col / m))`` on their own grid (the base
    grid, or the anyres grid including its newline column); each bucket's importance-weighted mean of the
    language-model input embeddings (weights normalised to sum 1, fp32) replaces its most important member, which
    is kept (ties: the first in the sort). Kept: ``L - min(L, drop + extra) + buckets`` tokens, compact positions
    (the official packs them). ``handle.last.merged`` lists each bucket.

    At decoder layers ``layers`` (official 9 and 18 of 28; the same fractions of other depths) stage ``s`` keeps
    ``n - round(n * (1 - r_s))`` of the image's ``n`` present tokens (at least 1), the most important by the
    vision importance above (a merged token keeps its own); positions stay those of the language model's input
    (official ``position_ids[:, mask]``), decoding continues after the stage-0 length.

    Budget: ``ratio`` / ``keep`` name the layer-averaged retention ``R`` (``1 - ratio``, or ``keep / L`` per
    image), as the paper's 10% / 25% / 50% do: ``R`` in {0.10, 0.25, 0.50} takes the released preset (t, m,
    ``r_vit``, ``r_1, r_2``); any other ``R`` starts from the nearest preset and solves the last LLM ratio so that
    the layer average (official formula: ``(r_vit * 9 + r_vit r_1 * 9 + r_vit r_1 r_2 * 10) / 28`` on the 7B)
    is ``R``; when that would need a ratio outside [0, 1], the vision ratio is scaled instead, and when even that
    exceeds 1 the vision stage alone keeps ``R`` (see ``solve_schedule``). ``t``, ``m``, ``vit_keep``,
    ``llm_keep`` ("r1,r2") override the preset (``benchmarks/vflowopt_search.py`` searches them as the official
    ``llava_ov_opt_all.py`` does). ``m`` defaults to the preset's scaled to the tower's grid (``m * side / 27``:
    unchanged on SigLIP-384). ``layers`` ("9,18" style) names other stage layers (then give ``llm_keep``),
    ``vision_layer`` (0-based) another vision layer. ``ratio=0``, or a ``keep`` of at least the image's ``L``
    tokens, keeps everything at every stage.

    Errors: ``ValueError`` for a model other than LLaVA-OneVision (``vtr.patch``), a video, ``scope="crop"``, an
    ``llm_keep`` whose count differs from the stage layers, a ``vision_layer`` the tower lacks, a budget that
    ``vit_keep`` or ``llm_keep`` alone puts out of reach (naming the reachable range).

    Official code: ``sihany077/VFlowOpt``, ``siglip_encoder.py`` (``SigLipEncoderLayer.forward``),
    ``llava_qwen_training_free.py`` (``prepare_inputs_labels_for_multimodal``), ``modeling_qwen2.py``
    (``Qwen2Model.forward_illava``, KV-cache path), ``llava_ov_opt_all.py`` (search). Notes:
    ../shared/research/methods_image.md section 10.

    Deliberate differences from the official code:
      * per image and batched, the importance of the kept tokens carried to the LLM stages in the request's state
        (official: batch 1, a JSON list in the ``VIT_ATTN_MAP`` environment variable, one image);
      * a crop without any global token (``t`` too high for its attention) scores by the received attention
        (official: the mean over an empty set, NaN importance);
      * every image of a prompt is pruned, each with its own budget (official: the single-image ``anyres_max``
        path only; multi-image prompts and base-only images are left whole);
      * ``m`` scaled to the tower's grid and the LLM stage layers to the model's depth (tiny test models); the
        vision layer is the tower's feature layer whatever its depth;
      * the patch-entropy term (``alpha_v``, 0 in every released preset): pixels cast to integers in fp32 and
        wrapped modulo 256 explicitly (official: ``(x * 255).to(uint8)`` in the pixel dtype, whose wrap of
        negative values is the CPU's behaviour, not guaranteed on GPU); the tower's patch size (official: 14);
      * the least important tokens (before the LLM and at the LLM stages) by a stable ascending sort, ties to
        the earlier token (official: ``torch.sort``, unstable on ties); the non-cache FastV-style path of
        ``forward_illava`` (training) is not implemented;
      * scores and merges in fp32 (official: the same, attention cast to fp32; ``score_dtype="model"``
        computes the attention in the tower's dtype).
    """

    name: ClassVar[str] = "vflowopt"
    summary: ClassVar[str] = ("vision global-token importance: grid-group weighted merge of the least important, "
                              "then drops at decoder layers 9 / 18")
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    layer_option: ClassVar[str] = "layers"
    needs: ClassVar[frozenset] = frozenset({"vision"})
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    newline_candidates: ClassVar[bool] = True  # counted in L with importance 1, as the official code does
    model_classes: ClassVar[tuple[str, ...] | None] = ("LlavaOnevisionForConditionalGeneration",)
    unsupported_reason: ClassVar[str] = "the official code covers LLaVA-OneVision (SigLIP + Qwen2) only."

    t: float | None = field(default=None, metadata={"min": 0.0})
    """Global-token threshold: tokens receiving more than t times the mean attention are global; None takes the
    preset's."""
    m: float | None = field(default=None, metadata={"min": 1e-6})
    """Side of the grid buckets the least important tokens are merged in; None takes the preset's."""
    alpha_v: float = field(default=0.0, metadata={"min": -1.0, "max": 1.0})
    """Weight of the patch-entropy term in the importance (0 in every released preset)."""
    vit_keep: float | None = field(default=None, metadata={"min": 1e-9, "max": 1.0})
    """r_vit: share of each image kept before the language model; None takes the preset's (or solves it)."""
    llm_keep: str = ""
    """Shares kept at the two decoder stages as "r1,r2"; "" takes the preset's (or solves the last one)."""
    layers: str = ""
    """Decoder stage layers, comma separated; "" takes the official 9,18 of 28, scaled (with other layers, give
    llm_keep)."""
    vision_layer: int | None = field(default=None, metadata={"min": 0})
    """Vision layer (0-based) whose attention gives the importance; None: the feature layer."""

    def __post_init__(self):
        super().__post_init__()
        if self.scope != "image":
            raise ValueError(f"{self.name}: scope must be 'image' (its budget and merge groups are per image)")
        self.llm_ratios()

    # ------------------------------------------------------------------------------------------- schedule
    def llm_ratios(self) -> tuple[float, ...] | None:
        if not self.llm_keep:
            return None
        try:
            ratios = tuple(float(x) for x in self.llm_keep.split(","))
        except ValueError:
            raise ValueError(f"{self.name}: llm_keep must be comma-separated keep ratios, got "
                             f"{self.llm_keep!r}") from None
        if not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"{self.name}: llm_keep ratios must be in (0, 1], got {self.llm_keep!r}")
        return ratios

    def retention(self, n: int) -> float:
        return 1 - self.ratio if self.ratio is not None else min(1.0, self.keep / n)

    def preset(self, n: int) -> tuple:
        return PRESETS[nearest_preset(self.retention(n))]

    def threshold(self, n: int) -> float:
        return self.t if self.t is not None else self.preset(n)[0]

    def group_side(self, n: int, side: int) -> float:
        return self.m if self.m is not None else self.preset(n)[2] * side / OFFICIAL_SIDE

    def schedule(self, n: int, n_layers: int) -> tuple[float, tuple[float, ...]]:
        """(vision keep ratio, LLM stage keep ratios) for an image of ``n`` tokens."""
        layers = tuple(s.layer for s in self.stages()[1:])
        vit, llm = solve_schedule(self.retention(n), layers, n_layers, self.vit_keep, self.llm_ratios())
        if len(llm) != len(layers):
            raise ValueError(f"{self.name}: llm_keep names {len(llm)} ratios for {len(layers)} stage layers")
        return vit, llm

    # ----------------------------------------------------------------------------------------------- stages
    def stages(self) -> list[StageSpec]:
        if not self.layers:
            raise ValueError(f"{self.name}: layers are resolved at patch time (vtr.patch)")
        return [StageSpec(Stage.PRE_LLM, 0)] + [StageSpec(Stage.LAYER, int(k), positions="original")
                                                 for k in self.layers.split(",")]

    def for_depth(self, n_layers: int) -> VFlowOpt:
        if self.layers:
            layers = layer_list(self, self.layers, n_layers)
        else:
            layers = scale_layers(OFFICIAL_LAYERS, n_layers, OFFICIAL_DEPTH)
        method = dataclasses.replace(self, layers=",".join(map(str, layers)))
        ratios = method.llm_ratios()
        if ratios is not None and len(ratios) != len(layers):
            raise ValueError(f"{self.name}: llm_keep names {len(ratios)} ratios for {len(layers)} stage layers "
                             f"({method.layers})")
        if ratios is None and len(layers) != len(OFFICIAL_LAYERS) and self.ratio != 0:
            raise ValueError(f"{self.name}: the presets have {len(OFFICIAL_LAYERS)} LLM stages; with other layers "
                             "give llm_keep")
        return method

    def vision_layers(self, n_layers, feature_layer):
        if self.vision_layer is None:
            return (feature_layer,)
        if self.vision_layer >= n_layers:
            raise ValueError(f"{self.name}: vision_layer must be in [0, {n_layers - 1}] for this {n_layers}-layer "
                             f"vision tower, got {self.vision_layer}")
        return (self.vision_layer,)

    def check_layer_average(self, n_layers: int, n: int | None = None) -> None:
        """A budget ``vit_keep`` or ``llm_keep`` puts out of reach (the other part of the schedule solved for it
        would need a keep ratio outside [0, 1]) is refused, naming the reachable range; with both given the
        schedule is the user's and the budget only picks the preset's ``t`` and ``m``."""
        llm = self.llm_ratios()
        if self.ratio == 0 or (self.vit_keep is None and llm is None) or (self.vit_keep is not None and llm):
            return
        if self.ratio is None and n is None:
            return
        target = self.retention(n or 1)
        layers = tuple(s.layer for s in self.stages()[1:])
        vit, solved = solve_schedule(target, layers, n_layers, self.vit_keep, llm)
        if abs(layer_average(vit, solved, layers, n_layers) - target) <= 1e-9:
            return
        if llm is not None:
            low, high = 0.0, layer_average(1.0, llm, layers, n_layers)
            why = f"llm_keep={self.llm_keep!r} fixes the LLM stages"
        else:
            base = PRESETS[nearest_preset(target)][4]
            base = base if len(base) == len(layers) else (1.0,) * len(layers)
            low = layer_average(self.vit_keep, base[:-1] + (0.0,), layers, n_layers)
            high = layer_average(self.vit_keep, base[:-1] + (1.0,), layers, n_layers)
            why = f"vit_keep={self.vit_keep!r} fixes the vision stage"
        raise unreachable_budget(self, target, low, high, n_layers, n, why)

    def budget_for(self, ctx, row, group):
        n = group.span.n
        if self.ratio == 0 or len(group) == 0 or (self.keep is not None and self.keep >= n):
            return len(group)
        stage = self.stage_number(ctx.spec)
        if stage == 0:
            return len(self.plan(ctx, row, group).keep)
        keep = self.schedule(n, ctx.fwd.request.record.n_layers)[1][stage - 1]
        return max(1, len(group) - round(len(group) * (1 - keep)))

    def select(self, ctx, row, group, budget):
        if self.stage_number(ctx.spec) == 0:
            return self.plan(ctx, row, group)
        importance = ctx.request_state[self.name][row, group.span.offset][group.ids.cpu()]
        order = torch.sort(importance, stable=True).indices
        return order[len(group) - budget:].to(group.slots.device)

    # ------------------------------------------------------------------------------------- pre-LLM merge
    def plan(self, ctx, row, group) -> Merge:
        def compute():
            span, ids = group.span, group.ids.cpu()
            # newline tokens: importance 1 (official), far above any attention share
            importance = ctx.vision_global_attention(row, group, self.threshold(span.n), self.vision_layer,
                                                     newline=1.0, entropy_weight=self.alpha_v).float().cpu()
            base = (span.frame == 0).cpu() & ~span.newline.cpu()
            side = int(span.col.cpu()[base].max()) + 1  # the base grid is side x side
            full = torch.ones(span.n, dtype=torch.float32)
            full[ids] = importance
            ctx.request_state.setdefault(self.name, {})[row, span.offset] = full
            vit, _ = self.schedule(span.n, ctx.fwd.request.record.n_layers)
            return grid_merge(importance, ctx.hidden[row, group.slots.to(ctx.hidden.device)],
                              span.frame.cpu()[ids], span.row.cpu()[ids], span.col.cpu()[ids], vit,
                              self.group_side(span.n, side))
        merge = ctx.cached(("vflowopt", row, group.span.offset), compute)
        return dataclasses.replace(merge, embeds=merge.embeds.to(ctx.hidden.dtype))


def grid_merge(importance: torch.Tensor, embeds: torch.Tensor, grid: torch.Tensor, row: torch.Tensor,
               col: torch.Tensor, vit: float, m: float) -> Merge:
    """VFlowOpt's pre-LLM step on one image's ``L`` tokens: ``importance`` ``[L]`` (fp32), ``embeds`` ``[L, D]``
    language-model input embeddings, ``grid`` / ``row`` / ``col`` ``[L]`` each token's grid and cell on it,
    ``vit`` the vision keep ratio, ``m`` the bucket side. Returns a ``Merge`` (fp32 embeds) of the kept tokens."""
    L = len(importance)
    drop = round(L * (1 - vit))
    low = torch.sort(importance, stable=True).indices[:min(L, drop + int(L / (m * m)))]
    keep = torch.ones(L, dtype=torch.bool)
    keep[low] = False
    # buckets keyed by (grid, row // m, col // m), members in the sort order (official: float32 floor division)
    rows = (row[low].float() / m).floor().long().tolist()
    cols = (col[low].float() / m).floor().long().tolist()
    buckets: dict = {}
    for i, g, r, c in zip(low.tolist(), grid[low].tolist(), rows, cols):
        buckets.setdefault((g, r, c), []).append(i)
    slots, states, sources = [], [], []
    x = embeds.float()
    for members in buckets.values():
        members = torch.tensor(members)
        weights = importance[members]
        rep = int(members[int(weights.argmax())])
        keep[rep] = True
        if len(members) > 1:
            weights = (weights / weights.sum()).to(x.device)
            slots.append(rep)
            states.append((weights[:, None] * x[members.to(x.device)]).sum(0))
            sources.append(members.sort().values)
    device = embeds.device
    return Merge(keep=keep.nonzero().flatten().to(device), slots=torch.tensor(slots, dtype=torch.long, device=device),
                 embeds=torch.stack(states) if states else x.new_zeros(0, x.shape[1]), sources=sources)
