from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.reference import row_blocks, row_products
from .base import Method, Stage, choices
from .fastervlm import CLS_MODELS, GLOBAL_ATTENTION_MODELS, IMPORTANCE, NO_SUBSTITUTE, resolve_importance
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
    0.5, 64 with 0.75). Positions: ``compact`` (M-RoPE models: ``original``). Supported: LLaVA-1.5, LLaVA-NeXT and
    InternVL 3 / 3.5 (towers with [CLS]); Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE), Qwen3.5 (dense, MoE) and
    GLM-4.1V / 4.5V through the substitute below.

    Towers without [CLS] (Qwen-VL, GLM-4.1V; ``importance="global"``, their default): the substitute the authors
    describe in VisPruner#1 and LightCompress ports to Qwen2.5-VL (``token_reduction/vispruner.py``,
    ``prune_qwenv25vl_hook``): the importance of a token is the attention it receives in the tower's last block
    (mean over heads, summed over the queries of its image), averaged over the 2x2 unit of patches the merger
    makes one token of (``vision_received_attention``), and the duplicate removal compares the merged tokens
    themselves, the merger's outputs (``vision_token_features``). Kept tokens keep their M-RoPE positions
    (LightCompress: the kept tokens' ``position_ids``). ``importance="global"`` on a [CLS] tower reads the same
    received attention at the feature layer ([CLS] query included), for comparison.

    Deliberate differences from the official code:
      * an odd number of remaining tokens (never reached with the official 576-token settings, where the official
        indexing would fail) is split the same way, A holding one more token;
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout (official: ``spatial``, 5 x 576 tokens), newline tokens
        always kept, one budget per image (``scope="crop"``: per tile, as the official code);
      * time and memory: the official rounds each multiply the gathered A and B features (``(R - T) / 8`` rounds of
        an ``R/2 x R/2 x C`` product: cubic in the tokens). vtr finds each token's 64 most similar tokens once (one
        pass over the similarities, in blocks of 1024 rows, O(n) memory) and a round reads, per A token, the first
        of them in B (the largest similarity to B; the official product with B for a token with none in B), so
        the sequential rounds cost ``R/2 x 64`` each: quadratic in all, the first pass's. The same picks (each
        similarity is the same float: ``row_products``);
      * scores and similarities in fp32 (official: model dtype; ``score_dtype="model"`` computes the attention
        logits in the tower's dtype and the features' similarities in the model's);
      * Qwen-VL / GLM-4.1V (the substitute): per image (LightCompress: batch 1, one budget over all the prompt's
        image tokens); the important count is ``int(T * important_ratio)`` (LightCompress adds 1 when ``n - T_imp``
        is odd, a workaround for its even/odd split, which vtr's split does not need); videos are refused (images
        only, as LightCompress);
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
    model_classes: ClassVar[tuple[str, ...] | None] = CLS_MODELS + GLOBAL_ATTENTION_MODELS
    unsupported_reason: ClassVar[str] = NO_SUBSTITUTE
    important_ratio: float = field(default=0.5, metadata={"min": 0, "max": 1})
    """Share of the budget kept as important tokens by [CLS] attention; the rest are diverse tokens."""
    importance: str | None = field(default=None, metadata=choices(*IMPORTANCE))
    """The important tokens' score: "cls" (the [CLS] query's attention, official) or "global" (the attention each
    token receives, the authors' substitute for towers without [CLS]); None: "cls" where the tower has a [CLS]
    token, "global" on Qwen-VL and GLM-4.1V."""

    def for_model(self, family):
        return resolve_importance(super().for_model(family), family)

    def select(self, ctx, row, span, budget):
        scores = ctx.vision_cls_attention(row, span) if self.importance == "cls" else \
            ctx.vision_received_attention(row, span)
        order = torch.sort(scores, descending=True, stable=True).indices
        n_important = int(budget * self.important_ratio)
        features = torch.nn.functional.normalize(ctx.vision_token_features(row, span).to(ctx.score_dtype), dim=-1)
        diverse = remove_duplicates(features, order[n_important:], budget - n_important)
        return torch.cat([order[:n_important], diverse])


NEIGHBOURS = 64  # most similar tokens kept per token for the duplicate-removal rounds


def nearest_neighbours(features: torch.Tensor, m: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)``, each ``[N, min(m, N)]``: every row's ``m`` largest cosine similarities to the rows of
    ``features`` (``[N, C]``, L2-normalised; itself included), in descending order, and whose they are. Computed
    ``BLOCK_ROWS`` rows at a time (O(N m) memory); each value is the float the full product holds
    (``row_products``)."""
    n = len(features)
    m = min(m, n)
    values = torch.empty(n, m, dtype=features.dtype, device=features.device)
    indices = torch.empty(n, m, dtype=torch.long, device=features.device)
    for start, stop in row_blocks(n):
        values[start:stop], indices[start:stop] = torch.topk(row_products(features[start:stop], features), m, dim=1)
    return values, indices


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int, step: int = 8,
                      neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """VisPruner's iterative bipartite duplicate removal: ``residual`` (indices into ``features``, in order) shrinks
    to ``target`` entries, at most ``step`` per round. features: ``[N, C]`` L2-normalised. Returns the remaining
    indices in their final order.

    Each round scores every token of its A half by its largest similarity to a token of its B half. The official
    rounds multiply the gathered A and B features (``R/2 x R/2 x C`` per round, ``(R - target) / step`` rounds:
    cubic in the tokens). Here each token's ``neighbours`` most similar tokens are found once
    (``nearest_neighbours``: one pass over the ``N x N`` similarities, in blocks) and a round reads, for each A token,
    the first of them in B: the largest similarity to B, since every token outside the list is no more similar
    (``R/2 x neighbours`` per round). A token none of whose neighbours is in B (late rounds, when B is small) is
    scored by its products with B, as the official round does. The same floats as the official rounds' products
    (``row_products``), hence the same result; O(N neighbours) memory."""
    if target <= 0:
        return residual[:0]
    if len(residual) <= target:
        return residual
    values, indices = nearest_neighbours(features, neighbours)
    in_b = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    while True:
        R = len(residual)
        drop = min(step, R - target)
        if drop <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]
        in_b.zero_()
        in_b[b] = True
        hits = in_b[indices[a]]  # [R/2, m]: which of each A token's nearest tokens are in B
        first = hits.to(torch.uint8).argmax(1, keepdim=True)  # the most similar of them (argmax: first True)
        similarity = values[a].gather(1, first)[:, 0]
        missing = (~hits.any(1)).nonzero().flatten()
        if len(missing):  # no neighbour in B: the official products with B, in blocks (O(R) memory)
            similarity[missing] = torch.cat([row_products(features[a[missing[start:stop]]], features[b]).amax(-1)
                                             for start, stop in row_blocks(len(missing))])
        distinct = torch.sort(similarity, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[distinct], b])
