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
* Decoding and continuations (any number of new tokens on a pruned cache): the 2-D mask of the pruned layers is
  the pruned prompt mask followed by the new tokens' columns; positions follow the method's policy (``original``:
  the unpruned numbering; ``compact``: minus the tokens removed).

Rows with different numbers of kept tokens are re-padded on the left with masked slots. Per-request state is keyed
by the request's cache object and per-forward state by thread, so concurrent requests do not interfere.
``model.generate`` is shadowed on the instance while patched, to know which requests are in flight (``remove()``
waits for them) and to clean up after a ``KeyboardInterrupt``, which skips torch's always-call hooks.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from . import compat, kernels
from .layout import TokenLayout
from .methods.base import Merge, Method, Stage, StageSpec
from .patches import Family
from .report import AddedToken, MergedTokens, PrefillRecord, StageRecord
from .selection import SelectionContext


@dataclass
class SeqLayout:
    """A batch-rectangular sequence the decoder runs on, relative to the original prompt.

    index: ``[B, L]`` original prompt position of each slot (-1: padding slot added by vtr; ``prompt_length + a``:
    the row's ``a``-th token added by a merging stage, see ``RequestState.added``).
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
    added: list[list[AddedToken]] = field(default_factory=list)  # per row: tokens merging stages added, in order

    def original_position(self, row: int, index: int) -> int:
        """The prompt position a slot of index ``index`` stands for (an added token: its anchor's)."""
        return index if index < self.prompt_length else self.added[row][index - self.prompt_length].position

    def public_index(self, index: torch.Tensor) -> torch.Tensor:
        """A layout's index as ``handle.last`` reports it: added token ``a`` of a row as ``-2 - a``."""
        return torch.where(index >= self.prompt_length, self.prompt_length - 2 - index, index)

    def continuation_positions(self, q_len: int, logical_past: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Original positions of ``q_len`` new tokens after ``logical_past`` tokens of the unpruned sequence: each
        row continues from its prompt's last real token (+1 per M-RoPE axis, as generate() steps positions),
        counting the real tokens after the prompt (from the 2-D mask of the whole sequence when given). ``[B, q]``,
        or ``[3, B, q]`` on M-RoPE models."""
        positions, valid = self.base.positions, self.base.mask2d
        rope = positions[-3:] if positions.dim() == 3 else positions[None]
        last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)
        start = rope[:, torch.arange(len(last), device=rope.device), last.to(rope.device)] + 1  # [R, B]
        if mask is not None:
            offsets = (mask[:, self.prompt_length:].long().cumsum(1) - 1)[:, -q_len:].clamp(min=0)
        else:
            offsets = (logical_past - self.prompt_length + torch.arange(q_len)).expand(start.shape[1], q_len)
        new = start[..., None] + offsets.to(start.device)
        return new if positions.dim() == 3 else new[0]

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
class VisionCall:
    """One ``get_image_features`` call: its anyres image sizes (LLaVA-NeXT) or image grids (Qwen-VL) and, per
    captured vision layer, [attention module, attention input, layer output] (``[n_crops, N, D_v]`` each; Qwen-VL:
    ``[S, D_v]`` patches in the tower's order) and the attention call's other arguments (``extras``)."""

    image_sizes: list | None
    grid_thw: torch.Tensor | None = None
    layers: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


@dataclass
class ForwardState:
    """One forward call (a prefill or a decoding step) in one thread."""

    depth: int = 0
    base_running: bool = False  # the base model's forward of this call has started
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
    vision: "VisionCall | None" = None  # the vision-tower signals of this prefill's images
    lm_embeds: torch.Tensor | None = None  # [B, L, D] the language model's input embeddings of the prefill
    memo: dict = field(default_factory=dict)  # per-forward masks and rotary embeddings of pruned layouts


class Engine:
    """Installs the hooks for one (model, method) pair and performs the surgery. Created by ``vtr.patch``."""

    def __init__(self, model: torch.nn.Module, method: Method, family: Family):
        self.model, self.method, self.family = model, method, family
        self.lm = compat.text_model(model)
        self.specs = method.stages()
        self.vision_feature_layer = compat.vision_feature_layer(model) if "vision" in method.needs else None
        self.clip = self.clip_tokenizer = self.tokenizer = None
        if "clip_text" in method.needs:  # loaded once, at patch time, so that a missing checkpoint fails there
            self.clip, self.clip_tokenizer = compat.load_clip(method.clip)
            self.clip = self.clip.to(next(model.parameters()).device)
            self.tokenizer = compat.load_tokenizer(method.tokenizer or compat.checkpoint_name(model))
        self.last: PrefillRecord | None = None
        self._requests: "weakref.WeakKeyDictionary[object, RequestState]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a request in flight ends
        self._states: dict[int, ForwardState] = {}  # thread id -> the forward call running in that thread
        self._generating: collections.Counter = collections.Counter()  # thread id -> nested generate calls
        self._resumed: dict[int, tuple] = {}  # thread id -> (cache, input length) of a generate resuming a cache
        # thread id -> the last image encoding's vision signals; generate() encodes images before its prefills
        self._vision: dict[int, VisionCall] = {}
        self._closing = False
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
            if "vision" in self.method.needs:
                self._attach_vision(reg)
            if self.family.deepstack and layer_stages:
                compat.shadow_method(self.lm, "_deepstack_process", self._deepstack)
            compat.shadow_method(self.model, "generate", self._generate)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        compat.unshadow_method(self.lm, "_deepstack_process")
        compat.unshadow_method(self.model, "generate")
        compat.unshadow_method(compat.base_model(self.model), compat.IMAGE_FEATURES)
        self._vision.clear()

    def close(self) -> None:
        """Detach once the requests in flight in other threads have finished; requests that start meanwhile run
        unpatched. Raises if called from inside a ``generate`` this engine is pruning (a streamer callback), where
        waiting would never end and detaching would corrupt the rest of that request."""
        me = threading.get_ident()
        with self._idle:
            if self._generating[me]:
                raise RuntimeError("vtr: cannot remove the patch from inside a generate() call it is pruning (for "
                                   "example from a streamer callback): the rest of that request needs the patch; "
                                   "remove it after generate() returns")
            self._states.pop(me, None)  # this thread is not inside a forward: its own state is stale
            self._closing = True
            self._idle.wait_for(lambda: not self._states and not +self._generating)
            self.detach()

    def __reduce_ex__(self, protocol):
        # Hooks and shadowed methods of a patched model point here; copying them would share one engine (and its
        # per-request state) between two models.
        raise TypeError("vtr: a patched model cannot be copied or pickled (copy.deepcopy, pickle, torch.save); "
                        "call handle.remove() (or vtr.unpatch(model)) first, then patch the copy. "
                        "model.save_pretrained() works on a patched model and saves the unchanged weights.")

    def _generate(self, original, *args, **kwargs):
        """``model.generate`` while patched: marks the request in flight (so ``remove()`` waits for it), clears this
        thread's forward state however generate exits (Ctrl-C included), and refuses right-padded image batches."""
        me = threading.get_ident()
        if self._closing and not self._generating[me]:
            return original(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and self.family.has_visual_inputs(kwargs) \
                and bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
            raise ValueError("vtr: generate() got a right-padded batch (a padding slot after a real token). A "
                             "decoder-only model generates after the last slot, which is padding for the shorter "
                             "rows (transformers warns and answers them wrongly); pad on the left "
                             "(processor.tokenizer.padding_side = 'left'). A plain forward accepts right padding.")
        config = kwargs.get("generation_config") or self.model.generation_config
        if self.method.needs_whole_prompt and self.family.has_visual_inputs(kwargs) and \
                (kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)):
            raise ValueError(f"vtr: {self.method.name} selects visual tokens with the prompt's text (its last "
                             "token, the text after the image), which the first prefill chunk does not hold; "
                             "generate without prefill_chunk_size")
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        with self._idle:
            self._generating[me] += 1
            if isinstance(ids, torch.Tensor) and cache is not None:
                self._resumed[me] = (cache, ids.shape[-1])
        try:
            return original(*args, **kwargs)
        finally:
            with self._idle:
                self._generating[me] -= 1
                if not self._generating[me]:
                    del self._generating[me]
                    self._states.pop(me, None)  # a forward interrupted by a BaseException never ran its exit
                    self._resumed.pop(me, None)
                    self._vision.pop(me, None)
                self._idle.notify_all()

    # ------------------------------------------------------------------------------------ forward context
    def _state(self) -> ForwardState | None:
        return self._states.get(threading.get_ident())

    def _enter(self, base: bool) -> ForwardState | None:
        """Start (or join) this thread's forward call. A state left by a call whose exit never ran (torch skips
        always-call hooks on ``KeyboardInterrupt``) is recognised and replaced: the top-level forward never nests in
        itself, nor does the base model's. Returns None while closing for calls that started after ``remove()``."""
        me = threading.get_ident()
        fwd = self._states.get(me)
        if fwd is not None and (not base or fwd.base_running):
            fwd = None  # stale
        if fwd is None:
            if self._closing and not self._generating[me]:
                with self._idle:
                    self._states.pop(me, None)
                    self._idle.notify_all()
                return None
            fwd = ForwardState()
            with self._idle:
                self._states[me] = fwd
        fwd.depth += 1
        fwd.base_running = fwd.base_running or base
        return fwd

    def _exit(self) -> None:
        me = threading.get_ident()
        fwd = self._states.get(me)
        if fwd is not None:
            fwd.depth -= 1
            if fwd.depth <= 0:
                with self._idle:
                    self._states.pop(me, None)
                    if not self._generating[me]:
                        self._vision.pop(me, None)
                    self._idle.notify_all()

    def _outer_pre(self, module, args, kwargs):
        fwd = self._enter(base=False)
        if fwd is not None and kwargs.get("labels") is not None and self.family.has_visual_inputs(kwargs):
            # The loss must be taken over the pruned sequence: it is computed after the forward (see _outer_post).
            kwargs = dict(kwargs)
            fwd.labels = kwargs.pop("labels")
            fwd.loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        return args, kwargs

    def _outer_post(self, module, args, kwargs, output):
        fwd = self._state()
        if fwd is None:
            return output
        try:
            if fwd.depth == 1 and fwd.labels is not None and output is not None:
                labels = fwd.labels
                if fwd.request is not None and fwd.request.layouts:
                    index = fwd.request.final().index
                    index = torch.where(index >= fwd.request.prompt_length, -1, index)  # added tokens: no label
                    labels = kernels.gather_rows(labels.unsqueeze(-1), index, -100).squeeze(-1)
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
        fwd = self._enter(base=True)
        if fwd is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        past = compat.cache_length(cache)
        visual = self.family.has_visual_inputs(kwargs)
        resumed = self._resumed.pop(threading.get_ident(), None)  # only a generate's first forward may use it
        if past == 0:
            return self._prefill_inputs(fwd, ids, embeds, cache, visual, kwargs)
        with self._lock:
            request = self._requests.get(cache)
        if request is None:
            if visual:
                raise ValueError("vtr cannot add visual inputs to a non-empty cache (chunked prefill, or a later "
                                 "turn with new images): vtr prunes a request's visual tokens once, in its first "
                                 "prefill, and needs them all there; start a new cache with the whole prompt")
            return None  # a cache vtr did not prune: pass through
        total = resumed[1] if resumed is not None and resumed[0] is cache else None
        return self._continuation_inputs(fwd, request, cache, ids, embeds, visual, args, kwargs, total)

    def _prefill_inputs(self, fwd: ForwardState, ids, embeds, cache, visual: bool, kwargs):
        fwd.prefill = True
        if cache is not None:
            with self._lock:
                self._requests.pop(cache, None)
        if not visual:
            if ids is not None and self._holds_placeholders(ids):
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

    def _continuation_inputs(self, fwd: ForwardState, request: RequestState, cache, ids, embeds, visual: bool, args,
                             kwargs, total: int | None):
        """New tokens on a cache vtr pruned: decoding steps, a later turn's text, text prefilled in chunks.
        ``total``: the length of the input_ids a ``generate`` call resuming this cache was given."""
        past = compat.cache_length(cache)
        logical_past = request.prompt_length + past - request.lm_input_length  # what the unpruned cache would hold
        q_len = (ids if ids is not None else embeds).shape[1]
        kwargs = dict(kwargs)
        if total is not None and past < logical_past and q_len == total - past:
            # generate() passes the tokens its input_ids hold beyond the cache's layer-0 length, which pre-LLM
            # pruning shortened: the first of them are already in the cache.
            new = total - logical_past
            if new <= 0:
                raise ValueError(f"vtr: generate() was given {total} input_ids on a cache that already holds "
                                 f"{logical_past} tokens of them: nothing new to process")
            for key, dim in (("input_ids", -1), ("inputs_embeds", 1), ("position_ids", -1),
                             ("mm_token_type_ids", -1), ("token_type_ids", -1)):
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.shape[dim] == q_len:
                    kwargs[key] = value.narrow(dim, q_len - new, new)
            if args:
                args = (args[0].narrow(-1, q_len - new, new),) + tuple(args[1:])
            ids, q_len = (args[0] if args else kwargs.get("input_ids")), new
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] != logical_past + q_len \
                and not visual:
            raise ValueError(f"vtr: the attention mask covers {mask.shape[1]} tokens, but the pruned cache stands "
                             f"for {logical_past} earlier tokens and this call adds {q_len}; pass the mask of the "
                             "whole unpruned sequence (earlier turns included)")
        if visual:
            if ids is not None and not self._holds_placeholders(ids):
                raise ValueError("vtr: this call re-sends visual inputs that are already in the KV cache (the new "
                                 "tokens hold no image or video placeholders); when continuing a cache, pass only "
                                 "the new text: drop pixel_values / pixel_values_videos from the inputs")
            raise ValueError("vtr cannot add new images or videos to a pruned KV cache (a later turn with new "
                             "visual inputs, chunked prefill, or the same prompt sent again): vtr prunes a "
                             "request's visual tokens once, in its first prefill, and needs them all there; start a "
                             "new cache with the whole conversation")
        fwd.request, fwd.cache = request, cache
        if self.specs[0].stage is Stage.PRE_LLM and request.layouts:
            # transformers numbers new tokens from the layer-0 cache length (or, in generate, from positions it
            # derived with it), which pre-LLM pruning shortened: number them from the unpruned sequence.
            mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            kwargs["position_ids"] = request.continuation_positions(q_len, logical_past, mask2d)
        return args, kwargs

    def _holds_placeholders(self, ids: torch.Tensor) -> bool:
        placeholders = torch.tensor(self.family.placeholder_ids(self.model.config), device=ids.device)
        return bool(torch.isin(ids, placeholders).any())

    def _base_post(self, module, args, kwargs, output):
        fwd = self._state()
        if fwd is None:
            return None
        if output is not None and fwd.request is not None and fwd.prefill:
            record = fwd.request.record
            record.index = fwd.request.public_index(fwd.request.final().index) if fwd.request.layouts else None
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
        fwd.lm_embeds = hidden
        fwd.vision = self._vision.get(threading.get_ident())
        arange = torch.arange(L, device=device).expand(B, L)
        base = SeqLayout(index=arange, local=arange, mask2d=valid, positions=positions,
                         shift=torch.zeros(B, dtype=torch.long, device=device))
        request = RequestState(prompt_length=L, base=base, added=[[] for _ in range(B)],
                               record=PrefillRecord(n_visual=fwd.layout.n_visual, layout=fwd.layout,
                                                    n_layers=len(compat.decoder_layers(self.lm))))
        fwd.request, fwd.cache = request, cache
        if cache is not None:
            with self._lock:
                self._requests[cache] = request
        spec = self.specs[0]
        if spec.stage is Stage.PRE_LLM:
            pruned = self._prune(fwd, spec, base, hidden)
            if pruned is not None:
                layout, select, merged, _ = pruned
                if merged:  # merged tokens take their slot with their new embedding
                    hidden = hidden.clone()
                    for b, slots, embeds in merged:
                        hidden[b, slots] = embeds.to(hidden.dtype)
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

    # --------------------------------------------------------------------------------------- vision tower
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
                    _, select, _, added = pruned
                    hidden = kernels.gather_rows(hidden if added is None else torch.cat([hidden, added], 1), select)
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
        """Select at one stage. Returns (new layout, ``[B, L']`` slots to gather, merged tokens as ``(row, [m] slots
        of prev, [m, D] embeddings)``, ``[B, A, D]`` states of added tokens or None), or None if the stage removes
        nothing (then the model runs untouched, bit for bit). Gather slots ``>= prev.length`` are added tokens:
        slot ``prev.length + j`` is the row's ``j``-th added state."""
        start = _clock(hidden)
        ctx = SelectionContext(self, fwd, prev, hidden, spec)
        request = fwd.request
        keep = prev.mask2d.clone()
        kept_ids, n_alive, dropped_any, merged, merged_record = [], [], False, [], []
        additions = [[] for _ in fwd.layout.rows]  # per row: (insert after this slot, AddedToken, anchor slot)
        for b, row in enumerate(fwd.layout.rows):
            ids, alive, row_merges = [], 0, []
            for span in row.spans:
                present = ctx.present(b, span)
                alive += len(present)
                eligible = ctx.eligible(present)
                ids.append(span.offset + present.ids[~eligible].cpu())  # tokens the method may not drop
                for group in ctx.groups(present.subset(eligible)):
                    budget = self._checked_budget(self.method.budget_for(ctx, b, group))
                    if budget >= len(group):
                        chosen = torch.arange(len(group), device=group.slots.device)
                    else:
                        chosen = self.method.select(ctx, b, group, budget)
                        if isinstance(chosen, Merge):
                            merge = self._checked_merge(chosen, spec, budget, len(group))
                            chosen = merge.keep
                            if len(merge.slots):
                                merged.append((b, group.slots[merge.slots], merge.embeds))
                                row_merges.append(MergedTokens(
                                    kept=span.offset + group.ids[merge.slots].cpu(), embeds=merge.embeds,
                                    sources=[span.offset + group.ids[s].cpu() for s in merge.sources]))
                            if merge.added is not None:
                                after = int(group.slots[merge.keep].max())
                                for state, sources, anchor in zip(merge.added, merge.added_sources,
                                                                  merge.added_anchors.tolist()):
                                    slot = int(group.slots[anchor])
                                    token = AddedToken(span=span.offset, sources=ctx.visual_ids(b, group, sources),
                                                       position=request.original_position(b, int(prev.index[b, slot])),
                                                       layer=spec.layer, state=state)
                                    additions[b].append((after, token, slot))
                        chosen = self._checked(chosen, budget, len(group))
                        dropped = torch.ones(len(group), dtype=torch.bool, device=group.slots.device)
                        dropped[chosen] = False
                        keep[b, group.slots[dropped]] = False
                        dropped_any = dropped_any or bool(dropped.any())
                    picked = group.ids[chosen].cpu()
                    ids.append(span.offset + picked[picked < span.n])  # the image's own tokens, not added ones
            kept_ids.append(torch.cat(ids).sort().values if ids else torch.zeros(0, dtype=torch.long))
            n_alive.append(alive)
            merged_record.append(MergedTokens.join(row_merges))
        record = request.record
        stage = StageRecord(stage=spec.stage.value, layer=spec.layer, n_visual=n_alive, kept=kept_ids,
                            length=prev.length, merged=merged_record if merged else None)
        record.stages.append(stage)
        try:
            if not dropped_any and not any(additions):
                stage.index = request.public_index(prev.index)
                stage.added = self._added_record(request, prev)
                return None
            removed = prev.mask2d & ~keep
            index, local, mask2d, positions, states = prev.index, prev.local, prev.mask2d, prev.positions, None
            if any(additions):
                select = insertion_index(keep, [[after for after, _, _ in adds] for adds in additions],
                                         prev.length)
                index, local, mask2d, positions, states = self._with_added(request, prev, additions, hidden)
            else:
                select = kernels.compaction_index(keep)
            stage.length = select.shape[1]
            new_mask = kernels.gather_rows(mask2d.unsqueeze(-1), select, False).squeeze(-1)
            new_positions = kernels.gather_positions(positions, select)
            if self.method.positions == "compact":
                if any(additions):  # renumbered: each row from its first real position, without gaps
                    first = new_positions[..., torch.arange(len(select)), new_mask.long().argmax(1)]
                    new_positions = torch.where(new_mask, first[..., None] + new_mask.long().cumsum(1) - 1, 1)
                else:
                    before = removed.long().cumsum(1) - removed.long()
                    new_positions = new_positions - kernels.gather_rows(before.unsqueeze(-1), select).squeeze(-1)
            if spec.stage is Stage.PRE_LLM:  # the pruned sequence becomes the language model's input
                new_local = torch.arange(select.shape[1], device=select.device).expand(select.shape[0], -1)
            else:
                new_local = kernels.gather_rows(local.unsqueeze(-1), select, -1).squeeze(-1)
            added = torch.tensor([len(a) for a in additions], device=removed.device)
            layout = SeqLayout(
                index=kernels.gather_rows(index.unsqueeze(-1), select, -1).squeeze(-1),
                local=new_local, mask2d=new_mask, positions=new_positions,
                shift=prev.shift + removed.sum(1) - added, layer=spec.layer, stage=spec.stage)
            request.layouts.append(layout)
            stage.index = request.public_index(layout.index)
            stage.added = self._added_record(request, layout)
            return layout, select, merged, states
        finally:
            record.selection_seconds += _clock(hidden) - start

    def _with_added(self, request: RequestState, prev: SeqLayout, additions: list, hidden: torch.Tensor):
        """``prev``'s index, local slots, mask and positions extended by the rows' added tokens (column
        ``prev.length + j``: the row's ``j``-th), and their states ``[B, A, D]``. Added tokens are registered with
        the request: the ``a``-th of a row has index ``prompt_length + a``."""
        B, A = len(additions), max(len(a) for a in additions)
        device = prev.index.device
        index = torch.full((B, A), -1, dtype=prev.index.dtype, device=device)
        anchors = torch.zeros(B, A, dtype=torch.long, device=device)
        valid = torch.zeros(B, A, dtype=torch.bool, device=device)
        states = hidden.new_zeros(B, A, hidden.shape[-1])
        for b, adds in enumerate(additions):
            for j, (_, token, slot) in enumerate(adds):
                index[b, j] = request.prompt_length + len(request.added[b])
                request.added[b].append(token)
                anchors[b, j], valid[b, j] = slot, True
                states[b, j] = token.state.to(hidden.dtype)
        local = torch.where(valid, kernels.gather_rows(prev.local.unsqueeze(-1), anchors).squeeze(-1), -1)
        positions = kernels.gather_positions(prev.positions, anchors)
        return (torch.cat([prev.index, index], 1), torch.cat([prev.local, local], 1),
                torch.cat([prev.mask2d, valid], 1), torch.cat([prev.positions, positions], -1), states)

    @staticmethod
    def _added_record(request: RequestState, layout: SeqLayout) -> list | None:
        """Per row, the added tokens present in ``layout``, in sequence order (None when the request has none)."""
        if not any(request.added):
            return None
        rows = []
        for b in range(layout.index.shape[0]):
            index = layout.index[b]
            numbers = (index[index >= request.prompt_length] - request.prompt_length).tolist()
            rows.append([request.added[b][a] for a in numbers])
        return rows

    def _deepstack(self, original, hidden, masks, embeds):
        """Qwen3-VL adds visual features after its first decoder layers; on a pruned layer the mask and features
        are cut down to the kept visual tokens."""
        fwd = self._state()
        active = fwd.current if fwd is not None else None
        if masks is None or active is None or masks.shape[1] == hidden.shape[1]:
            return original(hidden, masks, embeds)
        local = torch.where(active.index >= fwd.request.prompt_length, -1, active.local)  # added tokens: none
        masks, (embeds,) = deepstack_inputs(masks, [embeds], local)
        return original(hidden, masks, embeds)

    def _checked_budget(self, budget) -> int:
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget:
            raise RuntimeError(f"{self.method.name}: budget_for() must return a non-negative int, got {budget!r}")
        return budget

    def _checked_merge(self, merge: Merge, spec: StageSpec, budget: int, n: int) -> Merge:
        """A merge must replace distinct kept tokens with one embedding each (before the language model), or add
        tokens with one state, source list and anchor each (inside it)."""
        name = self.method.name
        if len(merge.slots) and spec.stage is not Stage.PRE_LLM:
            raise RuntimeError(f"{name}: replaced embeddings are only supported before the language model (pre_llm)")
        if merge.added is not None:
            if spec.stage is not Stage.LAYER:
                raise RuntimeError(f"{name}: added tokens are only supported inside the language model (layer "
                                   "stages)")
            D, a = self.lm.config.hidden_size, len(merge.added)
            anchors = merge.added_anchors
            if merge.added.shape != (a, D) or len(merge.added_sources) != a or anchors is None or \
                    anchors.shape != (a,) or anchors.dtype.is_floating_point or \
                    (a and (int(anchors.min()) < 0 or int(anchors.max()) >= n)):
                raise RuntimeError(f"{name}: {a} added tokens need [{a}, {D}] states, {a} source lists and {a} "
                                   f"anchor indices in [0, {n})")
        keep = self._checked(merge.keep, budget, n)
        if not len(merge.slots):
            return dataclasses.replace(merge, keep=keep)
        slots = self._checked(merge.slots, len(merge.slots.flatten()), n) if merge.slots.numel() else \
            merge.slots.flatten().long()
        if not bool(torch.isin(slots, keep).all()):
            raise RuntimeError(f"{name}: merged slots {slots.tolist()} must be kept tokens")
        D = self.lm.config.hidden_size
        if merge.embeds.shape != (len(slots), D) or len(merge.sources) != len(slots):
            raise RuntimeError(f"{name}: a merge of {len(slots)} tokens needs [{len(slots)}, {D}] embeddings and as "
                               f"many source lists, got {tuple(merge.embeds.shape)} and {len(merge.sources)}")
        return dataclasses.replace(merge, keep=keep, slots=slots)

    def _checked(self, chosen, budget: int, n: int) -> torch.Tensor:
        """A method's selection must be ``budget`` distinct integer indices in ``[0, n)``."""
        name = self.method.name
        if not isinstance(chosen, torch.Tensor) or chosen.dtype.is_floating_point or chosen.dtype.is_complex \
                or chosen.dtype == torch.bool:
            kind = chosen.dtype if isinstance(chosen, torch.Tensor) else type(chosen).__name__
            raise RuntimeError(f"{name}: select() must return an integer tensor of token indices, got {kind}")
        chosen = chosen.flatten().long()
        if len(chosen) != budget:
            raise RuntimeError(f"{name}: select() returned {len(chosen)} indices for a budget of {budget} (of {n} "
                               "tokens); the keep count must follow the method's budget_for()")
        if int(chosen.min()) < 0 or int(chosen.max()) >= n or len(chosen.unique()) != len(chosen):
            raise RuntimeError(f"{name} selected invalid token indices {chosen.tolist()} (of {n}): each must be "
                               "distinct and in [0, n)")
        return chosen


def insertion_index(keep: torch.Tensor, after: list, length: int) -> torch.Tensor:
    """Like ``compaction_index``, with new tokens inserted: ``after[b]`` lists, for the row's added tokens in
    order, the slot each follows (several after one slot keep their order). Added token ``j`` is slot
    ``length + j``. Returns ``[B, L']`` left-padded with -1."""
    rows = []
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero().flatten()
        n = len(after[b])
        follows = torch.tensor(after[b], dtype=torch.float64, device=keep.device)
        keys = torch.cat([kept.double(), follows + (torch.arange(n, device=keep.device) + 1) / (n + 2)])
        entries = torch.cat([kept, length + torch.arange(n, device=keep.device)])
        rows.append(entries[torch.argsort(keys, stable=True)])
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r.new_full((width - len(r),), -1), r]) for r in rows])


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
