from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import SEED, Method, Stage
from .registry import register


@register
@dataclass
class Random(Method):
    """Random baseline: keep a seeded random subset of each image's visual tokens, before the language model.

    Keep count per image: ``round(n * (1 - ratio))`` (at least 1) or ``min(keep, n)``. The subset depends only on
    ``seed`` and the image's token count (not on its batch row), so results are reproducible across batchings.
    Positions: ``compact`` by default, like the pre-LLM LLaVA methods.
    """

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "seeded random subset of each image's tokens (baseline), before the LLM"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    computes_scores: ClassVar[bool] = False
    seed: int = field(default=0, metadata=SEED)
    """Seed of the subset; it depends only on the seed and the image's token count, not on the batch row."""

    def select(self, ctx, row, span, budget):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + len(span))
        return torch.randperm(len(span), generator=generator)[:budget].to(span.slots.device)
