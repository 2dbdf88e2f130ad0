"""Where the visual tokens are: one record per batch row, built by the model-family patch from the prompt.

Methods that need spatial or temporal structure read only this record, never model internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VisualSpan:
    """One image or video of one batch row.

    Attributes:
        kind (str): ``"image"`` or ``"video"``.
        index (int): its number among the row's images (or videos), in prompt order.
        positions (torch.Tensor): ``[n]`` sequence positions of its tokens in the (padded) row, ascending.
        grid (tuple[int, int, int] | None): ``(frames, rows, cols)`` when the tokens form one raster-ordered grid
            (frame, then row, then column); None for composite layouts (LLaVA-NeXT base image + high-resolution
            grid, trailing newline tokens).
        offset (int): index of the span's first token in the row's visual numbering (all spans of the row, in
            order).
        frame (torch.Tensor): ``[n]`` video frame or temporal slice of each token (anyres images: 0 the base image,
            1 the high-resolution grid).
        row (torch.Tensor): ``[n]`` grid row of each token.
        col (torch.Tensor): ``[n]`` grid column of each token (newline tokens: the row length).
        newline (torch.Tensor): ``[n]`` True for newline tokens.
        crop (torch.Tensor): ``[n]`` anyres crop of each token (0 the base image, 1... the tiles, row-major), -1
            where unknown.
        rope_position (torch.Tensor | None): ``[n]`` or ``[3, n]`` the RoPE position the model gave each token
            (1-D or M-RoPE).
    """

    kind: str
    index: int
    positions: torch.Tensor
    grid: tuple[int, int, int] | None
    offset: int = 0
    frame: torch.Tensor = field(repr=False, default=None)
    row: torch.Tensor = field(repr=False, default=None)
    col: torch.Tensor = field(repr=False, default=None)
    newline: torch.Tensor = field(repr=False, default=None)
    crop: torch.Tensor = field(repr=False, default=None)
    rope_position: torch.Tensor | None = field(repr=False, default=None)

    def __post_init__(self):
        n, device = len(self.positions), self.positions.device
        if self.frame is None:
            if self.grid is None or self.grid[0] * self.grid[1] * self.grid[2] != n:
                raise ValueError(f"{self.kind} {self.index}: grid {self.grid} does not cover {n} tokens")
            self.frame, self.row, self.col = raster_coordinates(self.grid, device)
        if self.newline is None:
            self.newline = torch.zeros(n, dtype=torch.bool, device=device)
        if self.crop is None:
            self.crop = torch.full((n,), -1 if self.grid is None else 0, dtype=torch.long, device=device)

    @property
    def n(self) -> int:
        """Its number of tokens."""
        return len(self.positions)


@dataclass
class RowLayout:
    """The visual spans of one batch row.

    Attributes:
        spans (list[VisualSpan]): its images and videos, in prompt order.
        length (int): sequence length of the row (padding included).
    """

    spans: list[VisualSpan]
    length: int  # sequence length of the row (padding included)

    @property
    def n_visual(self) -> int:
        """The row's visual tokens (all spans)."""
        return sum(s.n for s in self.spans)

    @property
    def visual_positions(self) -> torch.Tensor:
        """``[n_visual]`` sequence positions of the row's visual tokens, in the row's visual numbering."""
        if not self.spans:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([s.positions for s in self.spans])


@dataclass
class TokenLayout:
    """Where the visual tokens of a batch are (``handle.last.layout``).

    Attributes:
        rows (list[RowLayout]): per row, its visual spans.
    """

    rows: list[RowLayout]

    @property
    def n_visual(self) -> list[int]:
        """Per row, its visual tokens."""
        return [r.n_visual for r in self.rows]

    @property
    def has_visual(self) -> bool:
        """Whether any row has an image or video."""
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


def split_positions(positions: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split a row's ascending visual positions into consecutive chunks of the given sizes."""
    if sum(sizes) != len(positions):
        raise ValueError(f"expected {sum(sizes)} visual tokens, found {len(positions)}")
    return list(torch.split(positions, sizes))
