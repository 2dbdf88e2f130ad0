from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .. import kernels
from ..kernels.reference import MATRIX_BYTES
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
      * memory and time: the n x n distance matrix is held once while it fits ``matrix_mb`` (default 1024 MiB:
        16,384 tokens; official: three of them) and each pick reads one row of it (official: every step reduces
        all picked rows again, O(k^2 n)); above it the matrix is never held: the first pick reduces it in blocks
        of 1024 rows and each later pick's row is computed (``kernels.reference.greedy_maxmin``), O(n) extra
        memory at one pass over the features per pick; the same picks either way (the same floats).
    LLaVA-NeXT / OneVision: newline tokens are candidates, as in the official code (it prunes the whole image
    feature sequence, newlines included).
    """

    name: ClassVar[str] = "divprune"
    summary: ClassVar[str] = "greedy max-min diversity of projected visual tokens, before the LLM"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    newline_candidates: ClassVar[bool] = True  # official LLaVA-NeXT code prunes the whole feature span
    matrix_mb: int = field(default=MATRIX_BYTES >> 20, metadata={"min": 0})
    """Largest n x n distance matrix (MiB) held: within it the fast dense path; above it blockwise with O(n)
    extra memory (same picks, slower on a CPU: one pass over the features per pick)."""

    def budget(self, n):
        if self.ratio is not None and self.ratio > 0:
            return min(n, max(1, int(round((1 - self.ratio) * n))))
        return super().budget(n)

    def select(self, ctx, row, span, budget):
        return kernels.greedy_maxmin(ctx.hidden[row, span.slots], budget, dtype=ctx.score_dtype,
                                     max_matrix_bytes=self.matrix_mb << 20)
