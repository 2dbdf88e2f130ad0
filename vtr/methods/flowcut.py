"""FlowCut: prune inside the vision encoder by information flow (NeurIPS'25; official code TungChintao/FlowCut)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage, StageSpec
from .registry import register


def flowcut_score(cls_attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor,
                  normalise: bool = True) -> torch.Tensor:
    """FlowCut's ``compute_score``: ``(a / sum a + s / sum s) * ||v||_1``. cls_attention, semantic: ``[..., n]``;
    values: ``[..., n, d]`` (mean over heads). Returns ``[..., n]``. ``normalise=False``: ``(a + s) * ||v||_1``, the
    Qwen code's ``compute_score_llm`` (it computes the normalised terms and then adds the raw ones)."""
    if normalise:
        cls_attention = cls_attention / cls_attention.sum(-1, keepdim=True)
        semantic = semantic / semantic.sum(-1, keepdim=True)
    return (cls_attention + semantic) * values.abs().sum(-1)


def adaptive_prune_count(cls_attention: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's ``adaptive_prune_ratio``: how many patches to drop at a pruning layer, ``round((N - target) /
    sqrt(remaining) * (1 - (H(a) / log N) ** 2))`` with ``H`` the entropy of the normalised [CLS] attention over the
    ``N`` current patches, the largest over the crops (``[c, N]`` rows) of the image."""
    n = cls_attention.shape[-1]
    prob = cls_attention / cls_attention.sum(-1, keepdim=True)
    ratio = -(prob * torch.log(prob)).sum(-1) / math.log(n)
    counts = (n - target) / remaining ** 0.5 * (1 - ratio ** 2)
    return int(counts.max().round())


def qwen_prune_count(attention: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's Qwen ``adaptive_prune_ratio``: patches to drop at a pruning block, ``round((N - target) /
    sqrt(remaining) * (1 - (H / log N) ** 2))``, ``H = -sum a log(a + 1e-7)`` the entropy of the global query's
    attention ``a`` (``[1, N]``, already a distribution: not renormalised) over the ``N`` current patches."""
    n = attention.shape[-1]
    ratio = -(attention * torch.log(attention + 1e-7)).sum(-1) / math.log(n)
    return int(((n - target) / remaining ** 0.5 * (1 - ratio ** 2)).max().round())


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

    Options: ``llm_layer`` (None: 2 on LLaVA-NeXT and Qwen-VL, none on LLaVA-1.5; 0 turns the language-model stage
    off).

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
    * at least one patch per crop on LLaVA-NeXT (``floor(target / 2)`` would be 0 for ``target = 1``);
    * a ``ratio`` budget is taken of the image's own token count (LLaVA-NeXT: base grid and unpadded tiles with their
      newlines), where the official code takes one ``target_num`` for every image;
    * with ``vision_feature_select_strategy="full"`` ([CLS] passed to the language model, not used by the LLaVA-1.5 /
      NeXT checkpoints) the [CLS] token is kept beside the target patches, where the official ``cls_patch`` mode
      counts it among them.

    Qwen2-VL (``FlowCut_Qwen/modeling_qwen2_vl_flowcut.py``, ``utils_flowcut.py``, ``main.py``; the README says it
    applies to Qwen2.5-VL as well; Qwen2.5-VL and Qwen3-VL follow the same rule here). ``flowcut(model, T)`` sets
    the tower's target to ``2 T`` merged tokens, i.e. ``8 T`` patches. After every block ``i`` of the ``L``-block
    tower while the image holds more than its target, with ``rpl = L - i - 1`` (the last block included, since the
    merger reads its output): the tower has no [CLS], so a "global" query, the mean over the image's patches of the
    block's queries (after the rotary embedding, per head), attends to its keys, ``a = mean_h softmax(q_g k /
    sqrt(d))`` (fp32 softmax), and each patch scores ``S_j = a_j * ||mean_h v_j||_1`` (``compute_score_vit``; the
    official mean value is computed but unused); ``C = (C + S) / 2`` as above. At even ``rpl`` the image keeps
    ``max(n - P, target)`` patches, ``P = round((n - target) / sqrt(rpl) * (1 - (H(a) / log n)^2))`` (``H`` with
    ``log(a + 1e-7)``; ``rpl = 0``: exactly the target). The language model then gets the kept tokens, the image's
    span shortened and given the FIRST positions of its original span (``positions="span_prefix"``, the default
    here; ``positions="original"`` gives the kept tokens their own (t, h, w) M-RoPE positions instead), and at
    decoder layer 1 the last prompt token scores the image's tokens as on LLaVA-NeXT but with ``compute_score_llm``'s
    unnormalised ``(a + s) * ||v||_1`` (the official inconsistency, followed: ``a`` and ``s`` are softmaxes averaged
    over heads, so the normalisation changes them by rounding only); the top ``T`` go on from layer 2 with the
    positions they had (``llm_layer``, default 2; with ``llm_layer=0`` the tower keeps ``T`` merged tokens).

    Deliberate differences on Qwen-VL:

    * whole 2x2 merge units are kept or dropped (a unit scores the sum of its 4 patches' scores; the image keeps
      ``ceil(max(n - P, target) / 4)`` units): the official code (``Qwen2VisionTransformerPretrainedModel_forward``)
      keeps single patches by ``topk`` and its merger then concatenates any 4 consecutive kept patches into one
      language token, mixing patches from different places. This is a different unit of selection, not a
      reordering: what reaches the language model, and which image regions it covers, can differ substantially
      from the official run (vtr keeps every language token a real 2x2 unit with its own M-RoPE position, which
      the official output does not define);
    * per image: the official code takes one global query, one ``topk`` and one budget over the whole packed tower
      sequence of a call (every image of a prompt; batch size 1 only) and, in the language model, one span from the
      first image token to the last (text between images dropped);
    * the tower keeps its attention backend (the scores come from the block's own captured ``qkv`` projection; fp32
      unless ``score_dtype="model"``), its later blocks run on the kept rows with rebuilt ``cu_seqlens`` (Qwen2.5-VL
      windows too) and rotary embeddings; Qwen3-VL's DeepStack features are taken of the kept units.

    Not supported: LLaVA-OneVision (SigLIP has no [CLS] token and the official code no rule for it): refused with a
    ``ValueError``. Images only: a prompt with a video raises.
    """

    name: ClassVar[str] = "flowcut"
    layer_option: ClassVar[str] = "llm_layer"
    summary: ClassVar[str] = "prune inside the CLIP tower by [CLS]-attention x value flow, adaptive per layer"
    stage: ClassVar[Stage] = Stage.VISION
    default_positions: ClassVar[str] = "compact"
    needs: ClassVar[frozenset] = frozenset({"attention_inputs"})
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                                "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                                                "Qwen3VLForConditionalGeneration",
                                                "Qwen3VLMoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
                                                "Qwen3_5MoeForConditionalGeneration")
    unsupported_reason: ClassVar[str] = ("vtr implements FlowCut's vision stage for CLIP towers with a [CLS] token "
                                         "(LLaVA-1.5, LLaVA-NeXT) and for the Qwen2/2.5/3-VL and Qwen3.5 vision "
                                         "transformers; other towers (SigLIP, InternViT, GLM-4.1V's) have no official "
                                         "rule.")
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    newline_candidates: ClassVar[bool] = True  # the anyres code drops the tile newlines; the LM stage scores all
    needs_whole_prompt: ClassVar[bool] = True  # the LLaVA-NeXT stage reads the prompt's last token

    llm_layer: int | None = dataclasses.field(default=None, metadata={"min": 0})
    """Decoder layer of the second, language-model stage (LLaVA-NeXT and Qwen-VL); None: 2 there and no second stage
    on LLaVA-1.5; 0 turns it off."""
    _qwen: ClassVar[bool] = False  # set per instance by for_model: the Qwen-VL rule

    def __post_init__(self):
        super().__post_init__()
        if self.scope != "image":
            raise ValueError(f"{self.name}: scope must be 'image' (its budget is per image)")

    def for_model(self, family) -> "FlowCut":
        method = self
        if method.positions is None and family.mrope:  # the official Qwen code's span positions
            method = dataclasses.replace(method, positions="span_prefix")
        method = dataclasses.replace(super(FlowCut, method).for_model(family))
        if method.llm_layer is None:
            method = dataclasses.replace(method, llm_layer=2 if family.name == "llava_next" or family.mrope else 0)
        method._qwen = family.mrope
        return method

    def stages(self) -> list[StageSpec]:
        specs = [StageSpec(Stage.VISION, 0)]
        # span_prefix: the layer stage keeps the positions the tokens got at the language model's input
        layer = StageSpec(Stage.LAYER, self.llm_layer,
                          positions="original" if self.positions == "span_prefix" else None)
        return specs + [layer] if self.llm_layer else specs

    # ------------------------------------------------------------------------------------------ vision stage
    def vision_stage_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(range(feature_layer + 1 if self._qwen else feature_layer))

    def vision_target(self, n_tokens: int, n_crops: int) -> int:
        target = self.budget(n_tokens)
        if self._qwen:  # merge units: 2 T, the language model's layer-1 stage keeps T of them
            return min(n_tokens, 2 * target) if self.llm_layer else target
        return max(1, target // 2) if self.llm_layer else target

    def vision_step(self, ctx, image) -> torch.Tensor | None:
        if image.unit > 1:
            return self._qwen_step(ctx, image)
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

    def _qwen_step(self, ctx, image) -> torch.Tensor | None:
        attention = ctx.global_query_attention(image)  # [1, n]
        score = attention * ctx.values(image).mean(1).abs().sum(-1)  # compute_score_vit
        score = score.view(1, -1, image.unit).sum(-1)  # per merge unit
        cumulative = image.state.get("scores")
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        image.state["scores"] = cumulative
        remaining = image.feature_layer - image.layer  # the official rpl: blocks after this one
        if remaining % 2:
            return None
        prune = qwen_prune_count(attention, remaining, image.target) if remaining else image.n
        keep = -(-max(image.n - prune, image.target) // image.unit)
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
        score = flowcut_score(relation, semantic.mean(0), v.mean(0), normalise=not self._qwen)
        return score.topk(budget).indices
