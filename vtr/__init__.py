"""vtr: training-free visual-token reduction for Hugging Face vision-language models.

    import vtr
    handle = vtr.patch(model, method="dart", ratio=0.9)   # drop 90% of each image's visual tokens
    model.generate(**inputs)
    handle.last                                           # what the last prefill kept
    handle.remove()
"""
from .api import Handle, handle_of, methods, patch, unpatch
from .methods import (CDPruner, DART, DivPrune, FastV, FasterVLM, HiPrune, Merge, Method, Random, Stage, Uniform,
                      VisPruner, VisionZip, register)
from .report import MergedTokens, PrefillRecord, StageRecord

__version__ = "0.1.0"

__all__ = ["CDPruner", "DART", "DivPrune", "FastV", "FasterVLM", "Handle", "HiPrune", "Merge", "MergedTokens", "Method",
           "PrefillRecord", "Random", "Stage", "StageRecord", "Uniform", "VisPruner", "VisionZip", "handle_of",
           "methods", "patch", "register", "unpatch"]
