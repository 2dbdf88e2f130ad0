"""Tiny randomly initialised VLMs and offline processors for the test suite.

Everything is built from constructor arguments (no hub access): a word-level tokenizer made with `tokenizers`,
the real image processors of each family, and `from_config` models with 4 decoder layers of width 64.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|image_pad|>", "<|video_pad|>",
                  "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("a the cat dog what is in this image video describe picture user assistant system you are helpful "
         "USER ASSISTANT : ? . , red green blue big small left right frame").split()
VOCAB_SIZE = 128
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")


def make_tokenizer(family: str) -> T.PreTrainedTokenizerFast:
    # Processors read `tokenizer.image_token` when it exists, so the special-token attributes are per family.
    if family.startswith("llava"):
        extra = {"image_token": "<image>", "video_token": "<video>"}
    else:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokens = SPECIAL_TOKENS + WORDS
    tokens += [f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]  # every id the model can emit decodes
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                    eos_token="</s>", padding_side="left", extra_special_tokens=extra)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def without_video_processor(cls, **kwargs):
    """Build a processor with no video processor: with no torchvision, transformers cannot construct one and its
    type check of `video_processor=None` fails, so the attribute is left out of the subclass's attribute list."""
    sub = type(cls.__name__ + "NoVideo", (cls,),
               {"get_attributes": classmethod(lambda c: [a for a in cls.get_attributes() if a != "video_processor"])})
    proc = sub(**kwargs)
    proc.video_processor = None
    return proc


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def _text_config(tok, model_type: str | None, layers: int) -> dict:
    cfg = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               pad_token_id=tok.convert_tokens_to_ids("<pad>"), bos_token_id=tok.convert_tokens_to_ids("<s>"),
               eos_token_id=tok.convert_tokens_to_ids("</s>"))
    if model_type:
        cfg["model_type"] = model_type
    return cfg


def _qwen_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_text(tok, layers):
    text = _text_config(tok, None, layers)
    # mrope_section must sum to head_dim / 2 = 8
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    return text


def _qwen_image_processor():
    return T.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 ** 2,
                                   max_pixels=64 ** 2)


def build(family: str, attn: str = "sdpa", layers: int = 4, seed: int = 0):
    """Returns (model, processor) for one of FAMILIES."""
    tok = make_tokenizer(family)
    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=64, patch_size=8, projection_dim=32)
        cfg = T.LlavaConfig(vision_config=vision, text_config=_text_config(tok, "llama", layers),
                            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                            vision_feature_select_strategy="default", image_seq_length=64,
                            projector_hidden_act="gelu")
        model_cls = T.LlavaForConditionalGeneration
        proc = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 64},
                                                                     crop_size={"height": 64, "width": 64}),
                                tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1)
    elif family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = T.Qwen2VLConfig(text_config=_qwen_text(tok, layers), vision_config=vision, **_qwen_ids(tok))
        model_cls = T.Qwen2VLForConditionalGeneration
        proc = without_video_processor(T.Qwen2VLProcessor, image_processor=_qwen_image_processor(), tokenizer=tok,
                                       video_processor=None)
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        cfg = T.Qwen2_5_VLConfig(text_config=_qwen_text(tok, layers), vision_config=vision, **_qwen_ids(tok))
        model_cls = T.Qwen2_5_VLForConditionalGeneration
        proc = without_video_processor(T.Qwen2_5_VLProcessor, image_processor=_qwen_image_processor(),
                                       tokenizer=tok, video_processor=None)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, every test decodes its steps
    return model, proc


def _prompt(family: str, n_images: int, long: bool) -> str:
    vis = "<image>" if family == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    images = " ".join([vis] * n_images)
    if family == "llava":
        prefix = "system you are helpful . USER :" if long else "USER :"
        question = "what is in this big red image ?" if long else "what is in this image ?"
        return f"{prefix} {images} {question} ASSISTANT :".replace("  ", " ")
    prefix = "<|im_start|> system you are helpful . <|im_end|> <|im_start|> user" if long else "<|im_start|> user"
    question = "what is in this big red image ?" if long else "what is in this image ?"
    return f"{prefix} {images} {question} <|im_end|> <|im_start|> assistant".replace("  ", " ")


VARIANTS = ("single", "multi", "mixed")
IMAGE_SIZES = [(64, 64), (48, 80), (64, 48)]


def image_inputs(family: str, proc, batch: int = 1, variant: str = "single"):
    """A batch of prompts with images, left padded. Rows differ in prompt length and, for Qwen, in image size and
    hence visual token count. ``multi``: row 0 holds two images, row 1 one; ``mixed``: row 1 has no image."""
    images_per_row = {"single": [1] * batch, "multi": [2, 1], "mixed": [1, 0]}[variant]
    texts = [_prompt(family, n, long=bool(b % 2)) for b, n in enumerate(images_per_row)]
    n_images = sum(images_per_row)
    images = [random_image(*IMAGE_SIZES[i % 3], seed=i) for i in range(n_images)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True)


def text_inputs(proc, batch: int = 1):
    texts = ["USER : what is a cat ? ASSISTANT :", "system you are helpful . USER : describe a red dog ? ASSISTANT :"]
    return proc.tokenizer(texts[:batch], return_tensors="pt", padding=True)
