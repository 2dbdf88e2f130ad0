"""vtr: training-free visual-token reduction for Hugging Face vision-language models.

    import vtr
    handle = vtr.patch(model, method="dart", ratio=0.9)   # drop 90% of each image's visual tokens
    model.generate(**inputs)
    handle.last                                           # what the last prefill kept
    handle.remove()
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# The public names load on first use, so that `import vtr` (and every `--help` of its tools) does not import
# torch and transformers, which take seconds.
_SOURCES = {"Handle": "api", "handle_of": "api", "methods": "api", "patch": "api", "unpatch": "api",
            "CDPruner": "methods", "DART": "methods", "DivPrune": "methods", "DyCoke": "methods", "FastV": "methods",
            "FastVID": "methods", "FasterVLM": "methods", "FlowCut": "methods", "FrameFusion": "methods",
            "HiPrune": "methods", "HoliTom": "methods", "Merge": "methods", "Method": "methods", "PruneVid": "methods",
            "PyramidDrop": "methods", "Random": "methods", "SparseVLM": "methods", "Stage": "methods",
            "Uniform": "methods", "VFlowOpt": "methods", "VisPruner": "methods", "VisionZip": "methods",
            "register": "methods",
            "AddedToken": "report", "MergedTokens": "report", "PrefillRecord": "report", "StageRecord": "report"}

__all__ = sorted(_SOURCES)


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module 'vtr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))


class _Package(types.ModuleType):
    # `vtr.methods` names both the function and the subpackage. Importing the subpackage assigns it to the package
    # attribute, which would shadow the function; a property on the module's class outranks that assignment.
    @property
    def methods(self):
        return importlib.import_module(".api", __name__).methods

    @methods.setter
    def methods(self, value):
        pass


sys.modules[__name__].__class__ = _Package
