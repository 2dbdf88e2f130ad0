"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): dynamic-resolution grids merged 2x2 into language tokens,
3-D M-RoPE positions; Qwen3-VL also adds DeepStack visual features after its first decoder layers. Qwen3-VL-MoE is
Qwen3-VL's vision side and layout on a mixture-of-experts language model (routing is per token, so nothing here
differs)."""
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
        for kind in ("image", "video"):
            if not has_kind(kind, inputs):
                continue
            sizes, grids = self._sizes_and_grids(kind, config, inputs)
            is_kind = self._placeholders(kind, config, inputs)
            counts = is_kind.sum(1).tolist()
            for b, (start, stop) in enumerate(assign_rows(counts, sizes, kind)):
                row_grids = grids[start:stop] if grids else [None] * (stop - start)
                spans = spans_for_kind(is_kind[b], True, kind, sizes[start:stop],
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

    def _placeholders(self, kind: str, config, inputs) -> torch.Tensor:
        """``[B, L]`` bool: the prompt's placeholders of ``kind`` ("image" or "video")."""
        return inputs["input_ids"] == getattr(config, f"{kind}_token_id")

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
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    deepstack = True


class Qwen3_5Family(QwenVLFamily):
    """Qwen3.5 (dense and MoE): Qwen3-VL's vision side and token layout without DeepStack, on a hybrid language
    model (Gated DeltaNet linear-attention layers with a recurrent state beside full-attention layers; the engine
    gives each its mask, see ``compat.causal_mask``)."""
    name = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


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


class Glm4vFamily(QwenVLFamily):
    """GLM-4.1V and GLM-4.5V (dense and MoE language models): Qwen-VL-style dynamic grids merged 2x2 (a downsampling
    convolution), 3-D RoPE. Images and the frames of videos share one placeholder (``<|image|>``); each temporal
    slice of a video is its own run of placeholders between ``<|begin_of_image|>`` and ``<|end_of_image|>`` (then
    its timestamp), inside ``<|begin_of_video|>`` ... ``<|end_of_video|>``. ``mm_token_type_ids`` (1 image, 2
    video) tells them apart, as the model's own ``get_rope_index`` does."""
    name = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration")

    def _placeholders(self, kind, config, inputs):
        ids = inputs["input_ids"]
        placeholder = ids == config.image_token_id
        types = inputs.get("mm_token_type_ids")
        if types is None:
            if has_kind("image", inputs) and has_kind("video", inputs):
                raise ValueError("vtr: GLM-4.1V writes images and video frames with the same placeholder; a prompt "
                                 "with both needs mm_token_type_ids (as the processor returns it) to tell them apart")
            return placeholder
        return placeholder & (types.to(ids.device) == (1 if kind == "image" else 2))

    def placeholder_ids(self, config) -> list[int]:
        return [config.image_token_id]

    def delimiter_ids(self, config) -> list[int]:
        names = ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id")
        return [getattr(config, n) for n in names if getattr(config, n, None) is not None]
