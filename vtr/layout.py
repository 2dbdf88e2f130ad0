"""Where the visual tokens are: one record per batch row, built by the model-family patch from the prompt.

Methods that need spatial or temporal structure read only this record, never model internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VisualSpan:
    """One image or video of one batch row.

    positions: ``[n]`` sequence positions of its tokens in the (padded) row, ascending.
    grid: ``(frames, rows, cols)`` of language-model tokens, raster order (frame, then row, then column).
    frame, row, col: ``[n]`` grid coordinates of each token; newline: ``[n]`` bool, True for row-end newline tokens
    (which have no column of their own: their ``col`` equals ``cols``).
    offset: index of the span's first token in the row's visual numbering (all spans of the row, in order).
    """

    kind: str
    index: int
    positions: torch.Tensor
    grid: tuple[int, int, int]
    offset: int
    frame: torch.Tensor = field(repr=False, default=None)
    row: torch.Tensor = field(repr=False, default=None)
    col: torch.Tensor = field(repr=False, default=None)
    newline: torch.Tensor = field(repr=False, default=None)

    def __post_init__(self):
        if self.frame is None:
            self.frame, self.row, self.col = raster_coordinates(self.grid, self.positions.device)
            self.newline = torch.zeros(len(self.positions), dtype=torch.bool, device=self.positions.device)
        if len(self.frame) != len(self.positions):
            raise ValueError(f"{self.kind} {self.index}: grid {self.grid} does not cover {len(self.positions)} tokens")

    @property
    def n(self) -> int:
        return len(self.positions)


@dataclass
class RowLayout:
    spans: list[VisualSpan]
    length: int  # sequence length of the row (padding included)

    @property
    def n_visual(self) -> int:
        return sum(s.n for s in self.spans)

    @property
    def visual_positions(self) -> torch.Tensor:
        if not self.spans:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([s.positions for s in self.spans])


@dataclass
class TokenLayout:
    rows: list[RowLayout]

    @property
    def n_visual(self) -> list[int]:
        return [r.n_visual for r in self.rows]

    @property
    def has_visual(self) -> bool:
        return any(r.spans for r in self.rows)

    def visual_mask(self, device=None) -> torch.Tensor:
        """``[B, L]`` bool, True at visual tokens."""
        B, L = len(self.rows), self.rows[0].length if self.rows else 0
        mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b, row in enumerate(self.rows):
            if row.spans:
                mask[b, row.visual_positions.to(device)] = True
        return mask


def raster_coordinates(grid: tuple[int, int, int], device=None):
    """(frame, row, col) of each token of a ``(t, h, w)`` grid in raster order, each ``[t*h*w]``."""
    t, h, w = grid
    idx = torch.arange(t * h * w, device=device)
    return idx // (h * w), (idx // w) % h, idx % w


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor, as (start, end) with end exclusive."""
    if not bool(mask.any()):
        return []
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def split_positions(positions: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split a row's ascending visual positions into consecutive chunks of the given sizes."""
    if sum(sizes) != len(positions):
        raise ValueError(f"expected {sum(sizes)} visual tokens, found {len(positions)}")
    return list(torch.split(positions, sizes))
