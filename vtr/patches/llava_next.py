"""LLaVA-NeXT and LLaVA-OneVision: anyres images (a base image grid, then the high-resolution tiles stitched into
one unpadded grid with a newline token after every row), and OneVision videos (frames of pooled tokens with one
newline after the last frame). 1-D RoPE.

The grid of each image is read from the merged embeddings: newline tokens are the model's ``image_newline``
vector itself (``parse_anyres``; extreme aspect ratios included). That works in ``generate`` too, which
(transformers 5.23) pre-encodes the images and drops ``image_sizes``; the tile (crop) of each token needs
``image_sizes`` and is left unknown (-1) without it.

How extreme real checkpoints' images get (measured with transformers' own ``unpad_image`` on the released
configurations): LLaVA-v1.6 (336-pixel tiles of 24 x 24 patches, grids up to 3 tiles wide) keeps no
high-resolution row of an image wider than about 72:1 (139 x 10000 pixels keeps one, 138 x 10000 none), and no
column of one taller than that; LLaVA-OneVision (384-pixel tiles of 27 x 27, an odd side) always keeps at least one
row and one column. Both processors accept such images (1 x 4000 pixels included).
"""
from __future__ import annotations

import math

import torch

from .. import compat
from ..layout import VisualSpan, split_positions
from .base import Family, assign_rows, count_mismatch, encoded, finish_rows, has_kind


class LlavaNextFamily(Family):
    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def layout(self, model, inputs, embeds, positions):
        ids = inputs["input_ids"]
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        newline = compat.image_newline(model).to(embeds.device, embeds.dtype)
        image_sizes = inputs.get("image_sizes")
        rows, image_index = [], 0
        for b in range(ids.shape[0]):
            spans = []
            positions_b = (ids[b] == config.image_token_id).nonzero().flatten()
            if len(positions_b) and has_kind("image", inputs):
                is_newline = (embeds[b, positions_b.to(embeds.device)] == newline).all(-1).cpu()
                for start, stop, width, height in parse_anyres(is_newline.tolist(), side * side,
                                                               compat.anyres_max_width(config, side)):
                    size = image_sizes[image_index].tolist() if image_sizes is not None else None
                    spans.append(anyres_span(config, positions_b[start:stop], side, width, height, size))
                    image_index += 1
            rows.append(spans + self._videos(model, inputs, ids, b))
        return finish_rows(rows, ids.shape[1], positions)

    def _videos(self, model, inputs, ids, row) -> list[VisualSpan]:
        return []

    def crops_per_image(self, model, image_size, span=None) -> int:
        return compat.anyres_patch_count(model.config, image_size)

    def image_token_count(self, model, image_size) -> int:
        """Base grid, then the unpadded high-resolution grid with a newline after each row."""
        if image_size is None:
            raise ValueError("vtr: the vision stage needs each LLaVA-NeXT image's size (image_sizes)")
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        _, _, height, width = compat.anyres_geometry(model.config, image_size, side)
        return side * side + height * (width + 1)

    def vision_patches(self, model, span, image_size):
        """Base-grid tokens come from crop 0; a high-resolution token at (row, col) of the unpadded grid from the
        tile covering (row + top, col + left) of the padded grid (the tiles stitched row-major, as
        ``pack_image_features`` does before unpadding)."""
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        first = 1 if compat.vision_feature_strategy(model) == "default" else 0
        crop = torch.full((span.n,), -1, dtype=torch.long)
        patch = torch.full((span.n,), -1, dtype=torch.long)
        row, col, base = span.row.cpu(), span.col.cpu(), (span.frame == 0).cpu() & ~span.newline.cpu()
        crop[base], patch[base] = 0, first + row[base] * side + col[base]
        tiles = (span.frame == 1).cpu() & ~span.newline.cpu()
        if bool(tiles.any()):
            height, width = int(row[tiles].max()) + 1, int(col[tiles].max()) + 1
            tiles_h, tiles_w, unpadded_h, unpadded_w = compat.anyres_geometry(config, image_size, side)
            if (unpadded_h, unpadded_w) != (height, width):
                raise ValueError(f"vtr: the {height}x{width} high-resolution grid of an image was resized after "
                                 "unpadding (LLaVA-OneVision's anyres_max); its tokens have no single source patch")
            r = row[tiles] + (tiles_h * side - height) // 2
            c = col[tiles] + (tiles_w * side - width) // 2
            crop[tiles] = 1 + (r // side) * tiles_w + c // side
            patch[tiles] = first + (r % side) * side + c % side
        return crop, patch


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def pack_crop_values(self, model, values: torch.Tensor, image_size, newline: float) -> torch.Tensor:
        """``[n]``: per-crop numbers ``[c, N]`` laid out over the image's ``n`` tokens as its features are (resized
        with them where ``anyres_max`` shrinks the grid; ``newline`` in the newline slots)."""
        return compat.pack_onevision_values(model, values, image_size, newline)

    def _videos(self, model, inputs, ids, row):
        """Each video: frames of ``pooled x pooled`` tokens (raster order), then one newline token."""
        config = model.config
        if not has_kind("video", inputs):
            return []
        side = config.vision_config.image_size // config.vision_config.patch_size
        pooled = math.ceil(side / 2)
        features = encoded("video", inputs)
        if features is not None:
            sizes = [int(f.shape[0]) for f in features.pooler_output]
        else:
            pixel = inputs["pixel_values_videos"]
            sizes = [pixel.shape[1] * pooled * pooled + 1] * pixel.shape[0]
        counts = (ids == config.video_token_id).sum(1).tolist()
        start, stop = assign_rows(counts, sizes, "video")[row]
        spans = []
        chunks = split_positions((ids[row] == config.video_token_id).nonzero().flatten(), sizes[start:stop])
        for size, positions in zip(sizes[start:stop], chunks):
            frames = (size - 1) // (pooled * pooled)
            if frames * pooled * pooled + 1 != size:
                raise count_mismatch("video", frames * pooled * pooled + 1, size)
            frame, r, c = (torch.arange(size - 1) // (pooled * pooled), (torch.arange(size - 1) // pooled) % pooled,
                           torch.arange(size - 1) % pooled)
            spans.append(VisualSpan(kind="video", index=0, positions=positions, grid=None,
                                    frame=torch.cat([frame, frame.new_tensor([frames - 1])]),
                                    row=torch.cat([r, r.new_tensor([pooled - 1])]),
                                    col=torch.cat([c, c.new_tensor([pooled])]),
                                    newline=torch.arange(size) == size - 1,
                                    crop=torch.zeros(size, dtype=torch.long)))
        return spans


def parse_anyres(is_newline: list[bool], base: int, max_width: int) -> list[tuple[int, int, int, int]]:
    """Split a row's run of image tokens into images, as ``pack_image_features`` lays each out: ``base`` tokens of
    the base grid, then the unpadded high-resolution grid as rows of ``width`` tokens each ended by a newline (or,
    for an image without tiles, one newline). Extreme aspect ratios give degenerate grids: unpadding can keep no
    row (the base grid alone, no newline) or no column (rows that are a newline each). ``max_width``: the widest
    grid the model's tiles can make (``compat.anyres_max_width``), which tells a grid row from the next image's base
    grid. Returns (start, stop, width, height) per image; ``height = 0`` for an image without high-resolution rows
    (``stop - start`` is ``base + 1`` with its one newline, ``base`` without). Raises ``ValueError`` when the run
    does not parse."""
    images, i, n = [], 0, len(is_newline)
    while i < n:
        start = i
        i += base
        if i > n or any(is_newline[start:i]):
            raise ValueError("vtr: cannot read the anyres layout of an image (a base grid of "
                             f"{base} tokens without newline tokens was expected)")
        run = i
        while run < n and is_newline[run]:
            run += 1
        if run > i:  # one newline: an image without tiles; several: grid rows that unpadding left no column of
            images.append((start, run, 0, 0 if run - i == 1 else run - i))
            i = run
            continue
        width = next((j - i for j in range(i, min(n, i + max_width + 1)) if is_newline[j]), None)
        if width is None:  # no newline within a grid row's reach: unpadding left no row (or the run ends)
            images.append((start, i, 0, 0))
            continue
        height = 0
        while i + width < n and is_newline[i + width] and not any(is_newline[i:i + width]):
            height += 1
            i += width + 1
        images.append((start, i, width, height))
    return images


def anyres_span(config, positions, side: int, width: int, height: int, image_size) -> VisualSpan:
    """Coordinates of one anyres image: frame 0 is the ``side x side`` base grid, frame 1 the ``height x width``
    high-resolution grid whose rows each end with a newline token (column ``width``; ``width`` may be 0). An image
    without rows is its base grid, then its one newline when it has no tiles."""
    base = torch.arange(side * side)
    frame = [torch.zeros(side * side, dtype=torch.long)]
    row, col, newline = [base // side], [base % side], [torch.zeros(side * side, dtype=torch.bool)]
    crop = [torch.zeros(side * side, dtype=torch.long)]
    if height == 0 and len(positions) > side * side:  # base grid + one newline
        frame.append(torch.zeros(1, dtype=torch.long))
        row.append(torch.tensor([side - 1]))
        col.append(torch.tensor([side]))
        newline.append(torch.ones(1, dtype=torch.bool))
        crop.append(torch.zeros(1, dtype=torch.long))
    elif height:
        grid = torch.arange(height * (width + 1))
        r, c = grid // (width + 1), grid % (width + 1)
        frame.append(torch.ones_like(grid))
        row.append(r)
        col.append(c)
        newline.append(c == width)
        crop.append(_tiles(config, image_size, side, height, width, r, c.clamp(max=max(width - 1, 0))))
    return VisualSpan(kind="image", index=0, positions=positions, grid=None, frame=torch.cat(frame),
                      row=torch.cat(row), col=torch.cat(col), newline=torch.cat(newline), crop=torch.cat(crop))


def _tiles(config, image_size, side, height, width, r, c) -> torch.Tensor:
    """Tile index (1 + row-major) of each high-resolution token, or -1 without ``image_sizes`` or when the grid
    was resized after unpadding (OneVision's anyres_max)."""
    unknown = torch.full_like(r, -1)
    if image_size is None:
        return unknown
    tiles_h, tiles_w, unpadded_h, unpadded_w = compat.anyres_geometry(config, image_size, side)
    if (unpadded_h, unpadded_w) != (height, width):
        return unknown
    top, left = (tiles_h * side - height) // 2, (tiles_w * side - width) // 2
    return 1 + ((r + top) // side) * tiles_w + (c + left) // side
