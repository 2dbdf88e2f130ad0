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

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl", "gemma3",
            "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
                  "glm4v", "glm4v_moe")

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>", "<|image_pad|>", "<|video_pad|>",
                  "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|image|>",
                  "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
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
INTERNVL_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                          + _CONTENT.replace("{IMAGE}", "<IMG_CONTEXT>\n").replace("{VIDEO}", "<video>\n")
                          + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA3_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        + _CONTENT.replace("{IMAGE}", "<start_of_image>").replace("{VIDEO}", "")
                        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GLM4V_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                       + _CONTENT.replace("{IMAGE}", "<|begin_of_image|><|image|><|end_of_image|>")
                       .replace("{VIDEO}", "<|begin_of_video|><|video|><|end_of_video|>")
                       + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
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
    if family == "internvl":
        template = INTERNVL_CHAT_TEMPLATE
    elif family == "gemma3":
        template = GEMMA3_CHAT_TEMPLATE
    elif family.startswith("glm4v"):
        template = GLM4V_CHAT_TEMPLATE
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
    elif family == "internvl":
        # InternViT: a [CLS] token, 8x8 patches of a 32-px tile, pixel shuffle to 4x4 = 16 tokens per tile; 10
        # layers so that HiPrune's default object layer (9) exists; per-head-dim-free q/k RMSNorm (InternViT-6B's)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=10, num_attention_heads=4,
                      image_size=32, patch_size=4, use_qk_norm=True)
        cfg = T.InternVLConfig(vision_config=vision, text_config=_text_config(tok, "qwen2", layers),
                               image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=16, downsample_ratio=0.5,
                               vision_feature_layer=-1, vision_feature_select_strategy="default")
        model_cls = T.InternVLForConditionalGeneration
        image_processor = T.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=4)
        proc = compat.processor_without_video(T.InternVLProcessor, image_processor=image_processor, tokenizer=tok,
                                              image_seq_length=16, chat_template=template)
    elif family == "gemma3":
        # SigLIP without [CLS] (32-px images, 8x8 patches) average-pooled to 4x4 = 16 tokens per image; sliding-window
        # and global layers alternating, a window of 8 tokens: prompts of a few dozen tokens span several windows,
        # and a window cuts through each 16-token image block
        siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=32, patch_size=4)
        text = _text_config(tok, None, layers)
        text.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
        cfg = T.Gemma3Config(text_config=text, vision_config=siglip, mm_tokens_per_image=16,
                             boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                             image_token_index=ids("<image_soft_token>"))
        model_cls = T.Gemma3ForConditionalGeneration
        image_processor = T.Gemma3ImageProcessor(size={"height": 32, "width": 32})
        proc = T.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=16,
                                 chat_template=template)
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
    elif family.startswith("glm4v"):
        # GLM-4.1V's tower (a 2x2 downsampling convolution before the merger) and its decoder layers (extra norms
        # after attention and MLP); half of each 16-dim head rotates (3-D RoPE sections 2/1/1)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, image_size=32)
        text = _text_config(tok, None, layers)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                   "mrope_section": [2, 1, 1]}
        ids_ = dict(image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
                    image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
                    video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"))
        if family == "glm4v_moe":  # GLM-4.5V: a first dense layer, then 4 routed experts (2 per token) + 1 shared
            text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, head_dim=16)
            cfg = T.Glm4vMoeConfig(text_config=text, vision_config=vision, **ids_)
            model_cls = T.Glm4vMoeForConditionalGeneration
        else:
            cfg = T.Glm4vConfig(text_config=text, vision_config=vision, **ids_)
            model_cls = T.Glm4vForConditionalGeneration
        image_processor = T.Glm4vImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": 16 ** 2, "longest_edge": 64 ** 2})
        proc = _processor(T.Glm4vProcessor, _video_processor(family), image_processor=image_processor,
                          tokenizer=tok, chat_template=template)
    elif family.startswith("qwen3_5"):
        # Gated DeltaNet (linear attention, a recurrent state) and full-attention layers alternating (the real
        # models: 3 linear then 1 full); partial M-RoPE (half of each 16-dim head rotates) as Qwen3.5's
        text = _text_config(tok, None, layers)
        text.update(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_conv_kernel_dim=4,
                    layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                     "mrope_section": [2, 1, 1], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        if family == "qwen3_5_moe":  # 4 routed experts (2 per token) and the shared expert
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
            cfg = T.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
            model_cls = T.Qwen3_5MoeForConditionalGeneration
        else:
            cfg = T.Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_ids(tok))
            model_cls = T.Qwen3_5ForConditionalGeneration
        proc = _processor(T.Qwen3VLProcessor, _video_processor("qwen3_vl"), image_processor=_qwen_image_processor(),
                          tokenizer=tok, chat_template=template)
    else:  # qwen3_vl, qwen3_vl_moe
        text = _text_config(tok, None, layers)
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        if family == "qwen3_vl_moe":  # 4 experts, 2 per token; layer 0 keeps a dense MLP, as mlp_only_layers allows
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        mlp_only_layers=[0])
            cfg = T.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
            model_cls = T.Qwen3VLMoeForConditionalGeneration
        else:
            cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
            model_cls = T.Qwen3VLForConditionalGeneration
        proc = _processor(T.Qwen3VLProcessor, _video_processor(family), image_processor=_qwen_image_processor(),
                          tokenizer=tok, chat_template=template)
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, attn_implementation=attn).eval()
    if family == "gemma3":  # its projector weight starts at zero (every image token's embedding 0): random instead
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
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
    elif family.startswith("glm4v"):
        extra = {"image_token": "<|image|>", "video_token": "<|video|>"}
    elif family == "gemma3":
        extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    elif family == "internvl":
        extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
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
    if family.startswith("glm4v"):
        return T.Glm4vVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                     size={"shortest_edge": 16 ** 2, "longest_edge": 16 * 64 ** 2},
                                     max_image_size={"longest_edge": 16 * 64 ** 2})
    if family.startswith("qwen3_vl"):  # its size budget counts frames x height x width
        return T.Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 16 ** 2, "longest_edge": 16 * 64 ** 2})
    return T.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 ** 2,
                                   max_pixels=64 ** 2)


def _processor(cls, video_processor, **kwargs):
    if video_processor is None:
        return compat.processor_without_video(cls, **kwargs)
    return cls(video_processor=video_processor, **kwargs)
