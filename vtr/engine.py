"""The engine: the one place that knows about sequence layouts, masks, positions and the KV cache.

For every prefill it finds the visual tokens (through the model-family patch), asks the method which to keep, and
rewrites what the language model sees so that the rest of the forward pass, and every later decoding step, runs on
the pruned sequence exactly as if the pruned tokens had never been there.

Mechanics (all through forward pre-hooks; no transformers forward function is replaced):

* ``pre_llm`` stage: a pre-hook on the language model replaces ``inputs_embeds``, the 2-D attention mask and the
  positions with the pruned, left-padded sequence. The language model then builds its own masks and caches.
* ``layer`` stage at layer K: a pre-hook on layer K gathers the hidden states; every layer >= K gets the pruned
  sequence's mask (rebuilt by transformers' own mask function for that cache layer), rotary embeddings and
  positions. Layers < K keep the full sequence and the full KV cache.
* Decoding: the 2-D mask of the pruned layers is the pruned prompt mask followed by the new tokens' columns;
  positions follow the method's policy (``original``: unchanged; ``compact``: minus the tokens removed).

Rows with different numbers of kept tokens are re-padded on the left with masked slots. Per-request state is keyed
by the request's cache object and per-forward state is thread-local, so concurrent requests do not interfere.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from . import compat, kernels
from .layout import TokenLayout
from .methods.base import Method, Stage, StageSpec
from .patches import Family
from .report import PrefillRecord, StageRecord
from .selection import SelectionContext


@dataclass
class SeqLayout:
    """A batch-rectangular sequence the decoder runs on, relative to the original prompt.

    index: ``[B, L]`` original prompt position of each slot (-1: padding slot added by vtr).
    local: ``[B, L]`` slot in the language model's input sequence (-1: added padding).
    mask2d: ``[B, L]`` bool, True for real tokens.
    positions: ``[B, L]`` (or M-RoPE ``[R, B, L]``) positions of the slots.
    shift: ``[B]`` visual tokens removed so far (decoding positions move back by this under ``compact``).
    """

    index: torch.Tensor
    local: torch.Tensor
    mask2d: torch.Tensor
    positions: torch.Tensor
    shift: torch.Tensor
    layer: int = 0
    stage: Stage | None = None

    @property
    def length(self) -> int:
        return self.index.shape[1]


@dataclass
class RequestState:
    """Lives as long as the request's KV cache: how its prompt was pruned."""

    prompt_length: int
    base: SeqLayout
    layouts: list[SeqLayout] = field(default_factory=list)  # one per stage that removed tokens, in order
    record: PrefillRecord | None = None

    @property
    def lm_input_length(self) -> int:
        first = self.layouts[0] if self.layouts else None
        return first.length if first is not None and first.stage is Stage.PRE_LLM else self.prompt_length

    def active(self, layer: int) -> SeqLayout | None:
        """The layer-stage layout decoder layer ``layer`` runs on, if any."""
        found = None
        for layout in self.layouts:
            if layout.stage is Stage.LAYER and layout.layer <= layer:
                found = layout
        return found

    def final(self) -> SeqLayout:
        return self.layouts[-1] if self.layouts else self.base


@dataclass
class ForwardState:
    """One forward call (a prefill or a decoding step) in one thread."""

    depth: int = 0
    prefill: bool = False
    inputs: dict | None = None  # the base model's inputs of a prefill with visual inputs
    layout: TokenLayout | None = None
    current: SeqLayout | None = None  # the layer-stage layout of the decoder layer running now
    request: RequestState | None = None
    cache: object = None
    labels: torch.Tensor | None = None
    loss_kwargs: dict = field(default_factory=dict)
    decode_tail: torch.Tensor | None = None
    captures: dict = field(default_factory=dict)  # layer -> (attention module, normed hidden, cos, sin)
    memo: dict = field(default_factory=dict)  # per-forward masks and rotary embeddings of pruned layouts


class Engine:
    """Installs the hooks for one (model, method) pair and performs the surgery. Created by ``vtr.patch``."""

    def __init__(self, model: torch.nn.Module, method: Method, family: Family):
        self.model, self.method, self.family = model, method, family
        self.lm = compat.text_model(model)
        self.specs = method.stages()
        self.last: PrefillRecord | None = None
        self._requests: "weakref.WeakKeyDictionary[object, RequestState]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles = []

    # ------------------------------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        try:
            reg = self._handles.append
            reg(self.model.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
            reg(self.model.register_forward_hook(self._outer_post, with_kwargs=True, always_call=True))
            base = compat.base_model(self.model)
            reg(base.register_forward_pre_hook(self._base_pre, with_kwargs=True))
            reg(base.register_forward_hook(self._base_post, with_kwargs=True, always_call=True))
            reg(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            layers = compat.decoder_layers(self.lm)
            layer_stages = [s.layer for s in self.specs if s.stage is Stage.LAYER]
            if layer_stages:
                for i in range(min(layer_stages), len(layers)):
                    reg(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            if "attention_inputs" in self.method.needs:
                for k in layer_stages:
                    attn = compat.self_attention(layers[k - 1])
                    reg(attn.register_forward_pre_hook(self._capture_hook(k - 1), with_kwargs=True))
            if self.family.deepstack and layer_stages:
                compat.wrap_deepstack(self.lm, self._deepstack)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        compat.unwrap_deepstack(self.lm)

    # ------------------------------------------------------------------------------------ forward context
    def _state(self) -> ForwardState | None:
        return getattr(self._local, "state", None)

    def _enter(self) -> ForwardState:
        fwd = self._state()
        if fwd is None:
            fwd = ForwardState()
            self._local.state = fwd
        fwd.depth += 1
        return fwd

    def _exit(self) -> None:
        fwd = self._state()
        if fwd is not None:
            fwd.depth -= 1
            if fwd.depth <= 0:
                self._local.state = None

    def _outer_pre(self, module, args, kwargs):
        fwd = self._enter()
        if fwd.depth == 1 and kwargs.get("labels") is not None and self.family.has_visual_inputs(kwargs):
            # The loss must be taken over the pruned sequence: it is computed after the forward (see _outer_post).
            kwargs = dict(kwargs)
            fwd.labels = kwargs.pop("labels")
            fwd.loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        return args, kwargs

    def _outer_post(self, module, args, kwargs, output):
        fwd = self._state()
        try:
            if fwd is not None and fwd.depth == 1 and fwd.labels is not None and output is not None:
                labels = fwd.labels
                if fwd.request is not None and fwd.request.layouts:
                    labels = kernels.gather_rows(labels.unsqueeze(-1), fwd.request.final().index, -100).squeeze(-1)
                logits = output["logits"] if isinstance(output, dict) else output[0]
                loss = compat.loss(self.model, logits, labels.to(logits.device), fwd.loss_kwargs)
                if isinstance(output, dict):
                    output = type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
                else:
                    output = (loss,) + tuple(output)
        finally:
            self._exit()
        return output

    def _base_pre(self, module, args, kwargs):
        fwd = self._enter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        q_len = (ids if ids is not None else embeds).shape[1]
        past = compat.cache_length(cache)
        visual = self.family.has_visual_inputs(kwargs)
        with self._lock:
            request = self._requests.get(cache) if cache is not None else None
        if past == 0:
            fwd.prefill = True
            if cache is not None:
                with self._lock:
                    self._requests.pop(cache, None)
            if not visual:
                placeholders = self.family.placeholder_ids(self.model.config)
                if ids is not None and bool(torch.isin(ids, torch.tensor(placeholders, device=ids.device)).any()):
                    raise ValueError("vtr: the prompt holds visual placeholder tokens but no visual inputs reached "
                                     "the model (chunked prefill, or pixel_values not passed); vtr needs every "
                                     "visual token of a prompt in one prefill")
                batch = (ids if ids is not None else embeds).shape[0]
                with self._lock:
                    self.last = PrefillRecord(n_visual=[0] * batch)
                return None
            if ids is None:
                raise ValueError("vtr needs input_ids to find the visual tokens; this call passed inputs_embeds")
            if cache is not None and not compat.is_dynamic_cache(cache):
                raise ValueError(f"vtr supports DynamicCache only, got {type(cache).__name__} (e.g. "
                                 "cache_implementation='static' is not supported)")
            mask = kwargs.get("attention_mask")
            if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                raise ValueError("vtr needs a 2-D attention mask (or none); got a custom 4-D mask or mask mapping")
            fwd.inputs = dict(kwargs, input_ids=ids)
            return None
        # Decoding, or a continuation of an existing cache.
        if visual:
            raise ValueError("vtr cannot add visual inputs to a non-empty cache (multi-turn with new images, "
                             "chunked prefill); start a new cache for each prompt with images")
        if request is None:
            return None  # a cache vtr did not prune: pass through
        if q_len > 1:
            raise ValueError(f"vtr cannot continue a pruned KV cache with {q_len} new tokens at once (chunked "
                             "prefill, multi-turn continuation or assisted decoding); decode one token per step")
        fwd.request, fwd.cache = request, cache
        if self.specs[0].stage is Stage.PRE_LLM and kwargs.get("position_ids") is None:
            # The model would number new tokens from the (pruned) cache length; give it the logical one.
            logical_past = request.prompt_length + past - request.lm_input_length
            batch = (ids if ids is not None else embeds).shape[0]
            positions = self.family.decode_positions(self.model, batch, q_len, logical_past, kwargs,
                                                     (ids if ids is not None else embeds).device)
            if positions is not None:
                kwargs = dict(kwargs, position_ids=positions)
                return args, kwargs
        return None

    def _base_post(self, module, args, kwargs, output):
        fwd = self._state()
        if fwd is not None and output is not None and fwd.request is not None and fwd.prefill:
            record = fwd.request.record
            record.index = fwd.request.final().index if fwd.request.layouts else None
            with self._lock:
                self.last = record
        self._exit()
        return None

    # ------------------------------------------------------------------------------------ language model
    def _lm_pre(self, module, args, kwargs):
        fwd = self._state()
        if fwd is None:
            return None
        if fwd.prefill and fwd.inputs is not None and fwd.request is None:
            return args, self._lm_prefill(fwd, kwargs)
        if not fwd.prefill and fwd.request is not None:
            return args, self._lm_decode(fwd, kwargs)
        return None

    def _lm_prefill(self, fwd: ForwardState, kwargs) -> dict:
        kwargs = dict(kwargs)
        hidden = kwargs["inputs_embeds"]
        B, L, _ = hidden.shape
        device = hidden.device
        cache = kwargs.get("past_key_values")
        if cache is None and compat.use_cache(self.lm, kwargs):
            cache = compat.new_cache(self.lm)
            kwargs["past_key_values"] = cache
        mask_in = kwargs.get("attention_mask")
        valid = mask_in.bool() if mask_in is not None else torch.ones(B, L, dtype=torch.bool, device=device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(L, device=device).expand(B, L)
        elif positions.shape[-2] != B:
            positions = positions.expand(*positions.shape[:-2], B, L)
        fwd.layout = self.family.layout(self.model, fwd.inputs, hidden, positions)
        arange = torch.arange(L, device=device).expand(B, L)
        base = SeqLayout(index=arange, local=arange, mask2d=valid, positions=positions,
                         shift=torch.zeros(B, dtype=torch.long, device=device))
        request = RequestState(prompt_length=L, base=base,
                               record=PrefillRecord(n_visual=fwd.layout.n_visual, layout=fwd.layout))
        fwd.request, fwd.cache = request, cache
        if cache is not None:
            with self._lock:
                self._requests[cache] = request
        spec = self.specs[0]
        if spec.stage is Stage.PRE_LLM:
            pruned = self._prune(fwd, spec, base, hidden)
            if pruned is not None:
                layout, select = pruned
                kwargs["inputs_embeds"] = kernels.gather_rows(hidden, select)
                kwargs["attention_mask"] = layout.mask2d.to(mask_in.dtype if mask_in is not None else torch.long)
                kwargs["position_ids"] = layout.positions
                if kwargs.get("visual_pos_masks") is not None:
                    masks, embeds = deepstack_inputs(kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"],
                                                     select)
                    kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = masks, embeds
        return kwargs

    def _lm_decode(self, fwd: ForwardState, kwargs) -> dict:
        request = fwd.request
        mask_in = kwargs.get("attention_mask")
        if mask_in is not None and not (isinstance(mask_in, torch.Tensor) and mask_in.dim() == 2):
            raise ValueError("vtr needs a 2-D attention mask (or none) when decoding a pruned cache")
        hidden = kwargs.get("inputs_embeds")
        q_len = hidden.shape[1] if hidden is not None else kwargs["input_ids"].shape[1]
        # Mask columns of the tokens after the prompt (generated so far plus this step): [B, t + q_len]. Taken
        # before any layer runs, since layer 0's cache grows during this forward.
        if mask_in is not None:
            fwd.decode_tail = mask_in[:, request.prompt_length:].bool()
        else:
            generated = compat.cache_length(fwd.cache) - request.lm_input_length
            B = request.base.index.shape[0]
            fwd.decode_tail = torch.ones(B, generated + q_len, dtype=torch.bool, device=request.base.index.device)
        first = request.layouts[0] if request.layouts else None
        if first is None or first.stage is not Stage.PRE_LLM:
            return kwargs
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([first.mask2d, fwd.decode_tail], 1).to(
            mask_in.dtype if mask_in is not None else torch.long)
        if self.method.positions == "compact" and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = shift_positions(kwargs["position_ids"], first.shift)
        return kwargs

    # ------------------------------------------------------------------------------------- decoder layers
    def _capture_hook(self, layer: int):
        def hook(module, args, kwargs):
            fwd = self._state()
            if fwd is not None and fwd.prefill and fwd.request is not None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                cos, sin = kwargs["position_embeddings"]
                fwd.captures[layer] = (module, hidden, cos, sin)
            return None
        return hook

    def _layer_hook(self, i: int):
        stage_at = {spec.layer: spec for spec in self.specs if spec.stage is Stage.LAYER}

        def hook(module, args, kwargs):
            fwd = self._state()
            if fwd is None or fwd.request is None:
                return None
            request = fwd.request
            hidden = args[0] if args else kwargs["hidden_states"]
            if fwd.prefill and i in stage_at:
                prev = request.final()
                pruned = self._prune(fwd, stage_at[i], prev, hidden)
                if pruned is not None:
                    hidden = kernels.gather_rows(hidden, pruned[1])
            active = request.active(i)
            fwd.current = active
            if active is None:
                return None
            kwargs = dict(kwargs)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            self._substitute(fwd, i, active, hidden, kwargs)
            return args, kwargs
        return hook

    def _substitute(self, fwd: ForwardState, i: int, active: SeqLayout, hidden: torch.Tensor, kwargs: dict):
        """Give layer ``i`` the mask, rotary embeddings and positions of the pruned sequence it runs on."""
        key = id(active)
        compact = self.method.positions == "compact"
        if fwd.prefill:
            if (key, "mask") not in fwd.memo:
                fwd.memo[key, "mask"] = compat.causal_mask(self.lm, active.layer, hidden, active.mask2d, fwd.cache)
            if (key, "rope") not in fwd.memo:
                if compact:
                    rope = compat.rotary_embeddings(self.lm, hidden, active.positions)
                else:
                    rope = tuple(kernels.gather_rows(t, active.local) for t in kwargs["position_embeddings"])
                fwd.memo[key, "rope"] = rope
            positions = kwargs.get("position_ids")
            if isinstance(positions, torch.Tensor) and positions.shape[-1] == fwd.request.lm_input_length:
                if (key, "pos") not in fwd.memo:
                    fwd.memo[key, "pos"] = (active.positions if compact
                                            else kernels.gather_positions(positions, active.local))
                kwargs["position_ids"] = fwd.memo[key, "pos"]
        else:
            if (key, "mask") not in fwd.memo:
                mask2d = torch.cat([active.mask2d, fwd.decode_tail], 1)
                fwd.memo[key, "mask"] = compat.causal_mask(self.lm, active.layer, hidden, mask2d, fwd.cache)
            if compact:
                if (key, "rope") not in fwd.memo:
                    positions = kwargs.get("position_ids")
                    if positions is None:
                        raise ValueError("vtr: compact positions need position_ids when decoding")
                    positions = shift_positions(positions.expand(hidden.shape[0], -1), active.shift)
                    fwd.memo[key, "pos"] = positions
                    fwd.memo[key, "rope"] = compat.rotary_embeddings(self.lm, hidden, positions)
                kwargs["position_ids"] = fwd.memo[key, "pos"]
        kwargs["attention_mask"] = fwd.memo[key, "mask"]
        if (key, "rope") in fwd.memo:
            kwargs["position_embeddings"] = fwd.memo[key, "rope"]

    # ------------------------------------------------------------------------------------------- selection
    def _prune(self, fwd: ForwardState, spec: StageSpec, prev: SeqLayout, hidden: torch.Tensor):
        """Select at one stage. Returns (new layout, [B, L'] slots of ``prev`` to gather), or None if the stage
        removes nothing (then the model runs untouched, bit for bit)."""
        start = _clock(hidden)
        ctx = SelectionContext(self, fwd, prev, hidden, spec)
        keep = prev.mask2d.clone()
        kept_ids, n_alive, dropped_any = [], [], False
        for b, row in enumerate(fwd.layout.rows):
            ids, alive = [], 0
            for span in row.spans:
                present = ctx.present(b, span)
                alive += len(present)
                eligible = ctx.eligible(present)
                ids.append(span.offset + present.ids[~eligible].cpu())  # tokens the method may not drop
                for group in ctx.groups(present.subset(eligible)):
                    budget = self.method.budget(len(group))
                    if budget >= len(group):
                        chosen = torch.arange(len(group), device=group.slots.device)
                    else:
                        chosen = self._checked(self.method.select(ctx, b, group, budget), len(group))
                        dropped = torch.ones(len(group), dtype=torch.bool, device=group.slots.device)
                        dropped[chosen] = False
                        keep[b, group.slots[dropped]] = False
                        dropped_any = dropped_any or bool(dropped.any())
                    ids.append(span.offset + group.ids[chosen].cpu())
            kept_ids.append(torch.cat(ids).sort().values if ids else torch.zeros(0, dtype=torch.long))
            n_alive.append(alive)
        record = fwd.request.record
        stage = StageRecord(stage=spec.stage.value, layer=spec.layer, n_visual=n_alive, kept=kept_ids,
                            length=prev.length)
        record.stages.append(stage)
        try:
            if not dropped_any:
                return None
            select = kernels.compaction_index(keep)
            stage.length = select.shape[1]
            removed = prev.mask2d & ~keep
            positions = kernels.gather_positions(prev.positions, select)
            if self.method.positions == "compact":
                before = removed.long().cumsum(1) - removed.long()
                positions = positions - kernels.gather_rows(before.unsqueeze(-1), select).squeeze(-1)
            if spec.stage is Stage.PRE_LLM:  # the pruned sequence becomes the language model's input
                local = torch.arange(select.shape[1], device=select.device).expand(select.shape[0], -1)
            else:
                local = kernels.gather_rows(prev.local.unsqueeze(-1), select, -1).squeeze(-1)
            layout = SeqLayout(
                index=kernels.gather_rows(prev.index.unsqueeze(-1), select, -1).squeeze(-1),
                local=local,
                mask2d=kernels.gather_rows(prev.mask2d.unsqueeze(-1), select, False).squeeze(-1),
                positions=positions, shift=prev.shift + removed.sum(1), layer=spec.layer, stage=spec.stage)
            fwd.request.layouts.append(layout)
            return layout, select
        finally:
            record.selection_seconds += _clock(hidden) - start

    def _deepstack(self, original, hidden, masks, embeds):
        """Qwen3-VL adds visual features after its first decoder layers; on a pruned layer the mask and features
        are cut down to the kept visual tokens."""
        fwd = self._state()
        active = fwd.current if fwd is not None else None
        if masks is None or active is None or masks.shape[1] == hidden.shape[1]:
            return original(hidden, masks, embeds)
        masks, (embeds,) = deepstack_inputs(masks, [embeds], active.local)
        return original(hidden, masks, embeds)

    def _checked(self, chosen: torch.Tensor, n: int) -> torch.Tensor:
        chosen = torch.as_tensor(chosen).flatten().long()
        if len(chosen) and (int(chosen.min()) < 0 or int(chosen.max()) >= n or len(chosen.unique()) != len(chosen)):
            raise RuntimeError(f"{self.method.name} selected invalid token indices {chosen.tolist()} (of {n})")
        return chosen


def deepstack_inputs(masks: torch.Tensor, embeds: list, select: torch.Tensor):
    """Cut DeepStack inputs to a pruned sequence. masks: ``[B, L]`` visual positions; embeds: per layer
    ``[n_visual, D]`` features in (row, position) order; select: ``[B, L']`` slots kept (-1 for padding)."""
    rank = masks.flatten().long().cumsum(0).view_as(masks) - 1
    kept = kernels.gather_rows(masks.unsqueeze(-1), select, False).squeeze(-1)
    rows = kernels.gather_rows(rank.unsqueeze(-1), select, 0).squeeze(-1)[kept]
    return kept, [e[rows.to(e.device)] for e in embeds]


def shift_positions(positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Subtract a per-row shift ``[B]`` from positions ``[B, q]`` or ``[R, B, q]``."""
    return positions - shift.view(-1, 1).to(positions.device)


def _clock(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
