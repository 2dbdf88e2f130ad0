"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): InternViT tiles (448 px, a [CLS] token) pixel-shuffled
2x2 into language tokens (256 per tile), 1-D RoPE Qwen2 / Qwen3 language model.

An image is one run of ``<IMG_CONTEXT>`` placeholders between ``<img>`` and ``</img>``: ``k`` tiles of ``T`` tokens
each, in the order the image processor cut them (row-major), then, when ``k > 1``, the thumbnail (the whole image
resized to one tile). As in the LLaVA-NeXT layout, the global view is ``frame`` 0 / ``crop`` 0 and the tiles are
``frame`` 1 / ``crop`` 1.. (so ``scope="crop"`` gives each tile and the thumbnail its own budget). The processor
does not tell the model how the tiles are arranged (the tile grid follows the image's aspect ratio and is not an
input of the model), so each tile's tokens carry their own ``row`` / ``col`` in that tile's ``side x side`` grid. A
single-tile image (``k = 1``) is a plain ``(1, side, side)`` grid. Videos reach the model as frames written as
single-tile images (``FrameN: <img>...</img>``): each frame is an image span.
"""
from __future__ import annotations

import torch

from .. import compat
from ..layout import VisualSpan, raster_coordinates
from .base import Family, count_mismatch, finish_rows


class InternVLFamily(Family):
    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    def layout(self, model, inputs, embeds, positions):
        ids = inputs["input_ids"]
        token_id = model.config.image_token_id
        per_tile = compat.tokens_per_tile(model)
        rows, total = [], 0
        for b in range(ids.shape[0]):
            spans = []
            for run in _runs((ids[b] == token_id).nonzero().flatten()):
                if len(run) % per_tile:
                    raise count_mismatch("image", (len(run) // per_tile + 1) * per_tile, len(run))
                spans.append(tile_span(run, len(run) // per_tile, compat.vision_token_side(model)))
                total += len(run)
            rows.append(spans)
        expected = _tiles(inputs) * per_tile
        if expected != total:
            raise count_mismatch("image", expected, total)
        return finish_rows(rows, ids.shape[1], positions)

    def crops_per_image(self, model, image_size, span=None) -> int:
        return span.n // compat.tokens_per_tile(model)

    def vision_patches(self, model, span, image_size):
        """Token ``j`` of an image comes from tower input ``j // T`` of the image (its tiles, then the thumbnail, as
        ``pixel_values`` holds them) and is the 2x2 unit of patches the model's pixel shuffle concatenates into it:
        ``patch`` is ``[n, 4]``, in the order of that concatenation ([CLS] = 0, patches from 1)."""
        per_tile = compat.tokens_per_tile(model)
        units = compat.pixel_shuffle_units(model)  # [T, 4] raster patch indices
        first = 1 if compat.vision_feature_strategy(model) == "default" else 0
        j = torch.arange(span.n)
        return j // per_tile, units[j % per_tile] + first

    def token_grid(self, model, span):
        """Each token's cell in its tile's ``side x side`` token grid (the grid of its tower input)."""
        per_tile = compat.tokens_per_tile(model)
        return torch.arange(span.n) % per_tile, compat.vision_token_side(model), per_tile


def tile_span(positions: torch.Tensor, tiles: int, side: int) -> VisualSpan:
    """One image of ``tiles`` tower inputs of ``side x side`` tokens each, the thumbnail last when ``tiles > 1``."""
    if tiles == 1:
        return VisualSpan(kind="image", index=0, positions=positions, grid=(1, side, side))
    _, row, col = raster_coordinates((tiles, side, side))
    tile = torch.arange(tiles * side * side) // (side * side)
    thumbnail = tile == tiles - 1
    return VisualSpan(kind="image", index=0, positions=positions, grid=None,
                      frame=(~thumbnail).long(), row=row, col=col,
                      newline=torch.zeros(len(tile), dtype=torch.bool),
                      crop=torch.where(thumbnail, 0, tile + 1))


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Maximal runs of consecutive positions."""
    if not len(positions):
        return []
    breaks = (torch.diff(positions) > 1).nonzero().flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def _tiles(inputs) -> int:
    if inputs.get("pixel_values") is not None:
        return inputs["pixel_values"].shape[0]
    return int((inputs.get("mm_encoder_outputs") or {})["image"].pooler_output.shape[0])
