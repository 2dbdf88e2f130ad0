"""The accuracy canary's synthetic task and tiny LLaVA-1.5 model (no torch import at module level beyond what the
model needs; the evaluator and the CLI are in ``canary.py``, training in ``benchmarks/train_canary.py``).

Task: a 64x64 image of low-contrast grey texture with one 8x8 square of a saturated colour at a random pixel
offset; the question "what colour is the object ?" has one of ``COLOURS`` as its one-token answer. The square
covers 1 to 4 of the 8x8 grid of 8-pixel patches (the model's 64 visual tokens): those are the *informative*
tokens; every other token is background. Chance accuracy is ``1 / len(COLOURS)``.

Model: ``LlavaForConditionalGeneration`` (the real class) with a 2-layer CLIP tower of width 32 whose features
come from its first layer (``vision_feature_layer=-2``: one attention layer mixes patches before the projector)
and a 2-layer Llama of width 64: about 0.1 M parameters, 0.4 MB of fp32 weights (``canary_weights.safetensors``,
shipped next to this file; ``benchmarks/train_canary.py`` writes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..methods.base import Method, Stage

COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (230, 220, 30)}
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = ["USER", ":", "ASSISTANT", "what", "colour", "is", "the", "object", "?", *COLOURS]
IMAGE, PATCH = 64, 8
GRID = IMAGE // PATCH  # 8x8 visual tokens
SQUARE = 8
QUESTION = "what colour is the object ?"
PROMPT = f"USER : <image> {QUESTION} ASSISTANT :"
WEIGHTS = Path(__file__).with_name("canary_weights.safetensors")


def samples(n: int, seed: int, square: int = SQUARE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` task samples, deterministic in ``seed``; ``square``: the side of the coloured square in pixels (the
    task's is 8; training starts with larger ones, a curriculum).

    Returns ``(images, answers, informative)``: ``[n, 64, 64, 3]`` uint8 pixels, ``[n]`` indices into ``COLOURS``,
    ``[n, 64]`` bool, which visual tokens (raster order over the 8x8 patch grid) the square overlaps."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(90, 160, size=(n, 1, 1, 1))
    texture = rng.integers(-20, 21, size=(n, IMAGE, IMAGE, 1))
    images = np.clip(grey + texture, 0, 255).repeat(3, axis=3).astype(np.uint8)
    answers = rng.integers(0, len(COLOURS), size=n)
    top, left = rng.integers(0, IMAGE - square + 1, size=(2, n))
    informative = np.zeros((n, GRID, GRID), dtype=bool)
    for i in range(n):
        images[i, top[i]:top[i] + square, left[i]:left[i] + square] = RGB[COLOURS[answers[i]]]
        rows = slice(top[i] // PATCH, (top[i] + square - 1) // PATCH + 1)
        cols = slice(left[i] // PATCH, (left[i] + square - 1) // PATCH + 1)
        informative[i, rows, cols] = True
    return images, answers, informative.reshape(n, GRID * GRID)


def tokenizer() -> T.PreTrainedTokenizerFast:
    """The canary's word-level tokenizer (special tokens, then ``WORDS``), left padding."""
    tokens = SPECIAL + WORDS
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(SPECIAL)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                    eos_token="</s>", padding_side="left",
                                    extra_special_tokens={"image_token": "<image>"})
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def build(seed: int = 0):
    """``(model, processor)``: the canary's LLaVA-1.5 architecture with random weights (seeded), fp32, SDPA."""
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=PATCH, image_size=IMAGE, projection_dim=32)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"), eos_token_id=ids("</s>"))
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_seq_length=GRID * GRID, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = T.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    processor = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                                                      crop_size={"height": IMAGE, "width": IMAGE}),
                                 tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1)
    return model, processor


def load(path: str | Path = WEIGHTS):
    """The canary model with its trained weights (``path``, a safetensors file). Raises ``FileNotFoundError``."""
    from safetensors.torch import load_file
    model, processor = build()
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied or derived buffers may be absent from the file; any learned weight missing is an error.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"canary weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), processor


def pixels(images: np.ndarray, processor) -> torch.Tensor:
    """``[n, 3, 64, 64]`` float pixel values, as the processor's CLIP normalisation gives them (training feeds
    these directly; evaluation goes through the processor)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * ip.rescale_factor
    return (x - mean) / std


def inputs(images: np.ndarray, processor) -> dict:
    """Model inputs for a batch of task images (all with the same prompt): ``input_ids`` ``[n, L]`` with the 64
    image tokens expanded, ``attention_mask``, ``pixel_values`` ``[n, 3, 64, 64]``."""
    text = processor(text=[PROMPT] * len(images), return_tensors="pt",
                     images=[np.ascontiguousarray(image) for image in images])
    return dict(text)


def answer_ids(processor) -> torch.Tensor:
    """``[len(COLOURS)]`` token ids of the answers, in ``COLOURS`` order."""
    return torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(COLOURS)))


@dataclass
class Oracle(Method):
    """Canary baseline (not registered): keeps the tokens ``informative`` marks first (``background=False``) or
    only unmarked tokens (``background=True``), each group in a seeded random order. ``informative``: a
    ``[batch, 64]`` bool tensor (``samples``' third output), set on the instance before each forward.
    Raises ``ValueError`` when ``background`` and the budget exceeds the unmarked tokens."""

    name: ClassVar[str] = "oracle"
    stage: ClassVar[Stage] = Stage.PRE_LLM
    background: bool = False
    informative: object = field(default=None, repr=False)

    def select(self, ctx, row, span, budget):
        marked = self.informative[row, span.ids.cpu()]
        order = torch.randperm(len(span), generator=torch.Generator().manual_seed(row))
        first = ~marked[order] if self.background else marked[order]
        if self.background and budget > int(first.sum()):
            raise ValueError("oracle-background: the budget exceeds the background tokens")
        return torch.cat([order[first], order[~first]])[:budget].to(span.slots.device)
