"""The token layout of known inputs equals the hand-computed one, for every model family."""
import pytest
import torch

import tiny_models as tm
import vtr
from vtr import compat


def layout_of(model, inputs, generate=False):
    with vtr.patch(model, "random", ratio=0.5) as handle, torch.no_grad():
        if generate:
            model.generate(**inputs, max_new_tokens=1)
        else:
            model(**inputs)
    return handle.last.layout


def coords(span):
    return list(zip(span.frame.tolist(), span.row.tolist(), span.col.tolist(), span.newline.tolist()))


def test_llava_one_grid_per_image():
    model, proc = tm.build("llava")
    layout = layout_of(model, tm.image_inputs("llava", proc, 2, "multi"))
    assert [len(r.spans) for r in layout.rows] == [2, 1]
    first, second = layout.rows[0].spans
    assert first.grid == second.grid == (1, 8, 8) and (first.offset, second.offset) == (0, 64)
    assert int(second.positions[0]) == int(first.positions[-1]) + 1  # "<image> <image>" are adjacent runs
    assert coords(first)[:10] == [(0, 0, c, False) for c in range(8)] + [(0, 1, 0, False), (0, 1, 1, False)]
    assert torch.equal(first.rope_position, first.positions)  # plain forward: position = index


def test_llava_next_anyres_grid_with_newlines_and_tiles():
    """A 48x80 image on the tiny model (32-pixel tiles of 4x4 patches): best pinpoint 64x64 = 2x2 tiles, an 8x8
    grid unpadded to 4 rows x 8 columns (2 padding rows removed at the top), a newline after each row."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 2)
    span = layout_of(model, inputs).rows[1].spans[0]
    assert span.n == 16 + 4 * (8 + 1) and span.grid is None
    base = [(0, r, c, False) for r in range(4) for c in range(4)]
    high = [(1, r, c, c == 8) for r in range(4) for c in range(9)]
    assert coords(span) == base + high
    tiles = [1 + ((r + 2) // 4) * 2 + min(c, 7) // 4 for r in range(4) for c in range(9)]
    assert span.crop.tolist() == [0] * 16 + tiles
    square = layout_of(model, inputs).rows[0].spans[0]  # a 64x64 image: 8x8, nothing unpadded
    assert square.n == 16 + 8 * 9 and int(square.newline.sum()) == 8


def test_llava_next_layout_in_generate():
    """generate() in transformers >= 5.18 pre-encodes the images and drops image_sizes: the grid still comes from
    the newline tokens, the tiles are then unknown (-1); where image_sizes survive they are the forward's."""
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 2)
    forward, generate = layout_of(model, inputs), layout_of(model, inputs, generate=True)
    for a, b in zip(forward.rows, generate.rows):
        assert coords(a.spans[0]) == coords(b.spans[0])
        tiles = b.spans[0].crop[16:]
        assert (tiles == -1).all() or torch.equal(tiles, a.spans[0].crop[16:])


def extreme_inputs(family, proc, sizes):
    """One prompt per image size (height, width), left-padded into one batch."""
    images = [tm.random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return proc(text=[tm._prompt(family, 1, long=False)] * len(images), images=images, return_tensors="pt",
                padding=True, padding_side="left")


# On the tiny anyres models (32-pixel tiles of 4x4 patches, grids up to 2 tiles wide): unpadding keeps no row of a
# 20x300 image, no column of a 300x20 one (a newline per row), one row of an 8x64 one; ordinary sizes beside them.
EXTREME_SIZES = [(20, 300), (300, 20), (1, 64), (64, 1), (8, 64), (64, 8), (1000, 10), (33, 64), (48, 80)]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_layout_of_extreme_aspect_ratios(family):
    """Every size the processor accepts is read as the model packs it: the base grid, then the unpadded grid's
    rows (none, or rows without columns, for extreme aspect ratios), each ended by a newline; in forward (tiles
    from image_sizes) and in generate (from the newline tokens alone)."""
    model, proc = tm.build(family)
    inputs = extreme_inputs(family, proc, EXTREME_SIZES)
    side = 4
    for layout in (layout_of(model, inputs), layout_of(model, inputs, generate=True)):
        for b, (size, row) in enumerate(zip(EXTREME_SIZES, layout.rows)):
            _, _, height, width = compat.anyres_geometry(model.config, size, side)
            (span,) = row.spans
            assert span.n == int((inputs["input_ids"][b] == model.config.image_token_id).sum())
            assert span.n == side * side + height * (width + 1)
            high = [(1, r, c, c == width) for r in range(height) for c in range(width + 1)]
            assert coords(span)[side * side:] == high


def test_crop_scope_budgets_each_tile():
    model, proc = tm.build("llava_next")
    inputs = tm.image_inputs("llava_next", proc, 1)
    tiles_known_in_generate = bool((layout_of(model, inputs, generate=True).rows[0].spans[0].crop >= 0).all())
    with vtr.patch(model, "uniform", ratio=0.5, scope="crop") as handle, torch.no_grad():
        if tiles_known_in_generate:
            model.generate(**inputs, max_new_tokens=1)
        else:
            with pytest.raises(ValueError, match="scope='crop' needs the anyres tile"):
                model.generate(**inputs, max_new_tokens=1)
        model(**inputs)
    span = handle.last.layout.rows[0].spans[0]
    kept = handle.last.kept[0]
    for tile in range(5):  # the base image and four tiles: half of each (rounded) survives
        members = ((span.crop == tile) & ~span.newline).nonzero().flatten()
        assert int(torch.isin(kept, members).sum()) == round(len(members) * 0.5)
    assert torch.isin(span.newline.nonzero().flatten(), kept).all()  # newlines are not candidates


@pytest.mark.video
def test_onevision_video_frames_then_one_newline():
    model, proc = tm.build("llava_onevision")
    span = layout_of(model, tm.video_inputs("llava_onevision", proc, 1)).rows[0].spans[0]
    assert span.kind == "video" and span.n == 4 * 2 * 2 + 1
    assert coords(span) == [(f, r, c, False) for f in range(4) for r in range(2) for c in range(2)] + [(3, 1, 2, True)]


@pytest.mark.video
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_grid_and_mrope_positions(family):
    """4 frames of 64x48 pixels: 2 temporal slices of 16x12 patches, merged 2x2 into 8x6 tokens."""
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, 2)
    layout = layout_of(model, inputs)
    span = layout.rows[0].spans[0]
    assert span.kind == "video" and span.grid == (2, 8, 6) and span.n == 96
    assert layout.rows[1].spans[0].grid == (1, 8, 6)  # the second video has 2 frames
    t, h, w = span.rope_position
    for frame in range(2):  # Qwen3-VL numbers each temporal slice from its own start (timestamps in between)
        f = span.frame == frame
        assert torch.equal(h[f] - h[f].min(), span.row[f]) and torch.equal(w[f] - w[f].min(), span.col[f])
    assert layout_of(model, inputs, generate=True).rows[0].spans[0].grid == (2, 8, 6)  # from positions alone


def test_qwen_image_grid_from_positions_in_generate():
    model, proc = tm.build("qwen2_vl")
    inputs = tm.image_inputs("qwen2_vl", proc, 2, "multi")
    forward, generate = layout_of(model, inputs), layout_of(model, inputs, generate=True)
    assert [[s.grid for s in r.spans] for r in generate.rows] == [[(1, 8, 8), (1, 6, 10)], [(1, 8, 6)]]
    assert [[s.grid for s in r.spans] for r in forward.rows] == [[s.grid for s in r.spans] for r in generate.rows]
