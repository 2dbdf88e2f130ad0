"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square grid of patch tokens per image, 1-D RoPE."""
from __future__ import annotations

import math

import torch

from .. import compat
from .base import Family, count_mismatch, finish_rows, spans_for_kind


class LlavaFamily(Family):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def tokens_per_image(self, config) -> int:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if config.vision_feature_select_strategy == "full" else 0)

    def image_token_count(self, model, image_size) -> int:
        return self.tokens_per_image(model.config)

    def layout(self, model, inputs, embeds, positions):
        ids = inputs["input_ids"]
        config = model.config
        per_image = self.tokens_per_image(config)
        side = math.isqrt(per_image)
        grid = (1, side, side) if side * side == per_image else (1, 1, per_image)
        counts = (ids == config.image_token_id).sum(1).tolist()
        n_images = _count_images(inputs)
        if sum(counts) != n_images * per_image or any(c % per_image for c in counts):
            raise count_mismatch("image", n_images * per_image, sum(counts))
        rows = []
        for b, count in enumerate(counts):
            k = count // per_image
            rows.append(spans_for_kind(ids[b], config.image_token_id, "image", [per_image] * k, [grid] * k))
        return finish_rows(rows, ids.shape[1], positions)

    def vision_patches(self, model, span, image_size):
        # "default" drops the [CLS] token (patch 0) before the projector; "full" keeps it as the first token.
        first = 1 if compat.vision_feature_strategy(model) == "default" else 0
        return torch.zeros(span.n, dtype=torch.long), torch.arange(span.n) + first


def _count_images(inputs) -> int:
    if inputs.get("pixel_values") is not None:
        return inputs["pixel_values"].shape[0]
    return len((inputs.get("mm_encoder_outputs") or {})["image"].pooler_output)
