from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage
from .registry import register

CLIP_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
# Vision towers with a [CLS] token: CLIP (LLaVA-1.5 / NeXT) and InternViT (InternVL 3 / 3.5).
CLS_MODELS = CLIP_MODELS + ("InternVLForConditionalGeneration",)
# Vision transformers without [CLS] whose language tokens each merge a 2x2 unit of patches (Qwen-VL, GLM-4.1V): the
# [CLS]-attention methods whose authors name a substitute (VisPruner#1: the attention each token receives, "global
# attention", applied to the merged tokens; LightCompress ports VisionZip and VisPruner to Qwen2.5-VL so) take it.
GLOBAL_ATTENTION_MODELS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                           "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                           "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                           "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration")
NO_SUBSTITUTE = ("its score is the vision tower's [CLS] attention, or on the Qwen-VL / GLM-4.1V vision transformers "
                 "the received-attention substitute its authors describe (VisPruner#1); the SigLIP towers of "
                 "LLaVA-OneVision and Gemma 3 have no [CLS] token and vtr does not offer the substitute on them.")
IMPORTANCE = ("cls", "global")


def resolve_importance(method, family):
    """``method`` with ``importance`` resolved for a model family: None takes "global" on the towers without
    [CLS] (Qwen-VL, GLM-4.1V: M-RoPE families) and "cls" elsewhere; "cls" on them is refused."""
    if method.importance is None:
        return dataclasses.replace(method, importance="global" if family.mrope else "cls")
    if method.importance == "cls" and family.mrope:
        raise ValueError(f"{method.name}: importance='cls' needs a vision tower with a [CLS] token; this model's "
                         "has none (use importance='global', the default here)")
    return method


NO_CLS = ("its score is the vision tower's [CLS] attention; the SigLIP towers of LLaVA-OneVision and Gemma 3 and the "
          "Qwen-VL / GLM-4.1V vision transformers have no [CLS] token, and the method documents no substitute for "
          "them.")


@register
@dataclass
class FasterVLM(Method):
    """FasterVLM (Zhang et al., arXiv 2412.01818): keep the patches the vision tower's [CLS] token attends to most.

    Score: softmax attention of the [CLS] query over the patches at the vision layer LLaVA takes its features from
    (``vision_feature_layer=-2``: CLIP layer 22 of 24), mean over heads; top-k per image; the kept tokens stay in
    their original order. Before the language model. The [CLS] row is recomputed from that layer's captured input
    (one query row; the tower keeps SDPA). Official code: ``Theia-4869/FasterVLM``,
    ``clip_encoder.py: feature_select`` and ``llava_arch.py: encode_images``.

    Keep count per image of ``n`` tokens: ``round(n * (1 - ratio))`` (the README's 144 / 58 / 29 of 576 for
    75 / 90 / 95 %; the official ``visual_token_num`` is the count itself) or ``min(keep, n)``, at least 1.
    Positions: ``compact`` (official: the kept features form a contiguous block).

    Supported: LLaVA-1.5, LLaVA-NeXT (CLIP towers with [CLS]) and InternVL 3 / 3.5 (InternViT, with [CLS]); other
    models are refused at patch time.

    Deliberate differences from the official code:
      * LLaVA-NeXT: vtr keeps transformers' ``spatial_unpad`` layout (unpadded high-resolution grid with newline
        tokens, which are always kept); each token is scored by its own tile's [CLS] attention. The official code
        forces the ``spatial`` layout (no unpadding, no newlines: 5 x 576 tokens) and keeps ``T`` per crop; here the
        budget is per image (``scope="crop"`` gives one budget per tile, as the official code);
      * scores in fp32 from recomputed q/k (official: eager attention probabilities in the model dtype;
        ``score_dtype="model"`` computes the logits in the tower's dtype);
      * the projector is not run on the dropped patches (official: projects all 576, then masks; same result);
      * InternVL (no official code): a language token is the pixel shuffle of a 2x2 unit of patches; its score is
        the mean of the unit's [CLS] attention (the rule VisPruner's authors give for merged tokens, VisPruner#1),
        each tile (and the thumbnail) scored by its own [CLS]; one budget per image (``scope="crop"``: per tile).
    """

    name: ClassVar[str] = "fastervlm"
    summary: ClassVar[str] = "top-k patches by the vision tower's [CLS] attention, before the LLM"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision"})
    model_classes: ClassVar[tuple[str, ...] | None] = CLS_MODELS
    unsupported_reason: ClassVar[str] = NO_CLS

    def select(self, ctx, row, span, budget):
        return torch.topk(ctx.vision_cls_attention(row, span), budget).indices
