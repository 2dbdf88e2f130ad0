"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution grids merged 2x2 into language tokens, 3-D M-RoPE positions."""
from __future__ import annotations

import torch

from .base import Family, count_mismatch, finish_rows, spans_for_kind

_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


class QwenVLFamily(Family):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    mrope = True

    def layout(self, model, kwargs):
        ids = kwargs["input_ids"]
        config = model.config
        rows = [[] for _ in range(ids.shape[0])]
        for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            sizes, grids = self._sizes_and_grids(kind, config, kwargs)
            if sizes is None:
                continue
            counts = (ids == token_id).sum(1).tolist()
            if sum(sizes) != sum(counts):
                raise count_mismatch(kind, sum(sizes), sum(counts))
            # Visual inputs fill the placeholders in (row, position) order, so each row takes the next inputs.
            start = 0
            for b, count in enumerate(counts):
                stop, total = start, 0
                while total < count:
                    total += sizes[stop]
                    stop += 1
                if total != count:
                    raise count_mismatch(kind, total, count)
                row_grids = grids[start:stop] if grids is not None else [None] * (stop - start)
                spans = spans_for_kind(ids[b], token_id, kind, sizes[start:stop],
                                       [g or (1, 1, n) for g, n in zip(row_grids, sizes[start:stop])])
                if grids is None:
                    spans = [_with_grid_from_positions(s, kwargs.get("position_ids"), b) for s in spans]
                rows[b] += spans
                start = stop
        return finish_rows(rows, ids.shape[1])

    @staticmethod
    def _sizes_and_grids(kind, config, kwargs):
        """Token count and (t, h, w) language-token grid of each image (or video), in input order."""
        merge = config.vision_config.spatial_merge_size
        grid_thw = kwargs.get(f"{kind}_grid_thw")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
        if kwargs.get(_PIXELS[kind]) is None and encoded is None:
            return None, None
        if grid_thw is not None:
            grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
            return [t * h * w for t, h, w in grids], grids
        # generate() pre-encodes the images and drops the grids: the sizes come from the features, the grids from
        # the M-RoPE positions generate computed.
        return [len(f) for f in encoded.pooler_output], None

    def decode_positions(self, model, batch, q_len, past, kwargs, device):
        if kwargs.get("attention_mask") is not None:
            return None  # the model numbers new tokens from the attention mask, not from the cache length
        positions = (past + torch.arange(q_len, device=device)).view(1, 1, -1).expand(3, batch, -1)
        deltas = model.model.rope_deltas
        if deltas is not None:
            positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(device)
        return positions


def _with_grid_from_positions(span, position_ids, row):
    """Recover a span's (t, h, w) grid from its M-RoPE positions (temporal, height, width rows)."""
    if position_ids is None or position_ids.dim() != 3:
        return span
    t_pos, h_pos, w_pos = position_ids[-3:, row, span.positions.to(position_ids.device)]
    grid = (len(t_pos.unique()), int(h_pos.max() - h_pos.min()) + 1, int(w_pos.max() - w_pos.min()) + 1)
    if grid[0] * grid[1] * grid[2] != span.n:
        return span
    return type(span)(kind=span.kind, index=span.index, positions=span.positions, grid=grid, offset=span.offset)
