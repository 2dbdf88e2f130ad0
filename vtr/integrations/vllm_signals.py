"""The vision tower's signals inside vLLM: the inputs and outputs of the vision layers a method reads, captured while
vLLM's own tower encodes the inputs (no second tower pass), in the form ``vtr.signals`` reads them.

vLLM's towers fuse the attention projections (``qkv_proj`` / ``qkv``) and run their own attention kernels; the views
below give ``vtr.compat``'s attention helpers the per-projection interface they read, computed from vLLM's weights,
so that the signals are the same code as in ``vtr.patch`` (``vtr.signals.vision``, ``vtr.signals.video``).
Written against vLLM 0.32's ``CLIPEncoderLayer`` / ``CLIPAttention`` and Qwen2-VL / Qwen2.5-VL vision blocks.
"""
from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import torch
# vtr.compat.qwen_vision_heads applies the rotary embedding of the attention's own module: for the view below, the
# Hugging Face function (neox style, as vLLM's ApplyRotaryEmb), on position embeddings given in its format
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision  # noqa: F401


class CLIPAttentionView:
    """A vLLM ``CLIPAttention`` as ``vtr.compat``'s CLIP helpers read one: ``q_proj`` / ``k_proj`` / ``v_proj`` (bias included),
    ``num_heads``, ``head_dim``, ``scale``."""

    def __init__(self, attn: torch.nn.Module):
        self._attn = attn
        self.num_heads, self.head_dim, self.scale = attn.num_heads_per_partition, attn.head_dim, attn.scale

    def _projections(self, hidden: torch.Tensor):
        qkv, _ = self._attn.qkv_proj(hidden)
        return qkv.chunk(3, dim=-1)

    def q_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._projections(hidden)[0]

    def k_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._projections(hidden)[1]

    def v_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._projections(hidden)[2]


class QwenAttentionView:
    """A vLLM Qwen2-VL / Qwen2.5-VL vision attention as ``vtr.compat``'s Qwen helpers read one: the fused ``qkv``
    projection (the same [q, k, v] x heads layout as Hugging Face's), ``num_heads``, ``scaling``."""

    def __init__(self, attn: torch.nn.Module):
        self._attn = attn
        self.num_heads = attn.num_attention_heads_per_partition
        self.scaling = attn.hidden_size_per_attention_head ** -0.5

    def qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = self._attn.qkv(hidden)
        return out


class TowerCapture:
    """Forward hooks on a vLLM vision tower's layers that record, while ``capture(layers)`` is active in this
    thread, each named layer's attention input, its output, and (Qwen-VL) its attention arguments.

    ``calls``: one dict per tower forward inside the block: layer -> [attention view, input, output] (CLIP:
    ``[C, N, D_v]``; Qwen-VL: ``[S, D_v]`` in the tower's order), and ``extras``: layer -> ``cu_seqlens`` and
    ``position_embeddings`` (Hugging Face's (cos, sin), ``[S, head_dim]``)."""

    def __init__(self, layers: torch.nn.ModuleList, qwen: bool):
        self.layers, self.qwen = layers, qwen
        self._local = threading.local()
        self._handles = []
        for i, layer in enumerate(layers):
            attn = layer.attn if qwen else layer.self_attn
            self._handles.append(attn.register_forward_pre_hook(self._input_hook(i, attn), with_kwargs=True))
            if not qwen:
                self._handles.append(layer.register_forward_hook(self._output_hook(i)))

    @contextlib.contextmanager
    def capture(self, layers):
        """Record ``layers`` (0-based; empty: nothing) of every tower forward in the block; yields the list of
        recorded calls."""
        previous = getattr(self._local, "state", None)
        state = SimpleNamespace(layers=set(layers), calls=[])
        self._local.state = state if layers else None
        try:
            yield state.calls
        finally:
            self._local.state = previous

    def _current(self, i: int, first: bool):
        state = getattr(self._local, "state", None)
        if state is None or i not in state.layers:
            return None
        if first and (not state.calls or i in state.calls[-1]["layers"]):
            state.calls.append({"layers": {}, "extras": {}})
        return state.calls[-1] if state.calls else None

    def _input_hook(self, i: int, attn: torch.nn.Module):
        def hook(module, args, kwargs):
            call = self._current(i, first=True)
            if call is None:
                return None
            hidden = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            if self.qwen:  # [S, 1, D] (sequence, batch, channels)
                hidden = hidden.reshape(hidden.shape[0], -1)
                cos, sin = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
                call["extras"][i] = {"cu_seqlens": torch.as_tensor(kwargs["cu_seqlens"]),
                                     "position_embeddings": (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))}
                view = QwenAttentionView(attn)
            else:
                view = CLIPAttentionView(attn)
            # Qwen-VL blocks are compiled modules (vLLM's support_torch_compile), whose forward hooks never run;
            # their signals read the attention inputs only (vtr.signals: received and mean-query attention), so
            # the layer output stands in as that input.
            call["layers"][i] = [view, hidden, hidden if self.qwen else None]
        return hook

    def _output_hook(self, i: int):
        def hook(module, args, output):
            call = self._current(i, first=False)
            if call is not None and i in call["layers"]:
                output = output[0] if isinstance(output, (tuple, list)) else output
                call["layers"][i][2] = output.reshape(output.shape[0], -1) if self.qwen else output
        return hook


def crop_slice(call: dict, start: int, stop: int) -> dict:
    """The layers of a CLIP-tower call restricted to its inputs (crops, frames) ``[start, stop)``."""
    return {i: (view, hidden[start:stop], None if out is None else out[start:stop])
            for i, (view, hidden, out) in call["layers"].items()}


def qwen_slice(call: dict, start: int, stop: int) -> tuple[dict, dict]:
    """The layers and attention arguments of a Qwen-VL tower call restricted to the rows ``[start, stop)`` of one
    input (the tower packs its inputs one after the other; Qwen2.5-VL orders each one's rows by window), with its
    ``cu_seqlens`` counted from the input's first row."""
    layers = {i: (view, hidden[start:stop], None if out is None else out[start:stop])
              for i, (view, hidden, out) in call["layers"].items()}
    extras = {}
    for i, extra in call["extras"].items():
        bounds = extra["cu_seqlens"].to("cpu").long()
        bounds = bounds[(bounds >= start) & (bounds <= stop)] - start
        cos, sin = extra["position_embeddings"]
        extras[i] = {"cu_seqlens": bounds, "position_embeddings": (cos[start:stop], sin[start:stop])}
    return layers, extras
