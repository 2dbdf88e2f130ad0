from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import dataclasses

import torch

from .base import Method, Stage
from .fastervlm import CLS_MODELS
from .registry import register


@register
@dataclass
class HiPrune(Method):
    """HiPrune (arXiv 2508.00553): anchors from an early "object" layer of the vision tower, their neighbours as
    buffers, and registers from the feature layer, all scored by the attention each patch receives.

    Score ("global attention"): softmax attention probabilities at a vision layer, mean over heads and over every
    query of the crop ([CLS] included), read at each patch. Anchors: the top ``round(T * alpha / 5)`` at layer
    ``object_layer`` (1-based: the official ``attentions[object_layer - 1]``; 0 = the official default, 9 on
    CLIP towers and 16 on Qwen2.5-VL). Buffers: each anchor's neighbours at flat offsets -1, +1, -width, +width
    on its grid (no row-wrap check, clamped to the grid, as the official code). Registers: the top
    ``T - |anchors + buffers|`` of the rest at the feature layer (CLIP: ``attentions[-2]``; Qwen2.5-VL: the last
    block). Before the language model. Official code: ``Danielement321/HiPrune``,
    ``LLaVA/llava/model/llava_arch.py: encode_images`` and ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (vision forward
    and ``Qwen2_5_VLForConditionalGeneration.forward``).

    Qwen2.5-VL (no [CLS] token; the official code's received-attention rule): per vision block, the attention
    probabilities are averaged over heads and summed over the queries of each patch's segment (its image, or its
    window in window-attention blocks), then averaged over the 4 patches of each 2x2 merge unit and put in
    merged-token order: one score per language-model token, so selection happens after the merger; the grid is
    the image's merged-token grid. Kept tokens keep their M-RoPE positions (official).

    Keep count per image: ``T = round(n * (1 - ratio))`` or ``min(keep, n)``, at least 1 (official:
    ``HIPRUNE_RETENTION`` split evenly over the crops; Qwen: ``round(n * RETAIN)``). Positions: ``compact`` on
    LLaVA, ``original`` on Qwen2.5-VL. Supported: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL (images).

    Deliberate differences from the official code:
      * the grid side is the tower's (official: hard-coded 24, the CLIP-336 grid);
      * when anchors and buffers exceed ``T`` (tiny budgets; the official ``topk`` raises), the first ``T`` of
        them are kept: anchors by score, then their -1, +1, -side, +side neighbours;
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout; buffers that fall in a tile's unpadded-away part (not
        tokens of the sequence) are skipped; newline tokens always kept; one budget per image (``scope="crop"``:
        per tile, as the official per-crop budget);
      * registers exclude anchors and buffers by masking (official: subtracts 1 from their scores; same result);
      * Qwen2.5-VL: per image (official: batch 1, the first image's width for every image, clamping over all
        image tokens of the prompt); attention recomputed from each block's captured input (the official code
        asserts eager or FlashAttention with an eager recompute); videos are refused (official: images only);
      * scores in fp32 (``score_dtype="model"``: the tower's dtype).
    """

    name: ClassVar[str] = "hiprune"
    summary: ClassVar[str] = "object-layer anchors + neighbour buffers + feature-layer registers, by received attention"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLS_MODELS + ("Qwen2_5_VLForConditionalGeneration",)
    unsupported_reason: ClassVar[str] = ("the official code covers CLIP towers (LLaVA-1.5 / NeXT) and Qwen2.5-VL's "
                                         "vision transformer only (vtr adds InternViT, a [CLS] tower like CLIP).")
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    object_layer: int = field(default=0, metadata={"min": 0})
    """Vision layer (1-based, as the official attentions[object_layer - 1]) whose received attention picks the
    anchors; 0 takes the official default (9 on CLIP towers, 16 on Qwen2.5-VL)."""
    alpha: float = field(default=0.1, metadata={"min": 0})
    """Anchor share: the top round(T * alpha / 5) tokens at object_layer are anchors (each with up to 4 neighbours as
    buffers); registers fill the rest of the T kept."""

    def for_model(self, family):
        method = super().for_model(family)
        if method.object_layer == 0:  # the official defaults: CLIP-L layer 9, Qwen2.5-VL block 16
            method = dataclasses.replace(method, object_layer=16 if family.mrope else 9)
        return method

    def vision_layers(self, n_layers, feature_layer):
        if self.object_layer > n_layers:
            raise ValueError(f"{self.name}: object_layer must be in [1, {n_layers}] for this {n_layers}-layer vision "
                             f"tower, got {self.object_layer}")
        return (self.object_layer - 1, feature_layer)

    def select(self, ctx, row, span, budget):
        shallow = ctx.vision_received_attention(row, span, self.object_layer - 1)
        deep = ctx.vision_received_attention(row, span)
        grid, cell, width, cells = ctx.vision_grid(row, span)
        anchors = torch.topk(shallow, min(round(budget * self.alpha / 5), len(span))).indices
        buffers = anchor_buffers(grid, cell, anchors.cpu(), width, cells)
        keep = buffers[:budget].to(deep.device)
        if len(keep) < budget:
            rest = deep.masked_fill(torch.isin(torch.arange(len(span), device=deep.device), keep), float("-inf"))
            keep = torch.cat([keep, torch.topk(rest, budget - len(keep)).indices])
        return keep


def anchor_buffers(grid: torch.Tensor, cell: torch.Tensor, anchors: torch.Tensor, width: int,
                   cells: int) -> torch.Tensor:
    """Anchors and their neighbours, as candidate indices without repeats: the anchors (in their order), then
    their cells at flat offsets -1, +1, -width, +width on the same grid, clamped to ``[0, cells)`` (no row-wrap
    check, as the official code); neighbours that are no candidate are skipped.

    grid, cell: ``[c]`` each candidate's grid (crop) and raster cell in it; anchors: ``[a]`` candidate indices."""
    lookup = {(int(g), int(p)): i for i, (g, p) in enumerate(zip(grid.tolist(), cell.tolist()))}
    out, seen = [], set()
    for offset in (0, -1, 1, -width, width):
        for a in anchors.tolist():
            p = min(max(int(cell[a]) + offset, 0), cells - 1)
            i = lookup.get((int(grid[a]), p))
            if i is not None and i not in seen:
                seen.add(i)
                out.append(i)
    return torch.tensor(out, dtype=torch.long)
