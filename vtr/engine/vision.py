"""Vision-tower signals: the inputs and outputs of the vision layers a method reads, captured while
the images are encoded."""
from __future__ import annotations

import threading

import torch

from .. import compat
from .core import VisionCall


class VisionSignals:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _attach_vision(self, reg) -> None:
        """Capture, for each vision layer the method reads, its attention input and its output, during the image
        encoding (inside the forward, or before the prefill in generate). The tower keeps its own attention
        backend; signals are recomputed from these inputs for the rows a method needs."""
        layers = compat.vision_layers(self.model)
        wanted = self.method.vision_layers(len(layers), compat.vision_feature_layer(self.model))
        for i in wanted:
            reg(compat.vision_self_attention(layers[i]).register_forward_pre_hook(self._vision_input(i),
                                                                                   with_kwargs=True))
            reg(layers[i].register_forward_hook(self._vision_output(i)))
        compat.shadow_method(compat.base_model(self.model), compat.IMAGE_FEATURES, self._encode_images)

    def _encode_images(self, original, *args, **kwargs):
        sizes = compat.call_argument(original, args, kwargs, "image_sizes")
        call = VisionCall(image_sizes=sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes,
                          grid_thw=compat.call_argument(original, args, kwargs, "image_grid_thw"))
        self._vision[threading.get_ident()] = call
        return original(*args, **kwargs)

    def _vision_input(self, i: int):
        def hook(module, args, kwargs):
            call = self._vision.get(threading.get_ident())
            if call is not None:
                call.layers[i] = [module, kwargs.get("hidden_states", args[0] if args else None), None]
                call.extras[i] = {k: v for k, v in kwargs.items() if k in ("cu_seqlens", "position_embeddings")}
        return hook

    def _vision_output(self, i: int):
        def hook(module, args, output):
            call = self._vision.get(threading.get_ident())
            if call is not None and i in call.layers:
                call.layers[i][2] = compat.layer_output(output)
        return hook
