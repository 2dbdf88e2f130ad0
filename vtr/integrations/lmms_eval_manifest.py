"""lmms-eval plugin entry point (group ``lmms_eval.models``): registers vtr's wrappers without importing them.

    lmms-eval --model vtr_qwen2_5_vl \
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,vtr_method=dart,vtr_ratio=0.778,vtr_layer=2 ...

Like the stock models they extend, ``vtr_llava_hf``, ``vtr_qwen2_5_vl`` and ``vtr_qwen3_vl`` resolve to the chat
class (lmms-eval 0.7.3's default for ``llava_hf``, ``qwen2_5_vl``, ``qwen3_vl``) and to the simple class with
``--force_simple``; ``vtr_qwen2_vl`` has only a simple class, as ``qwen2_vl`` does.
"""
from __future__ import annotations

# model id: (stock lmms-eval model it extends, {"simple" | "chat": (vtr class, stock class)})
WRAPPERS = {
    # LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (HF checkpoints)
    "vtr_llava_hf": ("llava_hf", {"simple": ("VtrLlavaHf", "LlavaHf"), "chat": ("VtrLlavaHfChat", "LlavaHf")}),
    "vtr_qwen2_vl": ("qwen2_vl", {"simple": ("VtrQwen2VL", "Qwen2_VL")}),
    "vtr_qwen2_5_vl": ("qwen2_5_vl", {"simple": ("VtrQwen2_5_VL", "Qwen2_5_VL"),
                                      "chat": ("VtrQwen2_5_VLChat", "Qwen2_5_VL")}),
    "vtr_qwen3_vl": ("qwen3_vl", {"simple": ("VtrQwen3VL", "Qwen3_VL"), "chat": ("VtrQwen3VLChat", "Qwen3_VL")}),
}
ALIASES = {"vtr_llava_hf": ("vtr_llava_onevision",)}


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest
    paths = {name: {kind: f"vtr.integrations.lmms_eval.{cls}" for kind, (cls, _) in classes.items()}
             for name, (_, classes) in WRAPPERS.items()}
    return [ModelManifest(model_id=name, simple_class_path=paths[name].get("simple"),
                          chat_class_path=paths[name].get("chat"), aliases=ALIASES.get(name, ()))
            for name in WRAPPERS]
