"""lmms-eval plugin entry point (group ``lmms_eval.models``): registers vtr's wrappers without importing them.

    lmms-eval --model vtr_qwen2_5_vl \
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,vtr_method=dart,vtr_ratio=0.778,vtr_layer=2 ...
"""
from __future__ import annotations

WRAPPERS = {
    # model id: (vtr class, stock lmms-eval model it extends)
    "vtr_llava_hf": ("VtrLlavaHf", "llava_hf"),  # LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (HF checkpoints)
    "vtr_qwen2_vl": ("VtrQwen2VL", "qwen2_vl"),
    "vtr_qwen2_5_vl": ("VtrQwen2_5_VL", "qwen2_5_vl"),
}
ALIASES = {"vtr_llava_hf": ("vtr_llava_onevision",)}


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest
    return [ModelManifest(model_id=name, simple_class_path=f"vtr.integrations.lmms_eval.{cls}",
                          aliases=ALIASES.get(name, ())) for name, (cls, _) in WRAPPERS.items()]
