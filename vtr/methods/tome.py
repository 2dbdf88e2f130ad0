from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage, VisionMerge
from .registry import register


@register
@dataclass
class ToMe(Method):
    """ToMe, Token Merging (Bolya et al., ICLR'23): bipartite soft matching inside the vision tower, the merged
    tokens carrying their size into a proportional attention; the classic merging baseline of LightCompress,
    EffiVLM-Bench, VTC-Bench and UniPruneBench.

    In every CLIP layer up to the feature layer ``F`` (CLIP layer 22 of 24 on LLaVA-1.5, ``hidden_states[-2]``),
    between the self-attention (and its residual) and the MLP, each crop merges ``r`` tokens
    (``bipartite_soft_matching`` with its class token): the metric is the layer's keys, mean over heads,
    L2-normalised; the tokens in their current order are split alternately into A (even) and B (odd), each A
    token's best match is its most cosine-similar B token ([CLS], the first A token, never merges), the ``r`` A
    tokens with the most similar matches merge into them, and the new order is the unmerged A tokens (in A order)
    then every B token. Merging is by size (``merge_wavg``): a merged token is the size-weighted mean of its group,
    its size the sum. With ``proportional`` (the official ``prop_attn``, on by default) every layer adds
    ``log(size)`` of each key to its attention logits. The MLP, later layers, the projector and the language model
    run on what is left.

    Keep count: ``budget(n)`` patches per image (``round(n * (1 - ratio))`` of its ``n`` tokens, or ``keep``, at least
    1), spread over the ``F + 1`` merging layers: layer ``i`` merges ``r_i = ceil(left / layers left)`` of the ``left``
    patches still to go (more when the later layers, each merging at most half of its tokens, could not reach the
    budget otherwise; a budget no schedule reaches raises a ``ValueError``), so a constant ``r`` (LightCompress's
    ``r: 16``, ``keep=208`` on LLaVA-1.5) is reproduced when it divides. Merged tokens: ``handle.last.merged``
    (the prompt's tokens in each); ``handle.last.vision_merges`` (per layer, which token each went into).
    Positions: ``compact`` (the tower's output is the language model's block of visual tokens).

    Official code: ``facebookresearch/ToMe``, ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``),
    ``tome/patch/timm.py`` (``ToMeBlock``, ``ToMeAttention``: ``k.mean(1)``, proportional attention); its VLM use:
    LightCompress ``llmc/compression/token_reduction/tome.py`` (CLIP encoder layers of LLaVA).

    Deliberate differences:
      * token order: the tower keeps its tokens in raster order (each merged token in the slot of the B token it
        merged into) while the matching follows the official order (tracked per crop), so the language model sees
        the kept tokens in raster order (official: ToMe's shuffled order); the tower's outputs are the same up to
        summation order (attention and the MLP do not depend on token order);
      * the schedule: the official ``r`` is one number per layer (or a decaying schedule); here the budget sets it;
      * LightCompress's VLM port has no proportional attention and resets sizes every layer; this follows the
        official ToMe (``proportional=False`` drops the attention bias, sizes still weight the means);
      * the merge runs in fp32 and the metric in fp32 (``score_dtype="model"``: the tower's dtype);
      * with ``vision_feature_select_strategy="full"`` the [CLS] token is kept beside the budget's patches.
    Supported: LLaVA-1.5 (one CLIP crop per image). Eager or SDPA vision attention (the proportional bias is an
    additive mask).
    """

    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "bipartite soft matching in the CLIP tower: similar tokens merged, proportional attention"
    stage: ClassVar[Stage] = Stage.VISION
    default_positions: ClassVar[str] = "compact"
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    model_classes: ClassVar[tuple[str, ...] | None] = ("LlavaForConditionalGeneration",)
    unsupported_reason: ClassVar[str] = ("vtr implements ToMe in CLIP towers with a [CLS] token, one crop per image "
                                         "(LLaVA-1.5), as LightCompress runs it.")
    vision_merge_point: ClassVar[str] = "attention"

    proportional: bool = True
    """Proportional attention (the official ``prop_attn``): every tower layer adds log(size) of each key to its
    attention logits once tokens have merged."""

    @property
    def proportional_attention(self) -> bool:
        return self.proportional

    def vision_stage_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(range(feature_layer + 1))

    def vision_target(self, n_tokens: int, n_crops: int) -> int:
        return self.budget(n_tokens)

    def vision_step(self, ctx, image) -> VisionMerge | None:
        r = merge_count(image.n_patches, image.target, image.feature_layer - image.layer + 1)
        if r is None:
            raise ValueError(f"vtr: tome cannot reach {image.target} patches per crop: {image.n_patches} are "
                             f"left for the {image.feature_layer - image.layer + 1} layers up to the feature layer, "
                             "each merging at most half of its tokens; keep more tokens")
        if r <= 0:
            return None
        order = image.state.get("order")
        if order is None:
            order = torch.arange(image.n).expand(image.n_crops, -1)
        order = order.to(ctx.hidden.device)
        metric = ctx.keys(image).mean(1)  # [c, n, d] in slot order
        _, keep, into, order = bipartite_merge(metric.gather(1, order[..., None].expand(-1, -1, metric.shape[-1])),
                                                    order, r)
        image.state["order"] = order
        return VisionMerge(keep=keep, into=into)


def merge_count(patches: int, target: int, layers: int) -> int | None:
    """ToMe's ``r`` for this layer: ``ceil(left / layers)`` of the ``left = patches - target`` still to merge, more
    when the later layers could not otherwise reach the target (a layer merges at most ``patches // 2``: half of
    its tokens, the class token protected), never more than that. None when the target is out of reach."""
    left, cap = patches - target, patches // 2

    def reachable(p, k):  # the fewest patches k layers can leave of p
        for _ in range(k):
            p -= p // 2
        return p

    r = max(0, math.ceil(left / layers))
    while r <= cap and reachable(patches - r, layers - 1) > target:
        r += 1
    return r if r <= cap else None


def bipartite_merge(metric: torch.Tensor, order: torch.Tensor, r: int):
    """One ToMe step with a class token on ``c`` crops: ``metric`` ``[c, n, d]`` in the official order, ``order``
    ``[c, n]`` the current slot (the tower's raster-ordered sequence, [CLS] = slot 0) of each official position.
    Returns (``[c, r]`` merged slots, keep ``[c, n - 1 - r]`` patch indices (slot - 1) of the tokens left,
    into ``[c, n - 1]`` per current patch its position in keep, the new official order in the slots the tokens
    take once the engine has kept them in raster order)."""
    c, n = order.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf  # the class token (first A token) never merges
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm = edge_idx[:, r:].sort(dim=1).values
    src = edge_idx[:, :r]
    dst = node_idx.gather(1, src)
    a_slots, b_slots = order[:, ::2], order[:, 1::2]
    new_order = torch.cat([a_slots.gather(1, unm), b_slots], 1)  # [CLS] first
    rows = torch.arange(c, device=order.device)[:, None]
    position = torch.full((c, n), -1, dtype=torch.long, device=order.device)
    kept_sorted = new_order.sort(1).values  # the slots the engine keeps, in raster order ([CLS] first)
    position[rows, kept_sorted] = torch.arange(kept_sorted.shape[1], device=order.device)
    target = torch.arange(n, device=order.device).expand(c, -1).clone()
    target[rows, a_slots.gather(1, src)] = b_slots.gather(1, dst)
    into = position.gather(1, target)[:, 1:] - 1  # positions among the kept patches ([CLS] excluded)
    keep = kept_sorted[:, 1:] - 1
    new_slots = torch.argsort(torch.argsort(new_order, 1), 1)  # each official position's rank among the kept
    return a_slots.gather(1, src), keep, into, new_slots
