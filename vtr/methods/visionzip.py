from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.reference import row_blocks, row_products
from .base import Merge, Method, Stage, choices
from .fastervlm import CLS_MODELS, GLOBAL_ATTENTION_MODELS, IMPORTANCE, NO_SUBSTITUTE, resolve_importance
from .registry import register


@register
@dataclass
class VisionZip(Method):
    """VisionZip (Yang et al., CVPR'25): keep the dominant patches by [CLS] attention and merge the rest into a few
    contextual tokens.

    Per image of ``n`` candidate tokens and a budget of ``T``: ``C = T * 5 // 32`` contextual and ``D = T - C``
    dominant tokens (the paper's 54+10, 108+20, 162+30 for 64 / 128 / 192). Dominant: the top ``D`` by the [CLS]
    attention of the vision feature layer (CLIP layer 22, ``attentions[-2]``). Contextual: the remaining tokens in
    order; every ``max(1, len // C)``-th of them (the first ``C``) is a target; every other remaining token joins
    the target whose head-mean key (the feature layer's ``k_proj`` output averaged over heads, L2-normalised) is
    most cosine-similar (ties to the first target); a contextual token is ``target + mean(members)`` (plus 0 when
    it has none) on the feature layer's hidden states, then through the projector. Official code:
    ``dvlab-research/VisionZip``, ``CLIPVisionTower_VisionZip.forward``, ``utils.py: CLIPAttention_forward``.

    Keep count per image: ``T = round(n * (1 - ratio))`` or ``min(keep, n)``, at least 1 (``keep=64`` gives the
    official 54 + 10). Each contextual token takes its target's slot with the merged embedding
    (``handle.last.merged`` lists the tokens merged into each). Positions: ``compact`` (official: a contiguous
    block; M-RoPE models: ``original``). Supported: LLaVA-1.5, LLaVA-NeXT and InternVL 3 / 3.5 (towers with [CLS]);
    Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE), Qwen3.5 (dense, MoE) and GLM-4.1V / 4.5V through the substitute
    below.

    Towers without [CLS] (Qwen-VL, GLM-4.1V; ``importance="global"``, their default): LightCompress's Qwen2.5-VL
    port (``token_reduction/visionzip.py``: ``Qwen2_5_VLVisionAttention_forward``, ``merger_hook``,
    ``prune_qwenv25vl_hook``), the "global attention" VisPruner#1 describes for such towers: dominant tokens by the
    attention each token receives in the tower's last block (mean over heads, summed over the queries of its
    image), averaged over the 2x2 unit of patches the merger makes one token of (``vision_received_attention``);
    contextual targets and assignment by that block's keys after the vision RoPE, mean over heads, averaged over
    the unit (``vision_keys``); the merge (``target + mean(members)``) on the merged tokens themselves, the
    merger's outputs (``vision_token_features``), which are the language model's inputs (no projector runs).
    Each contextual token keeps its target's M-RoPE position (LightCompress: the target's ``position_ids``). On
    Qwen3-VL the DeepStack features of a contextual token are merged the same way (no official code: Qwen3-VL is
    newer than the port; a linear merge of each level, as of the main features).

    Deliberate differences from the official code:
      * the [CLS] token: the official code always keeps it as one of the ``D`` dominant tokens and feeds it to the
        language model; transformers' LLaVA (``vision_feature_select_strategy="default"``) has no slot for it, so
        the ``D`` dominant tokens are all patches (with ``"full"``, the [CLS] token is a candidate and always kept);
      * token order: each contextual token sits in its target's slot, among the dominant tokens (official: all
        dominant tokens in order, then the ``C`` contextual tokens);
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout, newline tokens always kept, one budget per image
        (``scope="crop"``: per tile, as the official code, which compresses each crop and re-lays the sub-crops'
        dominant tokens on the global grid), targets chosen over the image's tokens in sequence order;
      * the member-to-target similarities in blocks of 1024 members, O(n) extra memory (official: the whole
        matrix; same assignment);
      * [CLS] attention mean over heads instead of the sum (the same order), fp32 scores, keys and merges (official:
        model dtype; ``score_dtype="model"`` computes the scores in the tower's dtype and the key similarities in
        the model's; merges stay fp32);
      * Qwen-VL / GLM-4.1V (the substitute): the vtr split of the budget (LightCompress: ``dominant`` and
        ``contextual`` as fractions of the image tokens, no default) and per image (LightCompress: batch 1, one
        selection over all the prompt's image tokens); videos are refused (images only, as LightCompress).
    """

    name: ClassVar[str] = "visionzip"
    summary: ClassVar[str] = "dominant patches by [CLS] attention + contextual tokens merged by key similarity"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLS_MODELS + GLOBAL_ATTENTION_MODELS
    unsupported_reason: ClassVar[str] = NO_SUBSTITUTE
    importance: str | None = field(default=None, metadata=choices(*IMPORTANCE))
    """The dominant tokens' score: "cls" (the [CLS] query's attention, official) or "global" (the attention each
    token receives, the substitute for towers without [CLS]); None: "cls" where the tower has a [CLS] token,
    "global" on Qwen-VL and GLM-4.1V."""

    def for_model(self, family):
        return resolve_importance(super().for_model(family), family)

    @staticmethod
    def split(budget: int) -> tuple[int, int]:
        """(dominant, contextual) counts of a budget."""
        contextual = budget * 5 // 32
        return budget - contextual, contextual

    def select(self, ctx, row, span, budget):
        dominant, contextual = self.split(budget)
        if self.importance == "cls":
            scores = ctx.vision_cls_attention(row, span)
            _, index = ctx.vision_sources(row, span)
            cls = (index if index.dim() == 1 else index[:, 0]) == 0
            scores = scores.masked_fill(cls.to(scores.device), float("inf"))  # [CLS] ("full"): always kept
        else:
            scores = ctx.vision_received_attention(row, span)
        top = torch.topk(scores, dominant).indices
        if contextual == 0:
            return top
        rest = torch.ones(len(span), dtype=torch.bool, device=top.device)
        rest[top] = False
        rest = rest.nonzero().flatten()  # remaining candidates, in sequence order
        keys = torch.nn.functional.normalize(ctx.vision_keys(row, span)[rest].to(ctx.score_dtype), dim=-1)
        features = ctx.vision_token_features(row, span)
        hidden = ctx.with_deepstack(row, span, features)[rest].float()  # Qwen3-VL: the DeepStack levels merge too
        targets, members, assign = contextual_assignment(keys, contextual)
        merged = merge_into_targets(hidden, targets, members, assign)
        embeds, deepstack = ctx.visual_inputs(merged.to(features.dtype))
        return Merge(keep=torch.cat([top, rest[targets]]), slots=rest[targets], embeds=embeds, deepstack=deepstack,
                     sources=[torch.cat([rest[t:t + 1], rest[members[assign == j]]]) for j, t in
                              enumerate(targets.tolist())])


def contextual_assignment(keys: torch.Tensor, contextual: int):
    """Uniformly strided targets and the nearest target of every other token.

    keys: ``[R, d]`` L2-normalised keys of the remaining tokens. Returns (targets ``[C]``, members ``[R - C]``,
    assign ``[R - C]``: index into targets of each member's most similar target, ties to the first)."""
    R = keys.shape[0]
    step = max(1, R // contextual)
    targets = torch.arange(0, R, step, device=keys.device)[:contextual]
    is_target = torch.zeros(R, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    members = (~is_target).nonzero().flatten()
    # Blockwise (O(R) memory per block of members; the official code holds the whole R x C similarity), the
    # same floats and ties.
    assign = torch.cat([row_products(keys[members[start:stop]], keys[targets]).argmax(-1)
                        for start, stop in row_blocks(len(members))]) if len(members) else members
    return targets, members, assign


def merge_into_targets(hidden: torch.Tensor, targets, members, assign) -> torch.Tensor:
    """``[C, D]``: each target's hidden state plus the mean of its members' (nothing added without members)."""
    sums = torch.zeros(len(targets), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, assign, hidden[members])
    counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(hidden.dtype)
    return hidden[targets] + sums / counts[:, None]
