"""What a model family must tell the engine: where its visual tokens are and how it numbers positions."""
from __future__ import annotations

import torch

from ..layout import RowLayout, TokenLayout, VisualSpan, split_positions


class Family:
    """One model family. Subclasses list the model classes they cover and build the token layout."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    mrope: bool = False  # positions are 3-D (temporal, height, width) rows
    deepstack: bool = False  # visual features are also added after the first decoder layers (Qwen3-VL)
    bidirectional_blocks: bool = False  # the tokens of each image attend to each other bidirectionally (Gemma 3)

    def has_visual_inputs(self, kwargs: dict) -> bool:
        mm = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or any(
            v is not None for v in mm.values())

    def block_ids(self, model, inputs: dict) -> torch.Tensor | None:
        """``[B, L]``: the bidirectional attention block of each prompt token (-1: causal) as the model derives it
        from the base model's ``inputs`` (``bidirectional_blocks`` families), or None when the inputs give none."""
        return None

    def delimiter_ids(self, config) -> list[int]:
        """Token ids that frame a visual span in the prompt (Qwen-VL's vision start / end), not text."""
        ids = (getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None))
        return [i for i in ids if i is not None]

    def placeholder_ids(self, config) -> list[int]:
        """Token ids that stand for visual features in the prompt."""
        return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                if i is not None]

    def layout(self, model, inputs: dict, embeds: torch.Tensor, positions: torch.Tensor) -> TokenLayout:
        """Token layout of a prefill.

        inputs: the keyword arguments of the base model's forward (``input_ids`` [B, L], pixel values, grids...);
        embeds: ``[B, L, D]`` the language model's input embeddings (visual features merged in);
        positions: ``[B, L]`` or ``[R, B, L]`` the positions the language model uses."""
        raise NotImplementedError

    def vision_patches(self, model, span: VisualSpan, image_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each token of an image ``span`` comes from in the vision tower: ``(crop, patch)``: ``[n]`` the
        image's tower input (0 for the only or base crop, anyres tiles after it) and ``[n]`` the token index in that
        input's sequence of the vision layers ([CLS] included), -1 for tokens no patch makes (newlines); or
        ``[n, u]`` for towers whose language token concatenates ``u`` patches (InternVL's pixel shuffle), in the
        order of that concatenation. ``image_size``: the image's (height, width) as passed to
        ``get_image_features`` (anyres models)."""
        raise ValueError(f"vtr: vision-tower signals are not available for {self.name} models")

    def token_grid(self, model, span: VisualSpan):
        """``(cell [n], width, cells)``: each token's raster cell in the token grid of its tower input, where a
        language token is not one patch (InternVL); None where the patch grid is the token grid (CLIP)."""
        return None

    def pack_crop_values(self, model, values: torch.Tensor, image_size, newline: float) -> torch.Tensor | None:
        """``[n]``: numbers given per token of each vision-tower input of an image (``values`` ``[c, N]``) laid out
        over the image's ``n`` language-model tokens as the model packs its features (``newline`` in newline
        slots), or None where the family traces tokens to patches instead (``vision_patches``)."""
        return None

    def image_token_count(self, model, image_size) -> int:
        """Visual tokens an image of ``image_size`` (anyres models; None otherwise) gets in the prompt."""
        raise ValueError(f"vtr: the vision stage is not available for {self.name} models")

    def crops_per_image(self, model, image_size, span: VisualSpan | None = None) -> int:
        """How many vision-tower inputs (crops) an image makes (``span``: its tokens in the prompt)."""
        return 1


def encoded(kind: str, inputs: dict):
    """Features generate() encoded before the prefill (it then drops the pixel inputs), or None."""
    return (inputs.get("mm_encoder_outputs") or {}).get(kind)


def has_kind(kind: str, inputs: dict) -> bool:
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    return inputs.get(key) is not None or encoded(kind, inputs) is not None


def spans_for_kind(ids_row: torch.Tensor, token_id, kind: str, sizes: list[int], grids: list) -> list[VisualSpan]:
    """Cut the row's tokens equal to ``token_id`` into consecutive spans of ``sizes`` tokens (``ids_row`` may be a
    bool mask of the placeholders, with ``token_id=True``)."""
    positions = (ids_row == token_id).nonzero().flatten()
    chunks = split_positions(positions, sizes)
    return [VisualSpan(kind=kind, index=i, positions=p, grid=g) for i, (p, g) in enumerate(zip(chunks, grids))]


def assign_rows(counts: list[int], sizes: list[int], kind: str) -> list[tuple[int, int]]:
    """Visual inputs fill the placeholders in (row, position) order: the [start, stop) inputs of each row."""
    if sum(sizes) != sum(counts):
        raise count_mismatch(kind, sum(sizes), sum(counts))
    ranges, start = [], 0
    for count in counts:
        stop, total = start, 0
        while total < count:
            total += sizes[stop]
            stop += 1
        if total != count:
            raise count_mismatch(kind, total, count)
        ranges.append((start, stop))
        start = stop
    return ranges


def finish_rows(rows_spans: list[list[VisualSpan]], length: int, positions: torch.Tensor) -> TokenLayout:
    """Order each row's spans by position, number them, set their offsets in the row's visual numbering and their
    RoPE positions."""
    rows = []
    for b, spans in enumerate(rows_spans):
        spans = sorted(spans, key=lambda s: int(s.positions[0]))
        offset = 0
        for i, span in enumerate(spans):
            span.index, span.offset = i, offset
            offset += span.n
            span.rope_position = positions[..., b, span.positions.to(positions.device)]
        rows.append(RowLayout(spans=spans, length=length))
    return TokenLayout(rows=rows)


def count_mismatch(kind: str, expected: int, found: int) -> ValueError:
    return ValueError(
        f"vtr: the prompt holds {found} {kind} tokens but the {kind} inputs give {expected}. vtr needs every visual "
        "token of a prompt in one prefill (chunked prefill and prompts split across calls are not supported).")
