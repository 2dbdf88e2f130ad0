from __future__ import annotations

from dataclasses import dataclass, field
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
    132 tokens). With fewer than ``pivot_text_tokens`` text tokens after the image, all of them are pivots and the
    count is ``pivot_image_tokens + (pivot_image_tokens + n_text) * per_pivot`` (the official code raises there:
    ``torch.topk`` with ``k`` larger than the text); ``handle.last`` reports what is really kept. With
    ``per_pivot = 0`` (tiny images at high ratios) only the image pivots are kept, so never fewer than
    ``min(n, pivot_image_tokens)``.

    Pivot order: the official code iterates its pivots as a Python ``set`` built from ``image pivots + text pivots``
    (each in top-k order) of sequence indices; its order is CPython's hash-table slot order, not ascending, and
    since the pool shrinks greedily the order changes the result. vtr computes that order explicitly
    (``cpython_set_order``, from each row's unpadded sequence indices), so batch-1 results match the official code
    and eager, ``torch.compile`` and Triton paths agree. Positions: ``original`` (official); decoding continues
    after the unpruned length.

    Deliberate differences from the official code:
      * keys are taken before grouped-query repetition (official: after ``repeat_kv``); this scales every L1 norm by
        the same factor, so the pivots are the same;
      * batched and per image (official: batch 1, one image); "text after the image" excludes other images' tokens;
      * key norms and similarities in fp32 (official: model dtype; ``score_dtype="model"`` reproduces that);
      * keys are rotated at each row's own positions (a left-padded plain forward numbers rows from their first
        padding slot; the L1 norm of a rotated key depends on it), so a row selects as it would alone.
    """

    name: ClassVar[str] = "dart"
    summary: ClassVar[str] = "pivot tokens + tokens least similar to them (duplication), pruned before layer K"
    stage: ClassVar[Stage] = Stage.LAYER
    default_positions: ClassVar[str] = "original"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    needs_whole_prompt: ClassVar[bool] = True
    layer: int = 2  # range checked at patch time, against the model's depth
    """K: tokens are removed before decoder layer K; pivots come from layer K-1's keys. In [1, decoder layers - 1],
    checked at patch time."""
    pivot_image_tokens: int = field(default=4, metadata={"min": 1})
    """Image pivots per image: the image tokens with the largest L1 key norms."""
    pivot_text_tokens: int = field(default=4, metadata={"min": 0})
    """Text pivots: the text tokens after the image with the largest L1 key norms (fewer when the text is shorter)."""

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

    def budget_for(self, ctx, row, group):
        n = len(group)
        if self.ratio == 0:
            return n
        n_img = min(self.pivot_image_tokens, n)
        n_txt = min(self.pivot_text_tokens, len(_text_after(ctx, row, group)))
        return n_img + min(n - n_img, (n_img + n_txt) * self.per_pivot(n))

    def select(self, ctx, row, span, budget):
        keys = ctx.keys()[row]  # [H_kv, L, d]
        key_norm = keys.to(ctx.score_dtype).abs().sum(dim=(0, 2))  # [L]: L1 over heads and channels
        text = _text_after(ctx, row, span)
        n_img = min(self.pivot_image_tokens, len(span))
        n_txt = min(self.pivot_text_tokens, len(text))
        image_pivots = torch.topk(key_norm[span.slots], n_img).indices  # indices into the span
        text_pivots = text[torch.topk(key_norm[text], n_txt).indices] if n_txt else text[:0]
        slots = torch.cat([span.slots[image_pivots], text_pivots])
        unpadded = ctx.unpadded_positions(row, slots).tolist()
        slot_of = dict(zip(unpadded, slots.tolist()))
        order = torch.tensor([slot_of[p] for p in cpython_set_order(unpadded)], device=slots.device)
        pool_mask = torch.ones(len(span), dtype=torch.bool, device=slots.device)
        pool_mask[image_pivots] = False
        pool = span.slots[pool_mask]
        picked = kernels.pivot_least_similar(ctx.normed_hidden()[row], order, pool, self.per_pivot(len(span)),
                                             dtype=ctx.score_dtype)
        kept_slots = torch.cat([span.slots[image_pivots], picked])
        return torch.isin(span.slots, kept_slots).nonzero().flatten()


def _text_after(ctx, row, span) -> torch.Tensor:
    """Slots of the row's text tokens after the image (the official code's "text": everything after the span)."""
    text = ctx.text_slots(row)
    return text[text > span.slots.max()]


# CPython's set (Objects/setobject.c, unchanged since 3.7): a table of 8 slots to start; an int hashes to itself;
# a new key probes its home slot ``hash & mask`` and the next LINEAR_PROBES slots, then jumps by
# ``i = (i * 5 + 1 + perturb) & mask`` with ``perturb >>= 5``; when ``fill * 5 >= mask * 3`` the table grows to the
# smallest power of two above ``4 * used`` and the keys are re-inserted in slot order.
_LINEAR_PROBES, _PERTURB_SHIFT, _MIN_SIZE = 9, 5, 8


def cpython_set_order(values: list[int]) -> list[int]:
    """The iteration order of ``set(values)`` in CPython, for non-negative ints: slot order of its hash table.

    A pure function of the values and their insertion order, computed without a ``set``, so that code which
    does not iterate sets the CPython way (``torch.compile`` traces them in insertion order) still gets the order
    DART's official code sees. Example: ``[40, 45, 600, 612, 39, 700, 702, 601]`` -> ``[612, 39, 40, 45, 600, 601,
    700, 702]``."""
    table: list[int | None] = [None] * _MIN_SIZE
    used = 0
    for value in values:
        if value < 0:
            raise ValueError("cpython_set_order: values must be non-negative ints")
        if value in table:  # a list scan: the table is small and must not be a set
            continue
        _insert(table, value)
        used += 1
        if used * 5 >= (len(table) - 1) * 3:  # no deletions, so fill == used
            size, wanted = _MIN_SIZE, used * 2 if used > 50000 else used * 4
            while size <= wanted:
                size <<= 1
            old, table = table, [None] * size
            for key in old:
                if key is not None:
                    _insert(table, key)
    return [key for key in table if key is not None]


def _insert(table: list, key: int) -> None:
    mask = len(table) - 1
    perturb = key
    i = key & mask
    while True:
        for j in range(i, i + _LINEAR_PROBES + 1 if i + _LINEAR_PROBES <= mask else i + 1):
            if table[j] is None:
                table[j] = key
                return
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
