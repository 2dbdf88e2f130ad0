"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP (no [CLS]) average-pooled to ``mm_tokens_per_image`` (256)
tokens per image, 1-D RoPE language model with sliding-window and global layers (their own rotary bases), and
bidirectional attention among an image's tokens.

An image is ``mm_tokens_per_image`` ``<image_soft_token>`` placeholders (between ``<start_of_image>`` and
``<end_of_image>``): a ``side x side`` grid. Pan-and-scan crops are written as further images (each its own
span, its own budget). The bidirectional blocks are the model's own: runs of tokens of ``token_type_ids == 1``
(``block_ids``; without ``token_type_ids`` the model attends causally, and so does vtr). The engine keeps each
block bidirectional over its kept tokens and every sliding layer's window over the sequence that layer runs on
(``vtr.engine``: masks).
"""
from __future__ import annotations

import math

import torch

from .. import compat
from .base import Family, count_mismatch, finish_rows, spans_for_kind


class Gemma3Family(Family):
    name = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    bidirectional_blocks = True

    def layout(self, model, inputs, embeds, positions):
        ids = inputs["input_ids"]
        config = model.config
        per_image = config.mm_tokens_per_image
        side = math.isqrt(per_image)
        counts = (ids == config.image_token_id).sum(1).tolist()
        n_images = _count_images(inputs)
        if sum(counts) != n_images * per_image or any(c % per_image for c in counts):
            raise count_mismatch("image", n_images * per_image, sum(counts))
        rows = [spans_for_kind(ids[b], config.image_token_id, "image", [per_image] * (c // per_image),
                               [(1, side, side)] * (c // per_image)) for b, c in enumerate(counts)]
        return finish_rows(rows, ids.shape[1], positions)

    def block_ids(self, model, inputs) -> torch.Tensor | None:
        token_types = inputs.get("token_type_ids")
        return None if token_types is None else compat.bidirectional_block_ids(model, token_types)


def _count_images(inputs) -> int:
    if inputs.get("pixel_values") is not None:
        return inputs["pixel_values"].shape[0]
    return len((inputs.get("mm_encoder_outputs") or {})["image"].pooler_output)
