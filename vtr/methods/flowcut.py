"""FlowCut: prune inside the vision encoder by information flow (NeurIPS'25; official code TungChintao/FlowCut)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage, StageSpec
from .registry import register


def flowcut_score(cls_attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FlowCut's ``compute_score``: ``(a / sum a + s / sum s) * ||v||_1``. cls_attention, semantic: ``[..., n]``;
    values: ``[..., n, d]`` (mean over heads). Returns ``[..., n]``."""
    relation = cls_attention / cls_attention.sum(-1, keepdim=True)
    similarity = semantic / semantic.sum(-1, keepdim=True)
    return (relation + similarity) * values.abs().sum(-1)


def adaptive_prune_count(cls_attention: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's ``adaptive_prune_ratio``: how many patches to drop at a pruning layer, ``round((N - target) /
    sqrt(remaining) * (1 - (H(a) / log N) ** 2))`` with ``H`` the entropy of the normalised [CLS] attention over the
    ``N`` current patches, the largest over the crops (``[c, N]`` rows) of the image."""
    n = cls_attention.shape[-1]
    prob = cls_attention / cls_attention.sum(-1, keepdim=True)
    ratio = -(prob * torch.log(prob)).sum(-1) / math.log(n)
    counts = (n - target) / remaining ** 0.5 * (1 - ratio ** 2)
    return int(counts.max().round())


@register
@dataclass
class FlowCut(Method):
    """FlowCut (NeurIPS'25; github.com/TungChintao/FlowCut): progressive pruning inside the CLIP
    vision tower, guided by how information flows to the [CLS] token.

    Vision stage (``flowcut/modeling_clip_flowcut.py``): after every vision layer ``i`` below the feature layer
    ``F`` (CLIP layer 22 of 24 on LLaVA: ``hidden_states[-2]``) while a crop holds more than its target, each patch
    ``j`` is scored ``S_j = (a_j / sum a + s_j / sum s) * ||v_j||_1``, with ``a`` the [CLS] query's attention
    (softmax, mean over heads), ``s`` the softmax over tokens of the unscaled dot product of [CLS]'s value with each
    value (per head, mean over heads) and ``v_j`` the value mean over heads; scores accumulate ``C = (C + S) / 2``.
    At the layers with ``rpl = F - i - 1`` even (every second layer, the last being ``F - 1``) the crop keeps its
    ``max(n - P, target + 1) - 1`` patches of highest ``C`` ([CLS] always kept, original order), ``P =
    round((N - target) / sqrt(rpl) * (1 - (H(a) / log N)^2))`` (the entropy of the normalised [CLS] attention),
    and at ``rpl = 0`` exactly the target. Layers from ``F`` on, the projector and the language model run on the
    kept patches.

    Keep count (``budget``: ``keep``, or ``round(n * (1 - ratio))`` of the image's ``n`` tokens): LLaVA-1.5, that
    many patches per image after the vision stage, as ``flowcut(model, target_num)`` does. LLaVA-NeXT (official
    ``anyres``): ``floor(target / 2)`` patches per crop (base image and every tile), the tile tokens stitched without
    newline tokens, then a second stage in the language model: at decoder layer 1 the last prompt token's query and
    value score the image's remaining tokens (``softmax(q k / sqrt(d))`` over the image's keys and ``softmax(v_q v /
    sqrt(d))`` over its values, mean over heads, combined as above with ``||mean_h v_j||_1``) and the top ``target``
    go on from layer 2 (``llm_layer``); positions compacted, as the official Llama code does.

    Options: ``llm_layer`` (None: 2 on LLaVA-NeXT, none on LLaVA-1.5; 0 turns the language-model stage off).

    Deliberate differences from the official code:

    * per image, not per batch: the adaptive count ``P`` is the largest over the image's own crops (the official
      code takes the largest over the whole tower batch, i.e. over every image of a batch), so a row's result does
      not depend on its companions; images that keep different counts are right-padded in the tower with a key
      mask (eager / SDPA vision attention; FlashAttention-2 refuses such a batch);
    * the language-model stage is per image: the official code scores one span per row, from its first image token
      to its last (text between images included) against one budget;
    * the tower keeps its attention backend: the [CLS] row's attention and the value similarities are computed from
      the query, key and value projections each layer computed itself (captured; fp32 unless
      ``score_dtype="model"``; the official code computes them in fp16 inside a patched eager attention);
    * the projector runs on the whole grid (pruned slots hold zeros, which are then dropped), so that the model's
      own feature selection and anyres packing run unchanged: the extra projector work is per token and small;
    * at least one patch per crop on LLaVA-NeXT (``floor(target / 2)`` would be 0 for ``target = 1``);
    * a ``ratio`` budget is taken of the image's own token count (LLaVA-NeXT: base grid and unpadded tiles with their
      newlines), where the official code takes one ``target_num`` for every image;
    * with ``vision_feature_select_strategy="full"`` ([CLS] passed to the language model, not used by the LLaVA-1.5 /
      NeXT checkpoints) the [CLS] token is kept beside the target patches, where the official ``cls_patch`` mode
      counts it among them.

    Not supported: Qwen2/2.5/3-VL (the official Qwen code: a mean-query "global" score on the 2x2 merge groups,
    window ``cu_seqlens`` and rotary positions of the kept patches) and LLaVA-OneVision (SigLIP has no [CLS]): refused
    with a ``ValueError``. Images only.
    """

    name: ClassVar[str] = "flowcut"
    layer_option: ClassVar[str] = "llm_layer"
    summary: ClassVar[str] = "prune inside the CLIP tower by [CLS]-attention x value flow, adaptive per layer"
    stage: ClassVar[Stage] = Stage.VISION
    default_positions: ClassVar[str] = "compact"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    unsupported_reason: ClassVar[str] = ("vtr implements FlowCut's vision stage for CLIP towers with a [CLS] token "
                                         "(LLaVA-1.5, LLaVA-NeXT); its Qwen2-VL variant and other towers are not "
                                         "implemented yet.")
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    newline_candidates: ClassVar[bool] = True  # the anyres code drops the tile newlines; the LM stage scores all
    needs_whole_prompt: ClassVar[bool] = True  # the LLaVA-NeXT stage reads the prompt's last token

    llm_layer: int | None = dataclasses.field(default=None, metadata={"min": 0})

    def __post_init__(self):
        super().__post_init__()
        if self.scope != "image":
            raise ValueError(f"{self.name}: scope must be 'image' (its budget is per image)")

    def for_model(self, family) -> "FlowCut":
        method = super().for_model(family)
        if method.llm_layer is None:
            method = dataclasses.replace(method, llm_layer=2 if family.name == "llava_next" else 0)
        return method

    def stages(self) -> list[StageSpec]:
        specs = [StageSpec(Stage.VISION, 0)]
        return specs + [StageSpec(Stage.LAYER, self.llm_layer)] if self.llm_layer else specs

    # ------------------------------------------------------------------------------------------ vision stage
    def vision_stage_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(range(feature_layer))

    def vision_target(self, n_tokens: int, n_crops: int) -> int:
        target = self.budget(n_tokens)
        return max(1, target // 2) if self.llm_layer else target

    def vision_step(self, ctx, image) -> torch.Tensor | None:
        cls = ctx.attention_rows(image, slice(0, 1))[:, :, 0, 1:].mean(1)  # [c, N]
        values = ctx.values(image)  # [c, H, n, d]
        semantic = (values[:, :, :1] @ values.transpose(-1, -2)).softmax(-1)[:, :, 0].mean(1)[:, 1:]
        score = flowcut_score(cls, semantic, values.mean(1)[:, 1:])
        cumulative = image.state.get("scores")
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        image.state["scores"] = cumulative
        remaining = image.feature_layer - image.layer - 1
        if remaining % 2:
            return None
        prune = adaptive_prune_count(cls, remaining, image.target) if remaining else image.n
        keep = max(image.n - prune, image.target + 1) - 1
        chosen = cumulative.topk(keep, dim=1).indices.sort(1).values
        image.state["scores"] = cumulative.gather(1, chosen)
        return chosen

    # ------------------------------------------------------------------------------- language-model stage
    def budget_for(self, ctx, row, group) -> int:
        return min(len(group), self.budget(group.span.n))  # the image's target over what the tower kept

    def select(self, ctx, row, span, budget) -> torch.Tensor:
        last = ctx.last_slots()[row:row + 1]
        q = ctx.queries(row, last)  # [H, 1, d]
        values = ctx.values()[row]  # [H_kv, L, d]
        keys = ctx.keys()[row].to(q.dtype)
        repeat = q.shape[0] // keys.shape[0]
        slots = span.slots.to(keys.device)
        k = keys[:, slots].repeat_interleave(repeat, 0)
        v = values[:, slots].repeat_interleave(repeat, 0)
        v_query = values[:, last.to(values.device)].repeat_interleave(repeat, 0)
        scale = 1 / math.sqrt(q.shape[-1])
        relation = (q @ k.transpose(-1, -2) * scale).softmax(-1, dtype=torch.float32).to(q.dtype)[:, 0].mean(0)
        semantic = (v_query @ v.transpose(-1, -2) * scale).softmax(-1, dtype=torch.float32).to(q.dtype)[:, 0]
        score = flowcut_score(relation, semantic.mean(0), v.mean(0))
        return score.topk(budget).indices
