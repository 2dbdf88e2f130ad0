"""What one prefill did: the record behind ``handle.last``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import TokenLayout


@dataclass
class MergedTokens:
    """Kept tokens of one row whose embeddings a merging method replaced.

    kept: ``[m]`` their indices in the row's visual numbering. sources: ``m`` tensors: the visual indices merged
    into each (itself included). embeds: ``[m, D]`` the embeddings the language model received for them."""

    kept: torch.Tensor
    sources: list = field(default_factory=list)
    embeds: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def join(parts: list["MergedTokens"]) -> "MergedTokens":
        if not parts:
            return MergedTokens(kept=torch.zeros(0, dtype=torch.long))
        return MergedTokens(kept=torch.cat([p.kept for p in parts]), sources=[s for p in parts for s in p.sources],
                            embeds=torch.cat([p.embeds for p in parts]))


@dataclass
class StageRecord:
    """One pruning stage of one prefill.

    n_visual: per row, visual tokens present when the stage ran.
    kept: per row, ascending indices (in the row's visual numbering: all images of the row, in order) of the visual
    tokens still present after the stage.
    length: sequence length (padding included) the following layers run on.
    merged: per row, the kept tokens a merging method gave new embeddings (None when the method merged nothing).
    """

    stage: str
    layer: int
    n_visual: list[int]
    kept: list[torch.Tensor]
    length: int = 0
    merged: list[MergedTokens] | None = None


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
    def merged(self) -> list[MergedTokens] | None:
        """Per row, the kept visual tokens whose embeddings were replaced by merges (VisionZip's contextual
        tokens), with the visual tokens merged into each; None when no stage merged."""
        merged = [s.merged for s in self.stages if s.merged is not None]
        return merged[-1] if merged else None

    @property
    def n_kept(self) -> list[int]:
        return [len(k) for k in self.kept]
