"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution grids merged 2x2 into language tokens, 3-D M-RoPE
positions; Qwen3-VL also adds DeepStack visual features after its first decoder layers."""
from __future__ import annotations

import torch

from ..layout import VisualSpan
from .base import Family, assign_rows, encoded, finish_rows, has_kind, spans_for_kind


class QwenVLFamily(Family):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    mrope = True

    def layout(self, model, inputs, embeds, positions):
        ids = inputs["input_ids"]
        config = model.config
        rows = [[] for _ in range(ids.shape[0])]
        for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            if not has_kind(kind, inputs):
                continue
            sizes, grids = self._sizes_and_grids(kind, config, inputs)
            counts = (ids == token_id).sum(1).tolist()
            for b, (start, stop) in enumerate(assign_rows(counts, sizes, kind)):
                row_grids = grids[start:stop] if grids else [None] * (stop - start)
                spans = spans_for_kind(ids[b], token_id, kind, sizes[start:stop],
                                       [g or (1, 1, n) for g, n in zip(row_grids, sizes[start:stop])])
                if not grids:
                    spans = [_grid_from_positions(s, positions, b) for s in spans]
                    if kind == "video" and any(_text_positioned(s, positions, b) for s in spans):
                        raise ValueError(
                            f"vtr: cannot tell the frames of the video in row {b}: generate() dropped "
                            f"video_grid_thw after encoding, and transformers gave the video's tokens text positions "
                            f"(the inputs have no mm_token_type_ids), so {type(model).__name__} runs it without its "
                            f"3-D positions. Pass mm_token_type_ids as the processor returns it.")
                rows[b] += spans
        return finish_rows(rows, ids.shape[1], positions)

    @staticmethod
    def _sizes_and_grids(kind, config, inputs):
        """Token count and (t, h, w) language-token grid of each image (or video), in input order. generate()
        pre-encodes the visual inputs and drops the grids: then the sizes come from the features and the grids
        from the M-RoPE positions."""
        merge = config.vision_config.spatial_merge_size
        grid_thw = inputs.get(f"{kind}_grid_thw")
        if grid_thw is not None:
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
            return [t * h * w for t, h, w in grids], grids
        return [len(f) for f in encoded(kind, inputs).pooler_output], None


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    deepstack = True


def _text_positioned(span: VisualSpan, positions: torch.Tensor | None, row: int) -> bool:
    """True when a span of several tokens got consecutive 1-D text positions in all three M-RoPE rows (no grid:
    a (t, h, w) grid of more than one token never numbers all three axes alike)."""
    if positions is None or positions.dim() != 3 or span.n < 2:
        return False
    p = positions[-3:, row, span.positions.to(positions.device)]
    return bool((p == p[:1]).all() and (torch.diff(p[0]) == 1).all())


def _grid_from_positions(span: VisualSpan, positions: torch.Tensor, row: int) -> VisualSpan:
    """Recover a span's (t, h, w) grid from its M-RoPE (height, width) positions; Qwen3-VL writes each temporal
    slice in its own run of tokens, numbered from its own start."""
    if positions.dim() != 3:
        return span
    _, h_pos, w_pos = positions[-3:, row, span.positions.to(positions.device)]
    breaks = (torch.diff(span.positions) > 1).nonzero().flatten()
    if len(breaks):  # one run per temporal slice, each numbered from its own start
        first = int(breaks[0]) + 1
        h_pos, w_pos = h_pos[:first], w_pos[:first]
    # Temporal positions can repeat (Qwen2.5-VL scales them by seconds), so frames come from the spatial extent.
    height, width = int(h_pos.max() - h_pos.min()) + 1, int(w_pos.max() - w_pos.min()) + 1
    grid = (span.n // (height * width), height, width)
    if grid[0] * grid[1] * grid[2] != span.n:
        return span
    return VisualSpan(kind=span.kind, index=span.index, positions=span.positions, grid=grid)
