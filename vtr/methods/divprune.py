from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import kernels
from .base import Method, Stage
from .registry import register


@register
@dataclass
class DivPrune(Method):
    """DivPrune (Alvar et al., CVPR'25): keep a maximally diverse subset of each image's projected visual tokens.

    Greedy max-min diversity on cosine distance between the projected visual embeddings (the language model's
    input): the first token is the one farthest from its nearest other token, then repeatedly the token farthest
    from the kept set. Before the language model. Official code: ``vbdi/divprune``, ``llava_arch.py: DivPrune``.

    Keep count per image: ``int(round((1 - ratio) * n))`` (official ``SUBSET_RATIO`` is the keep ratio), at least 1
    (the official loop always keeps its first pick), or ``min(keep, n)``. Positions: ``compact`` (official LLaVA
    code passes no position ids).

    Deliberate differences from the official code:
      * distances are computed in fp32 whatever the model dtype (official: model dtype; ``score_dtype="model"``
        reproduces that);
      * a kept token is never picked again, even if fp error makes its self-distance slightly positive (official:
        relies on self-distance 0); the first pick excludes the diagonal instead of taking the column's
        second-smallest value (identical unless distances underflow);
      * batched: each row and each image selects on its own (official: batch 1, one image);
      * memory: above 1024 tokens (videos, large images) the n x n distance matrix is never held (official: three
        of them, +2.3 GiB at 16,384 tokens): the first pick reduces it in blocks of 1024 rows and each later pick's
        row is computed (``kernels.reference.greedy_maxmin``), O(n) extra memory; the same picks unless two
        distances differ only in their last bit (up to 1024 tokens: the dense matrix, unchanged).
    LLaVA-NeXT / OneVision: newline tokens are candidates, as in the official code (it prunes the whole image
    feature sequence, newlines included).
    """

    name: ClassVar[str] = "divprune"
    summary: ClassVar[str] = "greedy max-min diversity of projected visual tokens, before the LLM"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    newline_candidates: ClassVar[bool] = True  # official LLaVA-NeXT code prunes the whole feature span

    def budget(self, n):
        if self.ratio is not None and self.ratio > 0:
            return min(n, max(1, int(round((1 - self.ratio) * n))))
        return super().budget(n)

    def select(self, ctx, row, span, budget):
        return kernels.greedy_maxmin(ctx.hidden[row, span.slots], budget, dtype=ctx.score_dtype)
