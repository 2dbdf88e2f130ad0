from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage
from .registry import register


@register
@dataclass
class FastV(Method):
    """FastV (Chen et al., ECCV'24): after layer K-1, keep the visual tokens the last token attends to most.

    Score: softmax attention of the last prompt token over all tokens at decoder layer ``layer - 1``, mean over
    heads (the full row, text included, as the official code); top-``k`` per image; tokens removed before decoder
    layer ``layer`` (default 2). The attention row is recomputed from layer K-1's inputs for that one query, so
    eager attention is not needed. Official code: ``pkunlp-icler/FastV``, HF KV-cache variant
    ``LlamaModel.fastv_forward``.

    Keep count per image: ``round(n * (1 - ratio))`` (HF variant's ``fastv_r`` is the drop ratio), or
    ``min(keep, n)``, and at least 1 (official: ``topk`` with ``k = 0`` keeps no image token, a case its
    576-token images never reach). Positions: ``original`` (official), decoding continues after the unpruned
    length; layers < K keep their full KV cache.

    Deliberate differences from the official code:
      * batched: every row is scored by its own last token and masks its own padding (official: batch element 0
        decides for the whole batch, padding ignored);
      * several images in a prompt: top-k is taken per image (official: one image);
      * the score is computed in fp32 from recomputed q/k rather than read from eager attention probabilities
        (equal up to fp rounding; ``score_dtype="model"`` computes it in the model dtype as eager attention does);
      * right-padded rows (plain forward) are scored by their own last real token.
    """

    name: ClassVar[str] = "fastv"
    summary: ClassVar[str] = "top-k visual tokens by last-token attention at layer K-1, pruned before layer K"
    stage: ClassVar[Stage] = Stage.LAYER
    default_positions: ClassVar[str] = "original"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True
    layer: int = 2  # range checked at patch time, against the model's depth
    """K: tokens are removed before decoder layer K, scored by the last token's attention at layer K-1. In [1,
    decoder layers - 1], checked at patch time."""

    def select(self, ctx, row, span, budget):
        scores = ctx.last_token_attention()[row, span.slots]
        return torch.topk(scores, budget).indices
