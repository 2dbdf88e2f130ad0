from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Merge, Method, Stage
from .registry import register

LLAVA = ("LlavaForConditionalGeneration",)


@register
@dataclass
class PruMerge(Method):
    """LLaVA-PruMerge and PruMerge+ (Shang et al., ICCV'25, arXiv 2403.15388): keep the patches whose [CLS]
    attention is an outlier (PruMerge+ adds spatially uniform samples), each absorbing its most key-similar
    patches, plus one token summing the rest, before the language model.

    Per image of ``N`` patches, from the vision tower's LAST layer (CLIP layer 23 of 24; the official code hooks
    ``layers[23]``): ``a_j`` = the [CLS] query's attention to patch ``j`` computed as one head over the full
    ``q_proj`` / ``k_proj`` width, ``softmax(q k^T / sqrt(D_v))`` (``vision_cls_attention_one_head``), and the
    patches' full-width keys ``k_j``; features ``x_j`` = the feature layer's output (``hidden_states[-2]``), what the
    projector reads.

    1. outliers: ``a_j > Q3 + 1.5 IQR`` (quartiles of ``a`` by linear interpolation, numpy's percentile);
       ``ratio_o`` = their share of ``N``; kept: the top ``int(N * ratio_o)`` patches by ``a`` (PruMerge);
    2. ``plus`` (PruMerge+, the official ``forward``): also every ``int(int(1 / ratio_o) / 3)``-th patch index in
       ``[0, N - 1)`` not already kept;
    3. each kept patch ``i``: its 32 (``neighbours``) most cosine-similar patches by key among all others (kept
       ones included), ``x_i + sum_j a_j x_j`` (attention-weighted, not normalised);
    4. one more token ``sum_j a_j x_j`` over the patches not kept.
    Every token then goes through the projector.

    Keep count per image: the kept patches plus the extra token (adaptive: PruMerge keeps about 5.5 % of
    LLaVA-1.5's 576, PruMerge+ about 25 %). ``ratio`` / ``keep`` cap it: beyond ``budget - 1`` kept patches, those of
    lowest ``a`` are dropped (``ratio=0``, or ``keep`` at least the image's tokens: every token, unchanged). Positions: ``compact`` (official: the features
    form a contiguous block). Official code: ``42Shawn/LLaVA-PruMerge``, ``llava/model/multimodal_encoder/
    clip_encoder.py``: ``token_prune_merge_advanced_plus`` (``plus``, what ``CLIPVisionTower.forward`` runs),
    ``token_prune_merge_advanced`` (``plus=False``), ``outlier_dectection``, ``complement_idx``.

    Deliberate differences from the official code:
      * token order: kept patches stay in raster order (official: outliers by descending attention, then the
        samples), each with its merged embedding, and the extra token takes the slot of the last patch not kept
        (official: appended after them);
      * per image: the quartiles over the image's own patches (official: over every image of the batch at once);
      * the spatial samples run up to ``N - 1`` (official: a hard-coded 575, LLaVA-1.5's ``N - 1``); no outlier at
        all (official: a division by zero) samples every ``int(N / 3)``-th patch; fewer than ``neighbours`` other
        patches: all of them (official: a topk error); every patch kept: no extra token (official: a zero one);
      * the budget cap (the official count is adaptive only);
      * scores, keys, key similarities and merges in fp32 (official: the model dtype; ``score_dtype="model"``
        computes the attention logits, the keys and their similarities in it; the softmax and merges stay fp32);
      * with ``vision_feature_select_strategy="full"`` the [CLS] token is kept whole, outside the algorithm.
    Supported: LLaVA-1.5 (the official code's model; its anyres and other towers have no rule).
    """

    name: ClassVar[str] = "prumerge"
    summary: ClassVar[str] = "[CLS]-attention IQR outliers (+ spatial samples) absorbing key-similar patches (pre-LLM)"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = LLAVA
    unsupported_reason: ClassVar[str] = ("its official code prunes LLaVA-1.5's CLIP tower ([CLS] attention, one crop "
                                         "per image); it has no rule for anyres crops or towers without [CLS].")

    plus: bool = True
    """PruMerge+ (True: the outliers plus spatially uniform samples) or PruMerge (False: the outliers only)."""
    neighbours: int = field(default=32, metadata={"min": 1})
    """How many of the most key-similar patches each kept patch absorbs (the official topk k = 32)."""

    def vision_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(sorted({feature_layer, n_layers - 1}))

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or len(group) == 0 or (self.keep is not None and self.keep >= len(group)):
            return len(group)
        return len(self.plan(ctx, row, group)[0])

    def select(self, ctx, row, group, budget):
        keep, slots, features, sources = self.plan(ctx, row, group)
        return Merge(keep=keep, slots=slots, embeds=ctx.project_visual(features.to(ctx.vision_features(
            row, group).dtype)), sources=sources)

    def plan(self, ctx, row, group):
        """(keep ``[k]``, merged slots ``[m]``, their vision features ``[m, D_v]``, sources), indices into the
        group; computed once per stage."""
        def compute():
            layer = ctx.last_vision_layer()
            _, index = ctx.vision_sources(row, group)
            patches = (index > 0).nonzero().flatten()  # [CLS] ("full" strategy): kept whole
            patches = patches[torch.argsort(index[patches])].to(group.slots.device)
            cls = (index == 0).nonzero().flatten().to(group.slots.device)
            sub = group.subset(patches)
            attention = ctx.vision_cls_attention_one_head(row, sub, layer).float()
            keys = ctx.vision_projected_keys(row, sub, layer).to(ctx.score_dtype)  # similarities in it too
            features = ctx.vision_features(row, sub).float()
            cap = self.budget(len(group)) - len(cls) - 1  # kept patches beside [CLS] and the extra token
            kept, merged, extra, sources = self.merge(attention, keys, features, max(cap, 0))
            slots = patches[kept]
            if extra is not None:
                rest = torch.ones(len(patches), dtype=torch.bool, device=patches.device)
                rest[kept] = False
                slot = patches[rest.nonzero().flatten()[-1]]
                slots, merged = torch.cat([slots, slot[None]]), torch.cat([merged, extra[None]])
            return torch.cat([cls, slots]), slots, merged, [patches[s] for s in sources]
        return ctx.cached(("prumerge", row, group.span.index, len(group)), compute)

    def merge(self, attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, cap: int | None = None):
        """PruMerge(+) on one image's ``N`` patches in raster order: ``attention`` ``[N]``, ``keys`` ``[N, W]``,
        ``features`` ``[N, D_v]``; ``cap``: at most that many kept patches (those of highest attention). Returns
        (kept ``[k]`` patch indices ascending, their merged features ``[k, D_v]``, the extra token's features
        ``[D_v]`` or None, per kept patch then the extra token the patches merged into it)."""
        N = len(attention)
        kept = self.selection(attention)
        if cap is not None and len(kept) > cap:
            kept = kept[torch.argsort(attention[kept], descending=True, stable=True)[:cap]]
        kept = kept.sort().values
        normed = torch.nn.functional.normalize(keys, dim=-1)
        similarity = normed[kept] @ normed.T  # [k, N]
        similarity[torch.arange(len(kept)), kept] = -torch.inf  # not itself
        nearest = torch.topk(similarity, min(self.neighbours, N - 1), dim=-1).indices  # [k, n]
        merged = features[kept] + (attention[nearest, None] * features[nearest]).sum(1)
        sources = [torch.cat([kept[i:i + 1], nearest[i]]) for i in range(len(kept))]
        rest = torch.ones(N, dtype=torch.bool, device=attention.device)
        rest[kept] = False
        rest = rest.nonzero().flatten()
        if not len(rest):
            return kept, merged, None, sources
        extra = (attention[rest, None] * features[rest]).sum(0)
        return kept, merged, extra, sources + [rest]

    def selection(self, attention: torch.Tensor) -> torch.Tensor:
        """The kept patches (indices into ``attention`` ``[N]``) before merging: the IQR outliers' count of top
        patches, and (``plus``) the spatial samples not among them."""
        N = len(attention)
        q1, q3 = torch.quantile(attention.float(), torch.tensor([0.25, 0.75], device=attention.device)).tolist()
        outliers = int((attention > q3 + 1.5 * (q3 - q1)).sum())
        share = outliers / N
        top = torch.topk(attention, int(N * share)).indices
        if not self.plus:
            return top
        step = int(int(1 / share) / 3) if outliers else N // 3
        samples = torch.arange(0, N - 1, max(step, 1), device=attention.device)
        return torch.cat([top, samples[~torch.isin(samples, top)]])
