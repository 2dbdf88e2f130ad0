from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Stage
from .fastervlm import CLIP_MODELS
from .registry import register


@register
@dataclass
class CDPruner(Method):
    """CDPruner (Zhang et al., NeurIPS'25): keep the visual tokens a conditional DPP picks, trading relevance to the
    instruction against diversity.

    Similarity: cosine similarity of the projected visual tokens (the language model's inputs), fp32. Relevance:
    minus the mean cosine similarity between each patch in CLIP's joint space (the feature layer's hidden state
    through the tower's post-layernorm and CLIP's ``visual_projection``) and the CLIP text embeddings of the
    instruction (split into segments of the text tower's context length), min-max normalised over the image
    (``(r - min + 1e-6) / (max - min)``; the minus sign is the authors' choice). Kernel ``diag(r) S diag(r)``;
    greedy MAP inference of the DPP (Chen et al. 2018: ``T`` picks of the largest remaining marginal gain with
    incremental Cholesky updates). Before the language model. Official code: ``Theia-4869/CDPruner``,
    ``llava_arch.py: encode_images``, ``clip_encoder.py: load_text_tower, forward``.

    The instruction is the row's text after the image, read back from the prompt with the language model's
    tokenizer (special tokens skipped). Options: ``clip``, the CLIP checkpoint whose text tower and visual
    projection give the relevance (default: the tower LLaVA-1.5 / NeXT were trained with), and ``tokenizer``, the
    language model's tokenizer (default: the checkpoint the model was loaded from); both loaded at patch time.

    Keep count per image: ``round(n * (1 - ratio))`` or ``min(keep, n)``, at least 1 (official:
    ``visual_token_num``). Positions: ``compact``. Supported: LLaVA-1.5 and LLaVA-NeXT.

    Deliberate differences from the official code:
      * the instruction: the official evaluation passes the benchmark question (answer-format suffix removed);
        vtr reads the text after the image from the prompt, so chat-template words (``ASSISTANT:``) are included;
        an image followed by no text gets uniform relevance (pure diversity), where the official code needs text;
      * relevance is normalised per image (official: over all images of the batch at once, which would make a
        row depend on its companions); constant relevance (max = min, official: division by zero) is uniform;
      * features are normalised in fp32 (official: in the model dtype, then cast to fp32);
      * LLaVA-NeXT: transformers' ``spatial_unpad`` layout, newline tokens always kept, one budget per image
        (``scope="crop"``: per tile, as the official per-crop budget).
    """

    name: ClassVar[str] = "cdpruner"
    summary: ClassVar[str] = "conditional DPP over projected tokens, relevance from CLIP text-image similarity"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)
    needs: ClassVar[frozenset] = frozenset({"vision", "clip_text"})
    needs_whole_prompt: ClassVar[bool] = True
    model_classes: ClassVar[tuple[str, ...] | None] = CLIP_MODELS
    unsupported_reason: ClassVar[str] = ("its relevance comes from the CLIP text tower matching the model's CLIP "
                                         "vision tower; the official code covers LLaVA-1.5 / NeXT only.")
    clip: str = "openai/clip-vit-large-patch14-336"
    tokenizer: str = ""

    def select(self, ctx, row, span, budget):
        features = torch.nn.functional.normalize(ctx.hidden[row, span.slots].float(), dim=-1)
        similarity = features @ features.T
        text = ctx.instruction_embeddings(row, span)
        relevance = torch.ones(len(span), device=similarity.device)
        if text is not None:
            image = torch.nn.functional.normalize(ctx.clip_image_embeddings(row, span), dim=-1)
            relevance = instruction_relevance(image, torch.nn.functional.normalize(text, dim=-1))
        kernel = relevance[:, None] * similarity * relevance[None, :]
        return greedy_dpp(kernel.to(similarity.device), budget)


def instruction_relevance(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[c]``: minus the mean cosine similarity of each unit image embedding ``[c, C]`` to the unit text segment
    embeddings ``[M, C]``, min-max normalised (all ones when constant)."""
    relevance = -(image @ text.to(image.device).T).mean(-1)
    spread = relevance.max() - relevance.min()
    if not bool(spread > 0):
        return torch.ones_like(relevance)
    return (relevance - relevance.min() + 1e-6) / spread


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``[N, N]`` (Chen et al., NeurIPS'18): each pick is the item of
    largest remaining marginal gain ``d_i^2`` (ties: lowest index), followed by a rank-one Cholesky update.
    Returns ``[k]`` picks in order."""
    n = kernel.shape[0]
    rows = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    gain = torch.diagonal(kernel).clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(gain))
        picks.append(j)
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / torch.sqrt(gain[j])
        rows[i] = e
        gain = gain - e * e
        gain[j] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)
