"""Tiny supported models with random weights and matching offline processors: try ``vtr.patch`` without
downloading anything, and test code that uses it.

    from vtr.testing import tiny_model, random_image
    model, processor = tiny_model("qwen2_vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[random_image(64, 64)], return_tensors="pt")

Every model is its real transformers class (``Qwen2VLForConditionalGeneration``...) built from a config with
4 decoder layers of width 64 and 2 vision layers; the processor is the family's real processor class with its
real image processor, and a word-level tokenizer built locally (128 ids, the family's special tokens). The
outputs of a random model are meaningless; what vtr keeps, and that a pruned run equals the unpatched model fed
the kept tokens, are not.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from . import compat

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|image_pad|>", "<|video_pad|>",
                  "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("a the cat dog what is in this image video describe picture user assistant system you are helpful "
         "USER ASSISTANT : ? . , red green blue big small left right frame").split()
VOCAB_SIZE = 128
PINPOINTS = [[32, 64], [64, 32], [64, 64]]

# Chat templates in each family's prompt format, so the tiny processors take the same `apply_chat_template` call
# as a real checkpoint's.
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}{IMAGE}{% elif c['type'] == 'video' %}{VIDEO}"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")
LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
                       + _CONTENT.replace("{IMAGE}", "<image> ").replace("{VIDEO}", "<video> ")
                       + "{% if m['role'] != 'user' %}</s>{% endif %} {% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                      + _CONTENT.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
                      .replace("{VIDEO}", "<|vision_start|><|video_pad|><|vision_end|>")
                      + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_model(family: str = "qwen2_vl", attn: str = "sdpa", layers: int = 4, seed: int = 0):
    """A supported model with random weights and its offline processor.

    family: one of ``FAMILIES`` (``llava`` is LLaVA-1.5; ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl`` are
    Qwen2/2.5/3-VL). attn: ``"sdpa"`` or ``"eager"``. layers: decoder layers (width 64, 4 heads, 2 KV heads).
    seed: torch seed for the weights.

    Returns ``(model, processor)``: the model in eval mode on the CPU in fp32, about 0.2 M parameters, with
    ``generation_config.eos_token_id = None`` (random weights would stop at an arbitrary step) and
    ``max_new_tokens = 20``. Images of up to
    64x64 pixels give 64 visual tokens on LLaVA-1.5 and Qwen-VL (8x8 merged patches). The processor has a
    video processor when torchvision imports (``has_video_processors()``), else none.
    Raises ``ValueError`` for an unknown family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    tok = make_tokenizer(family)
    ids = tok.convert_tokens_to_ids
    # 10 CLIP layers, so that HiPrune's default object layer (9) exists; the features come from layer 8 (-2)
    clip = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                num_attention_heads=4, patch_size=8, projection_dim=32)
    template = LLAVA_CHAT_TEMPLATE if family.startswith("llava") else QWEN_CHAT_TEMPLATE
    if family == "llava":
        cfg = T.LlavaConfig(vision_config=dict(clip, image_size=64), text_config=_text_config(tok, "llama", layers),
                            image_token_index=ids("<image>"), vision_feature_layer=-2,
                            vision_feature_select_strategy="default", image_seq_length=64,
                            projector_hidden_act="gelu")
        model_cls = T.LlavaForConditionalGeneration
        proc = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 64},
                                                                     crop_size={"height": 64, "width": 64}),
                                tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1, chat_template=template)
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(vision_config=dict(clip, image_size=32), text_config=_text_config(tok, "llama", layers),
                                image_token_index=ids("<image>"), vision_feature_layer=-2,
                                vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                                image_seq_length=16)
        model_cls = T.LlavaNextForConditionalGeneration
        image_processor = T.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                    image_grid_pinpoints=PINPOINTS)
        proc = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=template)
    elif family == "llava_onevision":
        siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=32, patch_size=8)
        cfg = T.LlavaOnevisionConfig(vision_config=siglip, text_config=_text_config(tok, "qwen2", layers),
                                     image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9")
        model_cls = T.LlavaOnevisionForConditionalGeneration
        image_processor = T.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                         image_grid_pinpoints=PINPOINTS)
        proc = _processor(T.LlavaOnevisionProcessor, _video_processor(family), image_processor=image_processor,
                          tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
                          vision_aspect_ratio="anyres_max_9", chat_template=template)
    elif family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = T.Qwen2VLConfig(text_config=_qwen_text(tok, layers), vision_config=vision, **_qwen_ids(tok))
        model_cls = T.Qwen2VLForConditionalGeneration
        proc = _processor(T.Qwen2VLProcessor, _video_processor(family), image_processor=_qwen_image_processor(),
                          tokenizer=tok, chat_template=template)
    elif family == "qwen2_5_vl":
        # 16 blocks, so that HiPrune's default object layer (16) exists; windows of 2x2 merged tokens
        vision = dict(depth=16, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1, 15])
        cfg = T.Qwen2_5_VLConfig(text_config=_qwen_text(tok, layers), vision_config=vision, **_qwen_ids(tok))
        model_cls = T.Qwen2_5_VLForConditionalGeneration
        proc = _processor(T.Qwen2_5_VLProcessor, _video_processor(family), image_processor=_qwen_image_processor(),
                          tokenizer=tok, chat_template=template)
    else:  # qwen3_vl
        text = _text_config(tok, None, layers)
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
        model_cls = T.Qwen3VLForConditionalGeneration
        proc = _processor(T.Qwen3VLProcessor, _video_processor(family), image_processor=_qwen_image_processor(),
                          tokenizer=tok, chat_template=template)
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.max_new_tokens = 20  # transformers' default count, without its warning
    return model, proc


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB PIL image of ``height`` x ``width`` pixels of uniform random noise."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def has_video_processors() -> bool:
    """Whether transformers' video processors can be built: they need an importable torchvision (not the case
    next to the CPU build of torch 2.13)."""
    try:
        T.Qwen2VLVideoProcessor()
        return True
    except ImportError:
        return False


def make_tokenizer(family: str) -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer of ``VOCAB_SIZE`` ids: the special tokens, a few words, then ``w<i>`` fillers so
    every id a random model emits decodes. Left padding."""
    # Processors read `tokenizer.image_token` when it exists, so the special-token attributes are per family.
    if family.startswith("llava"):
        extra = {"image_token": "<image>", "video_token": "<video>"}
    else:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokens = SPECIAL_TOKENS + WORDS
    tokens += [f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                    eos_token="</s>", padding_side="left", extra_special_tokens=extra)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


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


def _video_processor(family):
    if not has_video_processors():
        return None
    if family == "llava_onevision":
        return T.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    if family == "qwen3_vl":  # its size budget counts frames x height x width
        return T.Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 16 ** 2, "longest_edge": 16 * 64 ** 2})
    return T.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 ** 2,
                                   max_pixels=64 ** 2)


def _processor(cls, video_processor, **kwargs):
    if video_processor is None:
        return compat.processor_without_video(cls, **kwargs)
    return cls(video_processor=video_processor, **kwargs)
