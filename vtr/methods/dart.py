from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kernels
from .base import Method, Stage
from .registry import register


@register
@dataclass
class DART(Method):
    """DART (Wen et al., EMNLP'25): keep pivot tokens and the tokens least duplicated by them, before layer K.

    Pivots: the ``pivot_image_tokens`` image tokens and ``pivot_text_tokens`` text tokens (after the image) with the
    largest L1 norm of their post-RoPE keys at layer ``layer - 1`` (heads concatenated). Then, pivot by pivot, the
    ``per_pivot`` image tokens least cosine-similar to the pivot (on the hidden states entering layer ``layer``
    passed through the model's final norm) are kept and leave the candidate pool. Text pivots are not image tokens
    and are not kept through this rule (text is never dropped anyway). Removed before decoder layer ``layer``
    (default 2). Needs no attention weights. Official code: ``ZichenWen1/DART``, ``DART.get_retained_image_token``.

    Keep count per image of ``n`` tokens: ``pivot_image_tokens + (pivot_image_tokens + pivot_text_tokens) * per_pivot``
    (capped at ``n``) where ``per_pivot = floor(n * (1 - ratio) / (pivot_image_tokens + pivot_text_tokens))``
    (Qwen2-VL code; e.g. 576 tokens at ratio 0.778: 4 + 8 * 15 = 124), or with ``keep=k``:
    ``per_pivot = k // (pivot_image_tokens + pivot_text_tokens)`` (LLaVA code's ``max_num_trunction``; keep=128 ->
    132 tokens). Fewer text tokens than ``pivot_text_tokens`` use all of them as pivots, and the count uses that.

    Pivot order: the official code iterates its pivots as a Python ``set`` of sequence indices, whose order is
    CPython's hash-table order, not ascending; since the pool shrinks greedily the order changes the result. vtr
    builds the same ``set`` from each row's unpadded sequence indices and iterates it, so batch-1 results match the
    official code. Positions: ``original`` (official); decoding continues after the unpruned length.

    Deliberate differences from the official code:
      * keys are taken before grouped-query repetition (official: after ``repeat_kv``); this scales every L1 norm by
        the same factor, so the pivots are the same;
      * batched and per image (official: batch 1, one image); "text after the image" excludes other images' tokens.
    """

    name: ClassVar[str] = "dart"
    summary: ClassVar[str] = "pivot tokens + tokens least similar to them (duplication), pruned before layer K"
    stage: ClassVar[Stage] = Stage.LAYER
    default_positions: ClassVar[str] = "original"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    layer: int = 2
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def per_pivot(self, n: int) -> int:
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        if self.keep is not None:
            return self.keep // pivots
        return int(n * (1 - self.ratio) / pivots)

    def budget(self, n):
        if self.ratio == 0:
            return n
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        return min(n, self.pivot_image_tokens + pivots * self.per_pivot(n))

    def select(self, ctx, row, span, budget):
        keys = ctx.keys()[row]  # [H_kv, L, d]
        key_norm = keys.float().abs().sum(dim=(0, 2))  # [L]: L1 over heads and channels
        text = ctx.text_slots(row)
        text = text[text > span.slots.max()]
        n_img = min(self.pivot_image_tokens, len(span))
        n_txt = min(self.pivot_text_tokens, len(text))
        image_pivots = torch.topk(key_norm[span.slots], n_img).indices  # indices into the span
        text_pivots = text[torch.topk(key_norm[text], n_txt).indices] if n_txt else text[:0]
        # The official pivot container is a Python set of sequence indices; iterate it the same way.
        slots = torch.cat([span.slots[image_pivots], text_pivots])
        unpadded = ctx.unpadded_positions(row, slots).tolist()
        slot_of = dict(zip(unpadded, slots.tolist()))
        order = torch.tensor([slot_of[p] for p in set(unpadded)], device=slots.device)
        pool_mask = torch.ones(len(span), dtype=torch.bool, device=slots.device)
        pool_mask[image_pivots] = False
        pool = span.slots[pool_mask]
        picked = kernels.pivot_least_similar(ctx.normed_hidden()[row], order, pool,
                                             self.per_pivot(len(span)))
        kept_slots = torch.cat([span.slots[image_pivots], picked])
        return torch.isin(span.slots, kept_slots).nonzero().flatten()
