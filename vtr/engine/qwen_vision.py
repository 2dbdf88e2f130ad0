"""The ``vision`` stage inside Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision transformers.

The tower runs its blocks on one packed ``[S, D]`` sequence (the call's images one after the other; Qwen2.5-VL: each
image's 2x2 merge units in window order) with ``cu_seqlens`` (attention segments), ``max_seqlen`` and the rotary
``position_embeddings`` as keyword arguments. After a pruning block the engine keeps whole merge units (4
consecutive rows, one language token) and the later blocks run on the kept rows:

* a forward hook on the pruning block returns its output gathered to the kept rows;
* a forward pre-hook (with kwargs) on every later block replaces ``cu_seqlens`` by the boundaries of the kept rows in
  each original segment (per image frame; Qwen2.5-VL's window blocks: per window, the sequence being in window
  order), ``max_seqlen`` by their longest segment and ``position_embeddings`` by the kept rows' rotary (cos, sin);
  empty segments are dropped. Attention stays packed, so images that keep different counts need no padding and
  every attention backend (FlashAttention-2 included) runs unchanged;
* the patch merger and Qwen3-VL's DeepStack mergers run on the kept rows (whole units: their groups of 4 rows are
  intact); forward hooks put their outputs back at full length (pruned units zero), so Qwen2.5-VL's reverse window
  permutation and the placeholder count are unchanged; the language model's pre-hook then removes the pruned
  units' tokens (and their DeepStack features) as the CLIP stage's tokens are removed
  (``Pruning._vision_survivors``).

Only the images of ``get_image_features`` are pruned; a video tower call runs untouched.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .. import compat
from ..signals import VisionImage, VisionStageContext
from .core import clock


@dataclass
class QwenStageState:
    """One image encoding of a Qwen-VL tower under a ``vision`` stage.

    full: rows of the unpruned sequence ``S``; rows: ``[S']`` ascending original row (tower order) of each current
    row; cu_seqlens / cu_windows: the unpruned attention boundaries (int32; windows None without window blocks);
    rotary: the unpruned (cos, sin) ``[S, d]`` (captured at the first block); history: block -> ``[1, S']`` rows
    after that block pruned; memo: the current rows' block arguments."""

    full: int
    unit: int
    rows: torch.Tensor
    images: list
    cu_seqlens: torch.Tensor
    cu_windows: torch.Tensor | None
    order: torch.Tensor | None = None
    rotary: tuple | None = None
    history: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def pruned(self) -> bool:
        return len(self.rows) < self.full

    def survived_tokens(self) -> torch.Tensor:
        """``[S / unit]`` bool per merged token of the call (images in input order, each in raster order): its
        merge unit is still present. ``order``: each unit's merged token, in the tower's order."""
        alive = torch.zeros(self.full // self.unit, dtype=torch.bool, device=self.rows.device)
        alive[self.rows // self.unit] = True
        merged = torch.empty_like(alive)
        merged[self.order.to(alive.device)] = alive  # Qwen2.5-VL: from window order to raster order
        return merged


def kept_seqlens(cu: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The boundaries ``cu`` (``[n + 1]`` of the unpruned rows) of segments holding only the kept ``rows``
    (ascending original rows), empty segments dropped."""
    bounds = torch.searchsorted(rows, cu.to(rows.device).long()).to(cu.dtype)
    return torch.unique_consecutive(bounds)


class QwenVisionStage:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _attach_qwen_stage(self, reg) -> None:
        tower = compat.qwen_tower(self.model)
        layers = compat.vision_layers(self.model)
        windows = compat.qwen_window_blocks(self.model)
        reg(tower.register_forward_pre_hook(self._qwen_tower_pre, with_kwargs=True))
        for i, layer in enumerate(layers):
            reg(layer.register_forward_pre_hook(self._qwen_block_pre(i in windows), with_kwargs=True))
            if i in self.vision_stage_layers:
                module = compat.vision_projections(compat.vision_self_attention(layer))["qkv"]
                reg(module.register_forward_hook(self._stage_projection(i, "qkv")))
                reg(layer.register_forward_hook(self._qwen_block_output(i)))
        for merger in compat.qwen_mergers(self.model):
            reg(merger.register_forward_hook(self._qwen_merged_full_length))
        reg(tower.register_forward_hook(self._qwen_tower_output))

    def _qwen_stage(self) -> QwenStageState | None:
        """The stage state of the image encoding running now (None in a video tower call, which runs untouched)."""
        call = self._vision.get(threading.get_ident())
        if call is None or not call.encoding or not isinstance(call.stage, QwenStageState):
            return None
        return call.stage

    def _qwen_tower_pre(self, module, args, kwargs):
        """A new stage state for an image encoding (``get_image_features``)."""
        call = self._vision.get(threading.get_ident())
        if call is None or not call.encoding:
            return None
        grid = compat.qwen_grid_argument(args, kwargs)
        unit = compat.qwen_merge_unit(self.model)
        images, first = [], 0
        for k, (t, h, w) in enumerate(grid.tolist()):
            n = int(t * h * w)
            tokens = n // unit
            target = 0 if self.method.ratio == 0 else self.method.vision_target(tokens, 1) * unit
            images.append(VisionImage(crops=slice(k, k + 1), n=n, cls=False, target=target, layer=-1,
                                      feature_layer=self.vision_feature_layer, state={}, unit=unit,
                                      rows=slice(first, first + n)))
            first += n
        windows = compat.qwen_window_seqlens(self.model, grid) if compat.qwen_window_blocks(self.model) else None
        call.stage = QwenStageState(full=first, unit=unit, rows=torch.arange(first, device=grid.device),
                                    images=images, cu_seqlens=compat.qwen_cu_seqlens(grid), cu_windows=windows,
                                    order=compat.qwen_unit_order(self.model, grid))
        return None

    def _qwen_block_pre(self, window: bool):
        def hook(module, args, kwargs):
            stage = self._qwen_stage()
            if stage is None:
                return None
            if stage.rotary is None:
                stage.rotary = kwargs["position_embeddings"]
            if not stage.pruned:
                return None
            key = ("window" if window else "full", len(stage.rows))
            if key not in stage.memo:
                cu = stage.cu_windows if window else stage.cu_seqlens
                cu = kept_seqlens(cu.to(stage.rows.device), stage.rows).to(kwargs["cu_seqlens"].device)
                longest = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
                stage.memo[key] = (cu, longest)
            cu, longest = stage.memo[key]
            kwargs = dict(kwargs, cu_seqlens=cu, position_embeddings=self._qwen_rotary(stage))
            if kwargs.get("max_seqlen") is not None:
                max_seqlen = kwargs["max_seqlen"]
                kwargs["max_seqlen"] = torch.as_tensor(longest).to(max_seqlen) if isinstance(max_seqlen, torch.Tensor) \
                    else longest
            return args, kwargs
        return hook

    @staticmethod
    def _qwen_rotary(stage: QwenStageState) -> tuple:
        key = ("rotary", len(stage.rows))
        if key not in stage.memo:
            rows = stage.rows.to(stage.rotary[0].device)
            stage.memo[key] = tuple(t[rows] for t in stage.rotary)
        return stage.memo[key]

    def _qwen_block_output(self, i: int):
        def hook(module, args, output):
            stage = self._qwen_stage()
            call = self._vision.get(threading.get_ident())
            projections = call.layers.pop(("stage", i), None) if call is not None else None
            if stage is None or projections is None:
                return None
            hidden = compat.layer_output(output)
            new = self._qwen_prune(stage, i, compat.vision_self_attention(module), projections, hidden)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _qwen_prune(self, stage: QwenStageState, layer: int, attn, projections: dict,
                    hidden: torch.Tensor) -> torch.Tensor | None:
        """Ask the method, image by image, which merge units to keep after block ``layer``; returns the block's
        output ``[S', D]`` gathered to the kept rows, or None if nothing was dropped."""
        start = clock(hidden)
        rotary = self._qwen_rotary(stage) if stage.pruned else stage.rotary
        ctx = VisionStageContext(self, attn, projections, rotary=rotary)
        keep, changed = [], False
        for image in stage.images:
            image.layer = layer
            rows = torch.arange(image.rows.start, image.rows.stop, device=hidden.device)
            chosen = None
            if image.target > 0 and image.n_patches > image.target:
                chosen = self.method.vision_step(ctx, image)
            if chosen is not None:
                chosen = self._checked_units(chosen, image)
            if chosen is None or chosen.shape[1] == image.n_units:
                keep.append(rows)
                continue
            units = chosen[0].sort().values.to(hidden.device)
            offsets = torch.arange(image.unit, device=hidden.device)
            keep.append(image.rows.start + (units[:, None] * image.unit + offsets).flatten())
            changed = True
        if not changed:
            stage.seconds += clock(hidden) - start
            return None
        first = 0
        for image, rows in zip(stage.images, keep):
            image.rows, image.n = slice(first, first + len(rows)), len(rows)
            first += len(rows)
        keep = torch.cat(keep)
        stage.rows = stage.rows[keep.to(stage.rows.device)]
        stage.memo.clear()
        stage.history[layer] = stage.rows[None].clone()
        stage.seconds += clock(hidden) - start
        return hidden[keep]

    def _checked_units(self, chosen, image: VisionImage) -> torch.Tensor:
        name = self.method.name
        if not isinstance(chosen, torch.Tensor) or chosen.dtype.is_floating_point or chosen.dtype == torch.bool \
                or chosen.dim() != 2 or chosen.shape[0] != 1:
            raise RuntimeError(f"{name}: vision_step() must return a [1, k] integer tensor of merge-unit indices on "
                               f"a Qwen-VL tower, got {chosen!r:.80}")
        chosen = chosen.long()
        k, n = chosen.shape[1], image.n_units
        if k * image.unit < image.target or k > n:
            raise RuntimeError(f"{name}: vision_step() kept {k} merge units; it must keep between the target "
                               f"{image.target // image.unit} and the {n} present")
        if k and (int(chosen.min()) < 0 or int(chosen.max()) >= n or len(chosen[0].unique()) != k):
            raise RuntimeError(f"{name}: vision_step() returned invalid merge-unit indices (distinct indices in "
                               f"[0, {n}) expected)")
        return chosen

    def _qwen_merged_full_length(self, module, args, output):
        """A merger's output (one row per kept unit) at full length, pruned units zero."""
        stage = self._qwen_stage()
        if stage is None or not stage.pruned or not isinstance(output, torch.Tensor) \
                or output.shape[0] != len(stage.rows) // stage.unit:
            return None
        units = stage.rows.view(-1, stage.unit)[:, 0].to(output.device) // stage.unit
        full = output.new_zeros(stage.full // stage.unit, *output.shape[1:])
        full[units] = output
        return full

    def _qwen_full_length(self, module, args):
        """Per-row hidden states (the tower's last hidden state) at full length, pruned rows zero."""
        stage = self._qwen_stage()
        if stage is None or not stage.pruned:
            return None
        hidden = args[0]
        full = hidden.new_zeros(stage.full, *hidden.shape[1:])
        full[stage.rows.to(hidden.device)] = hidden
        return (full,) + tuple(args[1:])

    def _qwen_tower_output(self, module, args, output):
        stage = self._qwen_stage()
        if stage is None:
            return None
        for image in stage.images:
            if 0 < image.target < image.n_patches:
                raise RuntimeError(f"{self.method.name}: the vision stage ended with {image.n_units} merge units "
                                   f"of an image, not its target {image.target // image.unit}")
        hidden = getattr(output, "last_hidden_state", None)
        if stage.pruned and isinstance(hidden, torch.Tensor) and hidden.shape[0] == len(stage.rows):
            output.last_hidden_state = self._qwen_full_length(None, (hidden,))[0]
        return output
