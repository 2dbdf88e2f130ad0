from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Method, Stage
from .fastervlm import CLIP_MODELS
from .registry import register


@register
@dataclass
class HiPrune(Method):
    """HiPrune (arXiv 2508.00553): anchors from an early "object" layer of the vision tower, their neighbours as
    buffers, and registers from the feature layer, all scored by the attention each patch receives.

    Score ("global attention"): softmax attention probabilities at a vision layer, mean over heads and over every
    query of the crop ([CLS] included), read at each patch. Anchors: the top ``round(T * alpha / 5)`` at layer
    ``object_layer`` (1-based: the official ``attentions[object_layer - 1]``). Buffers: each anchor's patch
    neighbours at flat offsets -1, +1, -side, +side in its crop (no row-wrap check, clamped to the crop, as the
    official code). Registers: the top ``T - |anchors + buffers|`` of the rest at the feature layer
    (``attentions[-2]``). Before the language model. Official code: ``Danielement321/HiPrune``,
    ``LLaVA/llava/model/llava_arch.py: encode_images``.

    Keep count per image: ``T = round(n * (1 - ratio))`` or ``min(keep, n)``, at least 1 (official:
    ``HIPRUNE_RETENTION`` split evenly over the crops). Positions: ``compact``. Supported: LLaVA-1.5 and
    LLaVA-NeXT.

    Deliberate differences from the official code:
      * the grid side is the tower's (official: hard-coded 24, the CLIP-336 grid);
      * when anchors and buffers exceed ``T`` (tiny budgets; the official ``topk`` raises), the first ``T`` of
        them are kept: anchors by score, then their -1, +1, -side, +side neighbours;
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout; buffers that fall in a tile's unpadded-away part (not
        tokens of the sequence) are skipped; newline tokens always kept; one budget per image (``scope="crop"``:
        per tile, as the official per-crop budget);
      * registers exclude anchors and buffers by masking (official: subtracts 1 from their scores; same result);
      * scores in fp32 (``score_dtype="model"``: the tower's dtype). Qwen2.5-VL (the official code's second model)
        is not supported yet: its window-attention ViT needs its own received-attention capture.
    """

    name: ClassVar[str] = "hiprune"
    summary: ClassVar[str] = "object-layer anchors + neighbour buffers + feature-layer registers, by received attention"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLIP_MODELS
    unsupported_reason: ClassVar[str] = ("the official code covers CLIP towers (LLaVA-1.5 / NeXT) and Qwen2.5-VL's "
                                         "ViT; vtr implements the CLIP path only.")
    object_layer: int = field(default=9, metadata={"min": 1})
    alpha: float = field(default=0.1, metadata={"min": 0})

    def vision_layers(self, n_layers, feature_layer):
        if self.object_layer > n_layers:
            raise ValueError(f"{self.name}: object_layer must be in [1, {n_layers}] for this {n_layers}-layer vision "
                             f"tower, got {self.object_layer}")
        return (self.object_layer - 1, feature_layer)

    def select(self, ctx, row, span, budget):
        shallow = ctx.vision_received_attention(row, span, self.object_layer - 1)
        deep = ctx.vision_received_attention(row, span)
        crop, index = ctx.vision_sources(row, span)
        anchors = torch.topk(shallow, min(round(budget * self.alpha / 5), len(span))).indices
        # CLIP puts [CLS] at index 0, so patch p (0-based, raster order) is token p + 1
        buffers = anchor_buffers(crop, index - 1, anchors.cpu(), ctx.vision_grid_side())
        keep = buffers[:budget].to(deep.device)
        if len(keep) < budget:
            rest = deep.masked_fill(torch.isin(torch.arange(len(span), device=deep.device), keep), float("-inf"))
            keep = torch.cat([keep, torch.topk(rest, budget - len(keep)).indices])
        return keep


def anchor_buffers(crop: torch.Tensor, patch: torch.Tensor, anchors: torch.Tensor, side: int) -> torch.Tensor:
    """Anchors and their neighbours, as candidate indices without repeats: the anchors (in their order), then
    their patches at flat offsets -1, +1, -side, +side in the same crop, clamped to ``[0, side * side)`` (no
    row-wrap check, as the official code); neighbours that are no candidate are skipped.

    crop, patch: ``[c]`` each candidate's crop and 0-based patch index; anchors: ``[a]`` candidate indices."""
    lookup = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(crop.tolist(), patch.tolist()))}
    out, seen = [], set()
    for offset in (0, -1, 1, -side, side):
        for a in anchors.tolist():
            p = min(max(int(patch[a]) + offset, 0), side * side - 1)
            i = lookup.get((int(crop[a]), p))
            if i is not None and i not in seen:
                seen.add(i)
                out.append(i)
    return torch.tensor(out, dtype=torch.long)
