"""Model-family patches: which model classes vtr supports, and how each lays out its visual tokens."""
from __future__ import annotations

from .base import Family
from .gemma3 import Gemma3Family
from .internvl import InternVLFamily
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily, LlavaOnevisionFamily
from .qwen2_vl import Glm4vFamily, Qwen3_5Family, Qwen3VLFamily, QwenVLFamily

FAMILIES: tuple[Family, ...] = (LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), QwenVLFamily(),
                                Qwen3VLFamily(), Qwen3_5Family(), Glm4vFamily(), InternVLFamily(), Gemma3Family())


def supported_model_classes() -> list[str]:
    return [name for family in FAMILIES for name in family.model_classes]


def family_of(model) -> Family:
    for cls in type(model).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.model_classes:
                return family
    raise TypeError(f"vtr does not support {type(model).__name__}; supported model classes: "
                    f"{', '.join(supported_model_classes())}")
