from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SEED, Merge, Method, Stage, choices, layer_list, scale_layers
from .clustering import dpc_knn
from .registry import register

# The first layers that run on the pruned sequence: after the official pruning_loc 2, 6, 15 (of 32 layers).
OFFICIAL_LAYERS = (3, 7, 16)
# Released visual-token counts at the three stages (``score.py``, env RETAIN_TOKN), keyed by the nominal
# layer-averaged budget on LLaVA-1.5's 576 tokens.
COUNTS = {"1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
          "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}}
BASE = 576
RECYCLE_FRACTION = 0.3  # the top 30% of the pruned tokens (by score) are recycled
PRIORITY_HEADS = 14  # SparseVLM+'s select_attn_head_by_sum


def stage_fractions(version: str, fraction: float) -> tuple[float, ...]:
    """Per-stage kept fractions of the image for a layer-averaged budget of ``fraction`` of its tokens: the
    released counts / 576 at the released budgets (192, 128, 96, 64 of 576), linear between them, towards
    keeping everything at 1, and proportional to the 64-token schedule below it."""
    table = sorted((b / BASE, tuple(c / BASE for c in counts)) for b, counts in COUNTS[version].items())
    table.append((1.0, (1.0, 1.0, 1.0)))
    if fraction <= table[0][0]:
        return tuple(c * fraction / table[0][0] for c in table[0][1])
    for (f0, c0), (f1, c1) in zip(table, table[1:]):
        if fraction <= f1 + 1e-12:
            t = (fraction - f0) / (f1 - f0)
            return tuple(a + t * (b - a) for a, b in zip(c0, c1))
    return (1.0, 1.0, 1.0)


@register
@dataclass
class SparseVLM(Method):
    """SparseVLM (Zhang et al., ICML'25): text-guided visual token sparsification inside the language model, with
    recycling of pruned tokens. Official code: ``Gumpest/SparseVLM`` (v1.5: main branch, ``USE_VERSION`` unset,
    behind the paper's tables); notes: ../shared/research/methods_image.md section 3.

    Raters (once per request, from the language model's input embeddings: ``SelectionContext.text_raters``): with
    ``V`` an image's embeddings and ``X`` those of the text after it, ``m = mean_visual(softmax_text(V X^T))``; the
    raters are the text tokens with ``m > mean(m)``. At each stage (the outputs of layers 2, 6, 15 are pruned: ``layers="3,7,16"``, the first
    layers that run on the pruned sequence) the score of a visual token is the raters' softmax attention to it at
    the layer before, mean over heads, then over raters (rows recomputed for the raters only; no full attention
    matrix, any attention backend). Each image keeps its top ``min(count_s, n_cur - 1)`` tokens.

    Recycling (v1.5): of the tokens pruned at a stage, the top ``int(0.3 * pruned) + 1`` by score are clustered
    into ``int(n1 / 10) + 1`` tokens by DPC-KNN on their hidden states (density noise from a generator seeded with
    ``seed``, so runs repeat) and each cluster's plain mean is inserted after the image's kept tokens. Added
    tokens are candidates of later stages, as in the official code; ``handle.last.stages[s].added`` lists them
    with their members.

    Keep counts: the released per-stage counts (``score.py``) for the nominal budgets 192 / 128 / 96 / 64 of a
    576-token image: ``ratio`` / ``keep`` name the *layer-averaged* visual token count, as the paper does ("192"
    is (3*576 + 4*300 + 9*200 + 16*110) / 32 before recycling). Other budgets and image sizes: per-stage fractions
    interpolated between the released schedules (``stage_fractions``), times the image's token count, at least 1.
    The realised average (recycled tokens included, which puts it above the nominal one, issue #33) is
    ``handle.last.layer_average``. A budget below ``K_1 / L`` (the layers before the first stage run on every
    token: 3/32 with the official layers) is out of reach: ``ValueError`` naming the lowest reachable value.

    Positions: v1.5 compacts (merged tokens numbered right after the image's kept tokens; decoding continues per
    layer with that layer's compacted numbering); ``positions="original"`` keeps original positions and gives a
    merged token its cluster centre's position (the official code has no such mode). M-RoPE models default to
    original positions, like every method there (no official Qwen code).

    ``version="2.0"`` (SparseVLM+, ``USE_VERSION=2_0``): attention probabilities divided by the rotary "gravity"
    of a constant query/key pair at each relative offset, the ``14`` heads with the largest rater-to-visual
    attention averaged instead of all, no recycling, original positions, and the V2.0 count table.

    Deliberate differences from the official code: batched (official: batch element 0 decides for the batch);
    several images per prompt: raters and counts per image, the text after each image rating it; a prompt with no
    text after the image is rated by its last token; layers are the official ones on models of at least 17
    layers, else scaled to the depth; ``layers`` may name fewer than 3 stages (the first counts of the schedule,
    for shallow models); scores in fp32 (``score_dtype="model"``: the model dtype); DPC-KNN in fp64 (the
    densities of nearby tokens differ where the 1e-6 tie-breaking noise lives), and above 1024 recycled candidates
    in blocks of 1024 rows with O(n) extra memory (official: the n x n distance matrix and its masks; same
    clusters, ``clustering.dpc_knn``); keeping everything (``ratio=0``,
    ``keep >= n``) is the identity, although the official ``min(count, n - 1)`` always drops a token.
    """

    name: ClassVar[str] = "sparsevlm"
    layer_option: ClassVar[str] = "layers"
    summary: ClassVar[str] = "text raters' attention at layers 2/6/15, released counts, pruned tokens recycled"
    stage: ClassVar[Stage] = Stage.LAYER
    default_positions: ClassVar[str] = "compact"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True
    newline_candidates: ClassVar[bool] = True  # the official code prunes the whole visual span
    version: str = dataclasses.field(default="1.5", metadata=choices(*COUNTS))
    """Version: "1.5" (main branch: recycling, compact positions) or "2.0" (SparseVLM+: rotary-corrected scores,
    top heads, no recycling, original positions)."""
    layers: str = ""
    """Stage layers, comma separated (the first layers that run on the pruned sequence); "" takes the official 3,7,16
    (scaled on models under 17 layers)."""
    seed: int = dataclasses.field(default=0, metadata=SEED)
    """Seed of the DPC-KNN density noise in the recycling step."""

    def __post_init__(self):
        super().__post_init__()
        if self.scope != "image":
            raise ValueError("sparsevlm: scope must be 'image' (its counts are per image)")

    def for_model(self, family) -> "SparseVLM":
        if self.version == "2.0" and self.positions is None:
            return dataclasses.replace(self, positions="original")
        return super().for_model(family)

    def for_depth(self, n_layers: int) -> "SparseVLM":
        if self.layers:
            if len(layer_list(self, self.layers, n_layers)) > 3:
                raise ValueError(f"sparsevlm: layers must name at most 3 stages (its counts are per stage), got "
                                 f"{self.layers!r}")
            return self
        layers = OFFICIAL_LAYERS if n_layers > OFFICIAL_LAYERS[-1] else scale_layers(OFFICIAL_LAYERS, n_layers)
        return dataclasses.replace(self, layers=",".join(map(str, layers)))

    @property
    def recycles(self) -> bool:
        return self.version == "1.5"

    def layer_average_range(self, n_layers: int) -> tuple[float, float] | None:
        """The layers before the first stage run on every token: the average is above ``K_1 / L``."""
        return self.stages()[0].layer / n_layers, 1.0

    def budget_for(self, ctx, row, group):
        n = group.span.n
        fraction = self.keep / n if self.keep is not None else 1 - self.ratio
        if fraction >= 1:  # keeping everything is the identity (the official rule always drops one token)
            return len(group)
        stage = self.stage_number(ctx.spec)
        count = max(1, round(stage_fractions(self.version, fraction)[stage] * n))
        return max(1, min(count, len(group) - 1))

    def scores(self, ctx, row, group) -> torch.Tensor:
        """``[c]``: the raters' attention to each candidate (raters: ``ctx.text_raters``, once per request), mean
        over heads (v2.0: priority heads, gravity corrected), then over raters."""
        slots = ctx.slots_of(row, ctx.text_raters(row, group.span))
        if self.version == "1.5":
            return ctx.attention_rows(row, slots)[:, group.slots].mean(0)
        probs = ctx.attention_rows(row, slots, per_head=True) / ctx.rotary_gravity(row, slots)  # [H, r, L]
        probs = probs[:, :, group.slots]
        heads = torch.topk(probs.sum((1, 2)), min(PRIORITY_HEADS, len(probs))).indices
        return probs[heads].mean(0).mean(0)

    def select(self, ctx, row, span, budget):
        scores = self.scores(ctx, row, span)
        keep = torch.topk(scores, budget).indices
        if not self.recycles:
            return keep
        pruned = torch.ones(len(span), dtype=torch.bool, device=keep.device)
        pruned[keep] = False
        pruned = pruned.nonzero().flatten()
        n1 = min(len(pruned), int(RECYCLE_FRACTION * len(pruned)) + 1)
        candidates = pruned[torch.topk(scores[pruned], n1).indices]
        n_clusters = int(n1 / 10) + 1
        features = ctx.hidden[row, span.slots[candidates]]
        generator = torch.Generator().manual_seed(self.seed)
        centres, assignment = dpc_knn(features, n_clusters, n_clusters, generator)
        added = torch.stack([features[assignment == c].float().mean(0) for c in range(len(centres))])
        return Merge(keep=keep, added=added.to(features.dtype),
                     added_sources=[candidates[assignment == c] for c in range(len(centres))],
                     added_anchors=candidates[centres])
