from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage
from .registry import register


@register
@dataclass
class Uniform(Method):
    """Uniform baseline (spatial downsampling): keep tokens evenly spaced over each image's grid.

    When ``n / keep`` is a square ``s**2`` and ``s`` divides the grid's rows and columns, it keeps every ``s``-th
    row and column (centred), i.e. ``s``-fold downsampling; otherwise it keeps ``keep`` tokens evenly spaced in
    raster order (index ``floor((i + 0.5) * n / keep)``), which is also the rule for composite layouts
    (LLaVA-NeXT base + high-resolution grid, OneVision videos). Reads only the token layout.
    Keep count per image: ``round(n * (1 - ratio))`` (at least 1) or ``min(keep, n)``. Positions: ``compact`` by
    default.
    """

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "tokens evenly spaced over each image's grid (downsampling baseline), before the LLM"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    computes_scores: ClassVar[bool] = False

    def select(self, ctx, row, span, budget):
        n = len(span)
        frames, rows, cols = span.span.grid or (0, 0, 0)
        stride = math.isqrt(n // budget) if n % budget == 0 else 0
        if (span.span.grid is not None and len(span) == span.span.n and stride > 1 and stride * stride * budget == n
                and rows % stride == 0 and cols % stride == 0):
            grid_row, grid_col = span.span.row[span.ids], span.span.col[span.ids]
            on = (grid_row % stride == stride // 2) & (grid_col % stride == stride // 2)
            return on.nonzero().flatten()
        return ((torch.arange(budget, device=span.slots.device) + 0.5) * n / budget).floor().long()
