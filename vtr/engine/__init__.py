"""The engine: the one place that knows about sequence layouts, masks, positions and the KV cache.

For every prefill it finds the visual tokens (through the model-family patch), asks the method which to keep, and
rewrites what the language model sees so that the rest of the forward pass, and every later decoding step, runs on
the pruned sequence exactly as if the pruned tokens had never been there.

Mechanics (all through forward pre-hooks; no transformers forward function is replaced):

* ``pre_llm`` stage: a pre-hook on the language model replaces ``inputs_embeds``, the 2-D attention mask and the
  positions with the pruned, left-padded sequence. The language model then builds its own masks and caches.
* ``layer`` stages at layers K1 < K2 < ...: a pre-hook on each stage layer gathers the hidden states (and inserts
  the tokens a merging stage adds); every layer gets the mask of the stage it runs in (rebuilt by transformers' own
  mask function for that cache layer), its rotary embeddings and positions. Layers before a stage keep their
  longer sequence and KV cache, unless the stage is
  ``slice_earlier`` (PruneVid): then their caches are cut to the stage's kept tokens once the prefill has filled
  them, and later forward calls run every layer on the stage's layout. A stage may keep the positions the previous
  one gave (``StageSpec.positions``) while the method compacts.
* post-attention ``layer`` stages at K (FrameFusion): the selection runs inside layer K-1, on its residual stream
  after self-attention (a pre-hook on its feed-forward norm); the engine runs that layer's MLP block on the pruned
  sequence and the layer returns it (a forward hook). Layer K-1's attention and KV cache hold the previous layout;
  layers >= K run as after a layer stage at K.
* ``vision`` stage (inside CLIP towers): forward hooks on the vision layers hand the method each image's signals
  after its pruning layers and return the layer output gathered to the kept patches, so the later layers run on
  them (crops of different lengths right-padded, with a key mask given to every later layer); a hook on the tower
  puts its outputs back on the full grid (pruned slots zero) so the model's feature selection, projector and anyres
  packing run unchanged, and the language model's pre-hook then removes the placeholders of the pruned patches as
  a ``pre_llm`` stage would. ``layer`` stages may follow it. Qwen-VL towers (``qwen_vision``): whole 2x2 merge
  units are kept, later blocks get the kept rows' ``cu_seqlens`` (windows too) and rotary embeddings, and the
  mergers' inputs are put back at full length.
* Decoding and continuations (any number of new tokens on a pruned cache): the 2-D mask of the pruned layers is
  the pruned prompt mask followed by the new tokens' columns; positions follow the method's policy (``original``:
  the unpruned numbering; ``compact``: minus the tokens removed).

Rows with different numbers of kept tokens are re-padded on the left with masked slots. Per-request state is keyed
by the request's cache object and per-forward state by thread, so concurrent requests do not interfere.
``model.generate`` is shadowed on the instance while patched, to know which requests are in flight (``remove()``
waits for them) and to clean up after a ``KeyboardInterrupt``, which skips torch's always-call hooks.

* ``kv_cache`` stage (decoding, DyCoke): at each single-token step, layers >= L get a mask that hides the visual
  cache entries the method did not choose for that step (see ``kv_cache``).

Modules: ``core`` (layouts, request and forward state, index arithmetic), one per stage (``pre_llm``, ``layer``,
``kv_cache``, ``vision`` signals), ``prune`` (a stage's selection turned into the next layout); this module installs the hooks
and follows each request through its forward calls.
"""
from __future__ import annotations

import collections
import threading
import weakref

import torch

from .. import compat, kernels
from ..methods.base import BEFORE_LM, Method, Stage
from ..patches import Family
from ..report import PrefillRecord
from .core import ForwardState, RequestState, SeqLayout, VisionCall, deepstack_inputs, insertion_index, shift_positions
from .kv_cache import KVCacheStage
from .layer import LayerStages
from .pre_llm import PreLLMStage
from .prune import Pruning
from .qwen_vision import QwenVisionStage
from .vision import VisionSignals

__all__ = ["Engine", "ForwardState", "RequestState", "SeqLayout", "VisionCall", "deepstack_inputs",
           "insertion_index", "shift_positions"]


class Engine(PreLLMStage, LayerStages, KVCacheStage, VisionSignals, QwenVisionStage, Pruning):
    """Installs the hooks for one (model, method) pair and performs the surgery. Created by ``vtr.patch``. Each
    stage's surgery lives in its own module (``pre_llm``, ``layer``, ``kv_cache``, ``vision``, ``prune``) over ``core``."""

    def __init__(self, model: torch.nn.Module, method: Method, family: Family):
        self.model, self.method, self.family = model, method, family
        self.lm = compat.text_model(model)
        self.specs = method.stages()
        self.decode_spec = method.decode_stage()
        self._check_layer_types()
        self.vision_stage_layers: tuple[int, ...] = ()
        self.vision_feature_layer = None
        if "vision" in method.needs or self.specs[0].stage is Stage.VISION:
            self.vision_feature_layer = compat.vision_feature_layer(model)
        if self.specs[0].stage is Stage.VISION:
            self.vision_stage_layers = tuple(method.vision_stage_layers(len(compat.vision_layers(model)),
                                                                        self.vision_feature_layer))
            self.vision_cls = compat.vision_has_cls(model)
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
        self._expansion: dict[int, int] = {}  # thread id -> rows per prompt after generate() repeated its encodings
        self._closing = False
        self._handles = []

    def _check_layer_types(self) -> None:
        """Refuse, before anything is attached, a method that needs what a layer of another type than
        ``full_attention`` cannot give: attention weights of a linear-attention (recurrent) layer (Qwen3.5), a KV
        cache that can be cut or masked token by token in a recurrent layer or a sliding-window layer (Gemma 3: its
        cache keeps only the last ``W - 1`` keys). Sliding layers do give attention weights (over their window)."""
        types = compat.layer_types(self.lm)
        if all(t == "full_attention" for t in types):
            return
        method, model = self.method.name, type(self.model).__name__
        softmax = [i for i, t in enumerate(types) if t != "linear_attention"]
        option = self.method.layer_option

        def scoring(k: int, what: str, shift: int) -> None:
            if types[k] == "linear_attention":
                valid = [i + shift for i in softmax if 1 <= i + shift < len(types)]
                raise ValueError(
                    f"vtr: {method} scores with {what} (decoder layer {k}), which in {model} is a linear-attention "
                    f"(recurrent) layer: it computes no attention weights. Give {option} values whose scoring layer "
                    f"has softmax attention: {valid[:8]}{' ...' if len(valid) > 8 else ''}.")

        for spec in self.specs:
            if spec.stage is not Stage.LAYER:
                continue
            if "layer_inputs" in self.method.needs:
                scoring(spec.layer, f"the attention of its stage layer {spec.layer}", 0)
            elif "attention_inputs" in self.method.needs or spec.post_attention:
                scoring(spec.layer - 1, f"the attention of the layer before its stage at {spec.layer}", 1)
            if spec.slice_earlier:
                bad = [j for j in range(spec.layer) if types[j] != "full_attention"]
                if bad:
                    raise ValueError(
                        f"vtr: {method} cuts the KV caches of the decoder layers before its stage (layer "
                        f"{spec.layer}) down to the kept tokens; in {model} layer {bad[0]} is a {types[bad[0]]} layer, "
                        "whose cache (a sliding window of keys, or a recurrent state) cannot be cut to a subset of "
                        "the prompt's tokens, so decoding could not equal the model run on the kept tokens")
        if self.decode_spec is not None:
            problem = self._decode_layer_problem(types, self.decode_spec.layer)
            if problem:
                # the layers the stage could use: the one before it keeps keys, none from it on is recurrent
                valid = [L for L in range(1, len(types)) if not self._decode_layer_problem(types, L)]
                fix = (f"give {option} one of {valid[:8]}{' ...' if len(valid) > 8 else ''}" if valid else
                       f"no {option} value avoids that on this model")
                off = self.method.decode_stage_off
                raise ValueError(f"vtr: {method}'s decoding stage ({option}={self.decode_spec.layer}) cannot run on "
                                 f"{model}: it {problem}. {fix[0].upper() + fix[1:]}"
                                 + (f", or pass {off} to run its stage before the language model alone" if off else ""))

    @staticmethod
    def _decode_layer_problem(types: list[str], L: int) -> str:
        """Why a decode-time stage at layer ``L`` (scoring with layer ``L - 1``'s cache, hiding tokens from layers
        ``>= L``) cannot run over these layer types ("" when it can)."""
        if types[L - 1] != "full_attention":
            held = "only its window" if types[L - 1] == "sliding_attention" else "a recurrent state, no keys"
            return (f"scores each new token's attention over the whole visual cache of decoder layer {L - 1}, a "
                    f"{types[L - 1]} layer (its cache holds {held})")
        bad = [j for j in range(L, len(types)) if types[j] == "linear_attention"]
        if bad:
            return (f"hides visual tokens from the KV caches of decoder layers >= {L}; layer {bad[0]} is a "
                    "linear-attention layer whose recurrent state has no per-token entries to hide")
        return ""

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
                sliced = [s.slice_from for s in self.specs if s.slice_earlier]
                first = min(sliced + [min(layer_stages)])
                for i in range(first, len(layers)):
                    reg(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            self._post_attention_hooks(reg, layers)
            if "layer_inputs" in self.method.needs:
                self._own_projection_hooks(reg, layers)
            if "attention_inputs" in self.method.needs:
                for k in layer_stages:
                    attn = compat.self_attention(layers[k - 1])
                    reg(attn.register_forward_pre_hook(self._capture_hook(k - 1), with_kwargs=True))
                    reg(compat.key_projection(attn).register_forward_hook(self._capture_keys_hook(k - 1)))
            if self.decode_spec is not None:
                self._attach_decode(reg, layers)
            if "vision" in self.method.needs or self.vision_stage_layers:
                self._attach_vision(reg)
            if self.family.deepstack and layer_stages:
                compat.shadow_method(self.lm, "_deepstack_process", self._deepstack)
            compat.shadow_method(self.model, "generate", self._generate)
            if hasattr(self.model, compat.GENERATE_EXPANSION):
                compat.shadow_method(self.model, compat.GENERATE_EXPANSION, self._expanding)
            compat.shadow_method(self.model, "forward", self._guarded_forward)
            compat.shadow_method(compat.base_model(self.model), "forward", self._guarded_forward)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        compat.unshadow_method(self.lm, "_deepstack_process")
        compat.unshadow_method(self.model, "generate")
        compat.unshadow_method(self.model, compat.GENERATE_EXPANSION)
        compat.unshadow_method(self.model, "forward")
        compat.unshadow_method(compat.base_model(self.model), "forward")
        compat.unshadow_method(compat.base_model(self.model), compat.IMAGE_FEATURES)
        compat.unshadow_method(compat.base_model(self.model), compat.VIDEO_FEATURES)
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
            self._refuse_pruned_caches()

    def _refuse_pruned_caches(self) -> None:
        """Every live KV cache this patch pruned is made to refuse further use: its layers hold the pruned sequence,
        whose masks and positions only this patch knew, so the unpatched model (or a new patch, which did not prune
        it) would continue it silently wrong. Caches whose request removed nothing stay usable."""
        message = (f"vtr: this KV cache was pruned by vtr.patch(model, {self.method.name!r}, ...), which has since "
                   "been removed (handle.remove(), or the end of its with-block). Its layers hold the pruned "
                   "sequence, whose attention masks and positions only that patch knew, so neither the unpatched "
                   "model nor a new patch can continue it. Continue the conversation while the patch is in place, "
                   "or start a new cache with the whole conversation.")
        pruned = [cache for cache, request in self._requests.items() if request.layouts]  # under self._lock
        self._requests.clear()
        for cache in pruned:
            compat.refuse_cache(cache, message)

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
                    self._expansion.pop(me, None)
                self._idle.notify_all()

    def _expanding(self, original, *args, **kwargs):
        """``generate``'s row expansion (beam search, ``num_return_sequences``): when it repeats visual encodings it
        made before, the prefill's rows are mapped to them (``ForwardState.expansion``)."""
        expand = compat.pre_encoded_expansion(original, args, kwargs)
        if expand > 1:
            self._expansion[threading.get_ident()] = expand
        return original(*args, **kwargs)

    def _guarded_forward(self, original, *args, **kwargs):
        """The model's (and the base model's) ``forward`` while patched: whatever exception ends it, this thread's
        in-flight state is cleared, so that ``remove()`` does not wait for it forever. Torch runs no always-call
        forward hook when a ``BaseException`` that is not an ``Exception`` (Ctrl-C, ``SystemExit``) ends the call."""
        try:
            return original(*args, **kwargs)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Forget the forward call in flight in this thread (one that ended by an exception)."""
        me = threading.get_ident()
        with self._idle:
            self._states.pop(me, None)
            if not self._generating[me]:
                self._vision.pop(me, None)
                self._resumed.pop(me, None)
                self._expansion.pop(me, None)
            self._idle.notify_all()

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
        refusal = compat.cache_refusal(cache) if cache is not None else None
        if refusal is not None:
            raise ValueError(refusal)
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
        logical_past = request.prompt_length + past - request.cache_prompt_length  # what the unpruned cache would hold
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
        fwd.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if request.layouts and (self.specs[0].stage in BEFORE_LM or request.cache_prompt_length != request.prompt_length):
            # transformers numbers new tokens from the layer-0 cache length (or, in generate, from positions it
            # derived with it), which pre-LLM pruning (or a stage that cut the earlier caches) shortened: number
            # them from the unpruned sequence.
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

    def _lm_pre(self, module, args, kwargs):
        fwd = self._state()
        if fwd is None:
            return None
        if fwd.prefill and fwd.inputs is not None and fwd.request is None:
            return args, self._lm_prefill(fwd, kwargs)
        if not fwd.prefill and fwd.request is not None:
            return args, self._lm_decode(fwd, kwargs)
        return None
