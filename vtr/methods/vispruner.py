from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.reference import row_blocks, row_products
from .base import Method, Stage
from .fastervlm import CLS_MODELS, NO_CLS
from .registry import register


@register
@dataclass
class VisPruner(Method):
    """VisPruner (Zhang et al., ICCV'25): keep the important patches by [CLS] attention, then diverse ones by
    removing duplicates from the rest.

    Important: the top ``int(T * important_ratio)`` by the [CLS] attention of the vision feature layer (mean over
    heads). Diverse: the rest, ordered by that attention (descending), is thinned until ``T - T_imp`` remain: each
    round splits the current order into A (even positions) and B (odd positions), scores each A token by its
    highest cosine similarity to a B token (feature layer hidden states, pre-projector), drops the ``min(8, R -
    T_div)`` highest-scoring A tokens and continues with the order ``[kept A by descending score, B]``. Before the
    language model. Official code: ``Theia-4869/VisPruner``, ``llava_arch.py: encode_images``.

    Keep count per image: ``T = round(n * (1 - ratio))`` or ``min(keep, n)``, at least 1, of which
    ``int(T * important_ratio)`` important (official ``visual_token_num`` and ``important_ratio``; README: 128 with
    0.5, 64 with 0.75). Positions: ``compact``. Supported: LLaVA-1.5 and LLaVA-NeXT (CLIP towers with [CLS]).

    Deliberate differences from the official code:
      * an odd number of remaining tokens (never reached with the official 576-token settings, where the official
        indexing would fail) is split the same way, A holding one more token;
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout (official: ``spatial``, 5 x 576 tokens), newline tokens
        always kept, one budget per image (``scope="crop"``: per tile, as the official code);
      * A-to-B similarities in blocks of 1024 rows, O(n) extra memory (official: the whole matrix; same result).
        The algorithm itself is cubic in time (``(R - T) / 8`` rounds of an ``R/2 x R/2`` product): seconds per
        576-token crop, about a minute for a 2304-token image on a 2-core CPU (``scope="crop"`` keeps it per crop);
      * scores and similarities in fp32 (official: model dtype; ``score_dtype="model"`` computes the attention
        logits in the tower's dtype and the features' similarities in the model's);
      * undefined in the official code, decided here: a round that must drop more tokens than group A holds
        (``min(8, R - T_div) > R // 2``, few remaining tokens for a small diverse budget; official: a
        ``RuntimeError`` from its indexing) drops all of A and the rounds go on, so exactly ``T_div`` remain; ties
        (equal attention, equal duplicate scores) go to the lower index, by stable sorts (official: ``argsort``,
        unstable, its tie order unspecified).
    """

    name: ClassVar[str] = "vispruner"
    summary: ClassVar[str] = "important patches by [CLS] attention + diverse ones by iterative duplicate removal"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLS_MODELS
    unsupported_reason: ClassVar[str] = NO_CLS
    important_ratio: float = field(default=0.5, metadata={"min": 0, "max": 1})
    """Share of the budget kept as important tokens by [CLS] attention; the rest are diverse tokens."""

    def select(self, ctx, row, span, budget):
        scores = ctx.vision_cls_attention(row, span)
        order = torch.sort(scores, descending=True, stable=True).indices
        n_important = int(budget * self.important_ratio)
        features = torch.nn.functional.normalize(ctx.vision_features(row, span).to(ctx.score_dtype), dim=-1)
        diverse = remove_duplicates(features, order[n_important:], budget - n_important)
        return torch.cat([order[:n_important], diverse])


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int, step: int = 8) -> torch.Tensor:
    """VisPruner's iterative bipartite duplicate removal: ``residual`` (indices into ``features``, in order) shrinks
    to ``target`` entries, at most ``step`` per round. features: ``[N, C]`` L2-normalised. Returns the remaining
    indices in their final order. Memory O(N) (A-to-B similarities ``BLOCK_ROWS`` rows at a time); time
    O((R - target) / step * R^2 C), the official algorithm's."""
    if target <= 0:
        return residual[:0]
    while True:
        R = len(residual)
        drop = min(step, R - target)
        if drop <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        # Blockwise (O(R) memory; the official code holds the whole A x B similarity), the same floats.
        similarity = torch.cat([row_products(features[a[start:stop]], features[b]).amax(-1)
                                for start, stop in row_blocks(len(a))])
        distinct = torch.sort(similarity, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[distinct], b])
