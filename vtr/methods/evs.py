from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import video
from .base import Method, Stage
from .registry import register

# vLLM's sentinel dissimilarity of the first frame: above any 1 - cos (at most 2), so the first frame sorts first.
FIRST_FRAME = 255.0


@register
@dataclass
class EVS(Method):
    """EVS, Efficient Video Sampling (NVIDIA, arXiv 2510.14624): drop the video patches that changed least since
    the previous frame, before the language model; the first frame is kept whole. It is what vLLM runs for
    ``--video-pruning-rate`` (Qwen2.5-VL, Qwen3-VL, Qwen3.5, Nemotron Nano VL) and SGLang for Nemotron.

    Per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` tokens each, with embeddings ``E`` ``[F, N, D]``
    (the language model's input, i.e. the merger's output, as vLLM takes them; on Qwen3-VL followed by the
    token's DeepStack features, level after level, the visual output vLLM's Qwen3-VL scores): the dissimilarity of
    token ``n``
    of frame ``f > 0`` is ``1 - cos(E[f, n], E[f - 1, n])`` (``torch.nn.functional.cosine_similarity``), frame 0
    gets 255; the ``F * N`` values, frame-major and raster order within a frame, are sorted descending with a
    stable sort (ties to the earlier token) and the first ``max(N, int(F * N * (1 - ratio)))`` are kept (``keep``:
    ``max(N, min(keep, F * N))``). Official code: ``vllm/multimodal/evs.py`` (vLLM 0.32:
    ``vllm/multimodal/video_prune/evs.py``), ``compute_retention_mask`` and ``compute_retained_tokens_count``.

    Images pass whole (vLLM applies EVS to videos only); so does OneVision's trailing newline. Supported: the
    models with video inputs (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and its MoE, Qwen3.5 dense and MoE,
    GLM-4.1V / 4.5V). Positions:
    ``original`` (the kept tokens keep their positions, as vLLM keeps their M-RoPE grid positions).

    Deliberate differences from vLLM:
      * scores in fp32 (vLLM: in the embeddings' dtype; ``score_dtype="model"`` computes them there, so that a
        bf16 run keeps exactly what vLLM keeps);
      * the text after a pruned video keeps the position it had in the unpruned prompt (vLLM's
        ``recompute_mrope_positions`` restarts it at the video's first position plus its grid width, where
        transformers and vLLM without pruning use the largest position of the video plus one);
      * also on Qwen2-VL, LLaVA-OneVision and GLM-4.1V / 4.5V (the same rule on their video frames; vLLM
        implements it for Qwen2.5-VL, Qwen3-VL, Qwen3.5 and Nemotron), batched, any number of videos per prompt.
    """

    name: ClassVar[str] = "evs"
    summary: ClassVar[str] = "video: drop patches least changed since the previous frame, first frame whole (vLLM)"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "original"
    visual_kinds: ClassVar[tuple[str, ...]] = ("video",)
    model_classes: ClassVar[tuple[str, ...] | None] = video.VIDEO_MODELS
    unsupported_reason: ClassVar[str] = video.NO_VIDEO

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or group.span.kind != "video" or len(group) == 0:
            return len(group)
        F, N = video.frame_table(group.span, group.ids, self.name).shape
        return self.retained(N, F)

    def retained(self, tokens_per_frame: int, frames: int) -> int:
        """Tokens a video of ``frames`` frames of ``tokens_per_frame`` keeps (vLLM's
        ``compute_retained_tokens_count``: never fewer than one whole frame)."""
        total = tokens_per_frame * frames
        wanted = min(self.keep, total) if self.keep is not None else int(total * (1 - self.ratio))
        return max(tokens_per_frame, wanted)

    def select(self, ctx, row, group, budget):
        table = video.frame_table(group.span, group.ids, self.name).to(group.slots.device)
        features = ctx.with_deepstack(row, group, ctx.hidden[row, group.slots])  # Qwen3-VL: as vLLM scores it
        order = evs_order(features[table].to(ctx.score_dtype))
        return table.flatten()[order[:budget]]


def evs_order(embeds: torch.Tensor) -> torch.Tensor:
    """``[F * N]``: a video's tokens ``embeds`` ``[F, N, D]`` ranked by EVS (frame-major flat indices, most
    changed first, the first frame ahead of all, ties to the earlier token). Computed in ``embeds``' dtype."""
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(embeds[1:], embeds[:-1], dim=-1)
    first = torch.full_like(embeds[:1, :, 0], FIRST_FRAME)
    return torch.argsort(torch.cat([first, dissimilarity]).flatten(), descending=True, stable=True)

