from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.reference import MATRIX_BYTES, fits, gram, row_blocks, row_products
from .base import Method, Stage
from .fastervlm import CLIP_MODELS, NO_CLS
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
      * time and memory: the official rounds each multiply the gathered A and B features (``(R - T) / 8`` rounds of
        an ``R/2 x R/2 x C`` product: cubic in the tokens, times the feature width). vtr computes the ``n x n``
        cosine similarities of the crop's tokens once (while the matrix fits ``matrix_mb``, default 1024 MiB:
        16,384 tokens) and each round gathers its ``R/2 x R/2`` block from them: the rounds stay sequential (each
        reorders the next) and cubic in the tokens, but read memory instead of multiplying ``C``-wide features.
        Above the budget the rounds multiply A and B in blocks of 1024 rows, O(n) extra memory. The same picks
        either way (each similarity is the same float: ``row_products``);
      * scores and similarities in fp32 (official: model dtype; ``score_dtype="model"`` computes the attention
        logits in the tower's dtype); ties in the attention order go to the lower index (stable sort).
    """

    name: ClassVar[str] = "vispruner"
    summary: ClassVar[str] = "important patches by [CLS] attention + diverse ones by iterative duplicate removal"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLIP_MODELS
    unsupported_reason: ClassVar[str] = NO_CLS
    important_ratio: float = field(default=0.5, metadata={"min": 0, "max": 1})
    """Share of the budget kept as important tokens by [CLS] attention; the rest are diverse tokens."""
    matrix_mb: int = field(default=MATRIX_BYTES >> 20, metadata={"min": 0})
    """Largest n x n similarity matrix (MiB) held: within it each duplicate-removal round reads its block; above it
    the rounds multiply the features in blocks with O(n) extra memory (same picks, C times more work)."""

    def select(self, ctx, row, span, budget):
        scores = ctx.vision_cls_attention(row, span)
        order = torch.sort(scores, descending=True, stable=True).indices
        n_important = int(budget * self.important_ratio)
        features = torch.nn.functional.normalize(ctx.vision_features(row, span).float(), dim=-1)
        diverse = remove_duplicates(features, order[n_important:], budget - n_important,
                                    max_matrix_bytes=self.matrix_mb << 20)
        return torch.cat([order[:n_important], diverse])


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int, step: int = 8,
                      max_matrix_bytes: int | None = None) -> torch.Tensor:
    """VisPruner's iterative bipartite duplicate removal: ``residual`` (indices into ``features``, in order) shrinks
    to ``target`` entries, at most ``step`` per round. features: ``[N, C]`` L2-normalised. Returns the remaining
    indices in their final order.

    Each round needs the similarities of its A half to its B half. While the ``[N, N]`` similarity matrix fits
    ``max_matrix_bytes`` (default ``MATRIX_BYTES``) it is computed once (O(N^2 C)) and each round gathers its
    ``R/2 x R/2`` block (O((R - target) / step * R^2) in all); above, each round multiplies A and B in blocks of
    ``BLOCK_ROWS`` rows, O(N) extra memory (O((R - target) / step * R^2 C), the official algorithm's time). The
    same floats either way (``row_products``), so the same result."""
    if target <= 0:
        return residual[:0]
    similarities = None
    if len(residual) - target > 0 and fits(len(features), features.dtype, max_matrix_bytes):
        similarities = gram(features)
    while True:
        R = len(residual)
        drop = min(step, R - target)
        if drop <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        if similarities is not None:
            # two contiguous gathers, B's columns in ascending order (a max does not depend on the order)
            similarity = similarities.index_select(0, a).index_select(1, b.sort().values).amax(-1)
        else:  # blockwise (O(R) memory; the official code holds the whole A x B similarity), the same floats
            similarity = torch.cat([row_products(features[a[start:stop]], features[b]).amax(-1)
                                    for start, stop in row_blocks(len(a))])
        distinct = torch.sort(similarity, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[distinct], b])
