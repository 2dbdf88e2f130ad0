"""Tiny random Qwen2.5-VL and Qwen3-VL that vLLM's CPU backend can run, saved to a local folder.

vtr.testing's tiny models have a head dim of 16; vLLM's CPU attention supports 32 and up, so these have width 128
with 4 heads (head dim 32). Same tokenizer, chat template and processors as vtr.testing (patch 4, merge 2: a
64x64 image gives 64 visual tokens; 4 frames of 64x48 give a (2, 8, 6) grid, 96 tokens)."""
from __future__ import annotations

import torch
import transformers as T

from vtr import testing

FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # pruned by the plugin; qwen2_vl is built to test that it is refused
INIT = 0.5


def build(family: str, folder) -> T.PreTrainedModel:
    """Build the model and processor of ``family``, save both to ``folder``, return the model (eval, fp32)."""
    tok = testing.make_tokenizer(family)
    ids = testing._qwen_ids(tok)
    text = testing._text_config(tok, None, layers=2)
    # A wide initialisation, so that greedy tokens vary from step to step and depend on which visual tokens are
    # kept (at the default 0.02 every prompt decodes to one repeated token).
    text.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                initializer_range=INIT)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT)
        cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **ids)
        cls, proc_cls = T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                      initializer_range=INIT)
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **ids)
        cls = T.Qwen2_5_VLForConditionalGeneration
        proc_cls = T.Qwen2_5_VLProcessor
    elif family == "qwen3_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1], initializer_range=INIT)
        cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, initializer_range=INIT, **ids)
        cls = T.Qwen3VLForConditionalGeneration
        proc_cls = T.Qwen3VLProcessor
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + ('qwen2_vl',)}")
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    image_processor = testing._qwen_image_processor()
    if family == "qwen3_vl":
        # Qwen3-VL's checkpoints normalise images as their video processor does (mean 0.5, std 0.5), and vLLM
        # normalises both on the device with the image processor's values (mm_device_do_normalize).
        image_processor.image_mean, image_processor.image_std = [0.5] * 3, [0.5] * 3
    proc = proc_cls(image_processor=image_processor, video_processor=testing._video_processor(family),
                    tokenizer=tok, chat_template=testing.QWEN_CHAT_TEMPLATE)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model
