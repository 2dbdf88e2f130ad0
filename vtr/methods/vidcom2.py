from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import video
from .base import Method, Stage, choices
from .registry import register

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # the Gaussian kernel widths, 2 ** k for k = -3..1


@register
@dataclass
class VidCom2(Method):
    """VidCom2, Video Compression Commander (Liu et al., EMNLP'25): per-frame budgets from how distinct each frame
    is, then the tokens least like their video and their frame, before the language model.

    Per video of ``F`` frames (Qwen-VL: temporal slices) of ``N`` tokens, on the language model's input
    embeddings ``X`` ``[F * N, D]`` (the official code's video features: projected, and pooled on OneVision):

    1. channels: the ``int(D * channel_share)`` channels of lowest variance over the video's tokens (population
       variance; ``select_low_var_channels``), each token L2-normalised on them;
    2. ``v`` and ``f``: the multi-scale Gaussian similarity ``sum_a exp(-||x - c||^2 / (2 a))``, ``a`` in
       1/8, 1/4, 1/2, 1, 2, of each token to the video centre (mean over all tokens) and to its frame's centre;
    3. frame budgets: ``s_t = -mean(v over frame t)``, ``p = softmax((s - max s) / temperature)``, ``scale_t =
       min(1, r (1 + p_t - mean p))`` with ``r = 1 - ratio`` (``keep / n`` with ``keep``; the official
       ``R_RATIO``), frame ``t`` keeps ``max(1, round(scale_t * N))`` tokens (round half to even);
    4. per frame the tokens of smallest ``v + f`` (the outliers), in sequence order.

    Keep count: the sum of the frame budgets (about ``r * F * N``; ``handle.last`` reports it; ``variant="vllm"``:
    exact, below). Images pass whole
    (the official code compresses videos only); so does OneVision's trailing newline. Positions: ``compact`` on
    1-D RoPE (official OneVision: the sequence is rebuilt), ``original`` on Qwen-VL (official: the position ids
    sliced to the kept tokens). Official code: ``xuyang-liu16/VidCom2``, ``token_compressor/vidcom2/vidcom2.py``
    (``vidcom2_compression``), its ``models/llava.py`` (OneVision, ``mm_newline_position="one_token"``) and
    ``models/qwen2_5_vl.py`` / ``qwen2_vl.py`` / ``qwen3_vl.py`` (``_compute_keep_indices``).

    Deliberate differences from the official code:
      * scores in fp32 (official: the model dtype; ``score_dtype="model"`` computes them there);
      * batched, each video its own selection (official: batch 1, compression off for larger batches), several
        videos per prompt;
      * ``N`` is each video's own frame size (official OneVision: 196, the 384 px frame);
      * also on Qwen3-VL-MoE, Qwen3.5 (dense, MoE) and GLM-4.1V / 4.5V videos (the Qwen-VL rule on their frames;
        the official code has adapters for OneVision and Qwen2/2.5/3-VL).

    ``variant="vllm"``: vLLM's port (``vllm/multimodal/video_prune/vidcom2.py``, ``compute_retention_mask``;
    ``--video-pruning-method vidcom2``), which sizes a video's placeholders before its embeddings exist and so
    reconciles the total to exactly ``max(F, min(int(F N (1 - ratio)), F N))`` (``keep``: ``max(F, min(keep,
    F N))``): after the frame budgets it drops the kept tokens of largest ``v + f`` (or adds the others of
    smallest) until the count is met; on Qwen3-VL it scores the merger output concatenated with the token's
    DeepStack features, as vLLM's visual output carries them.
    """

    name: ClassVar[str] = "vidcom2"
    summary: ClassVar[str] = "video: frame budgets by distinctiveness, then each frame's outlier tokens (pre-LLM)"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    default_positions: ClassVar[str] = "compact"
    visual_kinds: ClassVar[tuple[str, ...]] = ("video",)
    model_classes: ClassVar[tuple[str, ...] | None] = video.VIDEO_MODELS
    unsupported_reason: ClassVar[str] = video.NO_VIDEO

    channel_share: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Share of the embedding channels the scores use: those of lowest variance over the video's tokens."""
    temperature: float = field(default=0.01, metadata={"min": 1e-9})
    """Temperature of the softmax over the frames' distinctiveness that sets each frame's budget."""
    variant: str = field(default="official", metadata=choices("official", "vllm"))
    """"official" (the authors' code: the count is the sum of the frame budgets) or "vllm" (vLLM's port: the
    count reconciled to exactly max(F, int(F N (1 - ratio))), Qwen3-VL scored with its DeepStack features)."""

    def budget_for(self, ctx, row, group):
        if self.ratio == 0 or group.span.kind != "video" or len(group) == 0 or \
                (self.keep is not None and self.keep >= len(group)):
            return len(group)
        if self.variant == "vllm":  # exact from the grid, as vLLM sizes the placeholders before the vision pass
            return self.target(*video.frame_table(group.span, group.ids, self.name).shape[::-1])
        return len(self.plan(ctx, row, group))

    def select(self, ctx, row, group, budget):
        return self.plan(ctx, row, group)

    def plan(self, ctx, row, group):
        """Kept candidates (indices into the group), computed once per stage."""
        def compute():
            table = video.frame_table(group.span, group.ids, self.name).to(group.slots.device)
            features = ctx.hidden[row, group.slots]
            if self.variant == "vllm":  # vLLM scores Qwen3-VL's merger output with its DeepStack features
                features = ctx.with_deepstack(row, group, features)
            r = 1 - self.ratio if self.ratio is not None else self.keep / len(group)
            kept = self.compress(features[table].to(ctx.score_dtype), r, self.target(*table.shape[::-1]))
            kept = [table[t, chosen] for t, chosen in enumerate(kept)]
            return torch.cat(kept).sort().values
        return ctx.cached(("vidcom2", row, group.span.index, int(group.slots[0]), len(group)), compute)

    def compress(self, frames: torch.Tensor, r: float, target: int | None = None) -> list[torch.Tensor]:
        """VidCom2 on one video ``frames`` ``[F, N, D]`` at retention ``r``: per frame the kept token indices
        (ascending). ``target``: reconcile the total to exactly that many (vLLM's port). Computed in ``frames``'
        dtype."""
        F, N, D = frames.shape
        flat = frames.reshape(F * N, D)
        k = max(1, int(D * self.channel_share))
        channels = torch.topk(flat.var(0, unbiased=False), k, largest=False).indices
        x = torch.nn.functional.normalize(flat[:, channels].view(F, N, k), dim=-1)
        v = gaussian_similarity(x, x.mean((0, 1), keepdim=True))
        similarity = v + gaussian_similarity(x, x.mean(1, keepdim=True))
        scores = -v.mean(-1)
        probs = torch.softmax((scores - scores.max()) / self.temperature, 0)
        scales = (r * (1 + probs - probs.mean())).clamp(max=1.0)
        counts = (scales * N).round().long().clamp(min=1, max=N).tolist()
        kept = torch.zeros(F, N, dtype=torch.bool, device=frames.device)
        for t, count in enumerate(counts):
            kept[t, torch.topk(similarity[t], count, largest=False, sorted=False).indices] = True
        if target is not None:
            reconcile(kept.view(-1), similarity.reshape(-1), target)
        return [row.nonzero().flatten() for row in kept]

    def target(self, tokens_per_frame: int, frames: int) -> int | None:
        """``variant="vllm"``: the exact count vLLM sizes the video's placeholders for before its embeddings exist
        (``compute_retained_tokens_count``: at least one token per frame); None for the authors' rule."""
        if self.variant != "vllm":
            return None
        total = tokens_per_frame * frames
        wanted = min(self.keep, total) if self.keep is not None else int(total * (1 - self.ratio))
        return max(frames, min(wanted, total))


def reconcile(kept: torch.Tensor, similarity: torch.Tensor, target: int) -> None:
    """vLLM's step 5, in place on the flat mask ``kept``: drop the kept tokens of largest ``similarity`` (or add
    the others of smallest) until ``target`` are kept."""
    current = int(kept.sum())
    if current > target:
        chosen = kept.nonzero().flatten()
        kept[chosen[torch.topk(similarity[chosen], current - target, sorted=False).indices]] = False
    elif current < target:
        free = (~kept).nonzero().flatten()
        kept[free[torch.topk(similarity[free], min(target - current, len(free)), largest=False,
                                 sorted=False).indices]] = True

def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``[..., n]``: ``sum_a exp(-||x - centre||^2 / (2 a))`` over the widths ``ALPHAS``."""
    distance = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in ALPHAS)
