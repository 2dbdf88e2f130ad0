"""What one prefill did: the record behind ``handle.last``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import TokenLayout


@dataclass
class StageRecord:
    """One pruning stage of one prefill.

    n_visual: per row, visual tokens present when the stage ran.
    kept: per row, ascending indices (in the row's visual numbering: all images of the row, in order) of the visual
    tokens still present after the stage.
    length: sequence length (padding included) the following layers run on.
    """

    stage: str
    layer: int
    n_visual: list[int]
    kept: list[torch.Tensor]
    length: int = 0


@dataclass
class PrefillRecord:
    """What the most recent prefill did, per batch row.

    n_visual: visual tokens before pruning. kept / n_kept: after the last stage. stages: every stage in order.
    selection_seconds: wall time spent computing scores and choosing tokens (device synchronised).
    index: ``[B, L']`` the original prompt position of every slot of the pruned sequence the model ran on (-1 for
    padding slots vtr added), or None when nothing was pruned. Use it to map a plain forward's logits back.
    layout: where the visual tokens were (see ``vtr.layout``).
    """

    n_visual: list[int]
    stages: list[StageRecord] = field(default_factory=list)
    selection_seconds: float = 0.0
    index: torch.Tensor | None = None
    layout: TokenLayout | None = field(default=None, repr=False)

    @property
    def kept(self) -> list[torch.Tensor]:
        if self.stages:
            return self.stages[-1].kept
        return [torch.arange(n) for n in self.n_visual]

    @property
    def n_kept(self) -> list[int]:
        return [len(k) for k in self.kept]
