"""References for the exactness tests: what a pruned run must equal, computed without vtr's engine.

* Pre-LLM stage: the unpatched model itself, fed the kept input embeddings with the prescribed positions and a
  2-D mask, then decoded greedily step by step with explicit positions.
* Layer stage at K: a hand-written loop over the unpatched decoder layers: layers < K on the full sequence, the
  kept hidden states from layer K on, each layer group with its own explicit additive 4-D mask and positions.

Which tokens are kept comes from the patched run's record (``handle.last.index``); these references check the
surgery (masks, positions, cache), the selection tests check the choice.
"""
from __future__ import annotations

import types

import torch
from transformers import DynamicCache

from vtr import compat


def lm_of(model):
    return model.model.language_model


def capture_lm_inputs(model, inputs: dict, generate: bool = False, vision_tokens: dict | None = None,
                      merging=None) -> dict:
    """Inputs the language model receives at the prefill of an unpatched forward (or ``generate``, which numbers
    positions from the attention mask): embeddings, 2-D mask, positions. ``vision_tokens`` (a vision stage's
    record, ``handle.last.vision_tokens``): the vision tower's feature layer is recomputed crop by crop by the
    unpatched layers, each run on the kept tokens from the layer after each pruning layer on (``vision_reference``);
    the unpatched model then projects those features. ``merging``: ``(handle.last.vision_merges, method)`` of a
    merging vision stage, whose groups the recomputation merges by size (see ``vision_reference``).
    ``seen["again"](vision_tokens, merging)`` captures again so."""
    seen = {}
    tower_hook = None
    if vision_tokens and compat.is_qwen_tower(model):
        tower_hook = QwenTowerReference(model, vision_tokens)
    elif vision_tokens:
        tower = model.model.vision_tower
        feature = compat.vision_feature_layer(model)

        def replace(module, args, kwargs, output):
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            hidden = list(output.hidden_states)
            hidden[feature + 1] = vision_reference(tower, pixels, vision_tokens, feature, merging)
            output.hidden_states = tuple(hidden)
            return output

        tower_hook = tower.register_forward_hook(replace, with_kwargs=True)

    base = {}

    def base_hook(module, args, kwargs):
        if not base:  # models whose base model builds the masks (Gemma 3) hand the language model a mapping
            base.update(mask=kwargs.get("attention_mask"), token_type_ids=kwargs.get("token_type_ids"))

    def hook(module, args, kwargs):
        if not seen:
            mask = kwargs.get("attention_mask")
            seen.update(embeds=kwargs["inputs_embeds"].detach().clone(),
                        mask=base["mask"] if isinstance(mask, dict) else mask,
                        positions=kwargs.get("position_ids"), visual_pos_masks=kwargs.get("visual_pos_masks"),
                        deepstack=kwargs.get("deepstack_visual_embeds"), token_type_ids=base.get("token_type_ids"))

    handles = [model.model.register_forward_pre_hook(base_hook, with_kwargs=True),
               lm_of(model).register_forward_pre_hook(hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            if generate:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            else:
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        if tower_hook is not None:
            tower_hook.remove()
    seen["again"] = lambda tokens, merging=None: capture_lm_inputs(model, inputs, generate, tokens, merging)
    seen["spans"] = visual_runs(model, inputs["input_ids"])
    B, L, _ = seen["embeds"].shape
    if seen["mask"] is None:
        seen["mask"] = torch.ones(B, L, dtype=torch.long)
    if seen["positions"] is None:
        seen["positions"] = torch.arange(L).expand(B, L)
    else:
        seen["positions"] = seen["positions"].expand(*seen["positions"].shape[:-2], B, L)
    return seen


def vision_reference(tower, pixels: torch.Tensor, vision_tokens: dict, feature: int, merging=None) -> torch.Tensor:
    """``[C, N, D_v]``: the feature layer's output of each tower input, computed alone by the unpatched CLIP layers;
    after each pruning layer ``i`` of ``vision_tokens`` (``[C, W]`` original token indices kept, -1 padding) only the
    kept tokens go on. Pruned tokens are zero. ``merging``: ``(vision_merges, method)``: at a merging layer ``i``
    (after its attention for ``method.vision_merge_point == "attention"``, else after the layer) every token goes
    into the token ``vision_merges[i]`` names, each kept token the size-weighted mean of its group (ToMe's
    merge_wavg), and with ``method.proportional_attention`` every layer adds ``log(size)`` of each key to its
    attention logits."""
    vm = getattr(tower, "vision_model", tower)
    merges, method = merging if merging else ({}, None)
    mid = method is not None and method.vision_merge_point == "attention"
    proportional = method is not None and method.proportional_attention
    with torch.no_grad():
        embedded = vm.pre_layrnorm(vm.embeddings(pixels))
        out = torch.zeros_like(embedded)
        for c in range(embedded.shape[0]):
            hidden, names = embedded[c:c + 1], list(range(embedded.shape[1]))
            sizes = torch.ones(len(names))
            previous = list(range(embedded.shape[1]))  # the engine's layout before each merging step

            def merge(h, i):
                nonlocal names, sizes, previous
                went = dict(zip(previous, merges[i][c].tolist()))
                kept = [t for t in vision_tokens[i][c].tolist() if t >= 0]
                rows = {t: j for j, t in enumerate(kept)}
                summed = torch.zeros(1, len(kept), h.shape[-1])
                total = torch.zeros(len(kept))
                for j, t in enumerate(names):
                    if went[t] >= 0:
                        summed[0, rows[went[t]]] += h[0, j].float() * sizes[j]
                        total[rows[went[t]]] += sizes[j]
                names, sizes, previous = kept, total, kept
                return (summed / total[None, :, None]).to(h.dtype)

            for i, layer in enumerate(vm.encoder.layers[:feature + 1]):
                bias = None
                if proportional and bool((sizes > 1).any()):
                    bias = sizes.log()[None, None, None, :].expand(1, 1, len(names), len(names)).to(hidden.dtype)
                if i in merges and mid:
                    attended = layer.self_attn(layer.layer_norm1(hidden), attention_mask=bias)[0]
                    hidden = merge(hidden + attended, i)
                    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
                    continue
                hidden = layer(hidden, bias)
                if i in merges:
                    hidden = merge(hidden, i)
                elif i in vision_tokens:
                    kept = [t for t in vision_tokens[i][c].tolist() if t >= 0]
                    hidden = hidden[:, [names.index(t) for t in kept]]
                    sizes = sizes[[names.index(t) for t in kept]]
                    names = previous = kept
            out[c, names] = hidden[0]
    return out


def kept_boundaries(bounds: list, rows: list) -> list:
    """Attention-segment boundaries (``cu_seqlens``) of the kept ``rows`` (original tower rows): per original
    segment ``[a, b)`` the number of kept rows in it, cumulated, empty segments dropped."""
    cu = [0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        count = sum(1 for r in rows if a <= r < b)
        if count:
            cu.append(cu[-1] + count)
    return cu


class QwenTowerReference:
    """While registered, a Qwen-VL tower's merged features (and Qwen3-VL's DeepStack features) are replaced by
    those of its unpatched blocks run by hand on the kept rows: after each pruning block ``i`` of ``vision_tokens``
    (``[1, S']`` original rows kept, tower order) only those rows go on, each later block given, for every attention
    segment it had (its own ``cu_seqlens``: images, or Qwen2.5-VL windows), the kept rows of that segment and the
    kept rows' rotary (cos, sin); the mergers read the rows at full length with pruned rows zero."""

    def __init__(self, model, vision_tokens: dict):
        self.model, self.tokens, self.calls = model, vision_tokens, {}
        visual = model.model.visual
        self.handles = [block.register_forward_pre_hook(self._block(i), with_kwargs=True)
                        for i, block in enumerate(visual.blocks)]
        self.handles.append(visual.register_forward_hook(self._replace, with_kwargs=True))

    def _block(self, i):
        def hook(module, args, kwargs):
            self.calls[i] = (args[0] if args else kwargs["hidden_states"], dict(kwargs))
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _replace(self, module, args, kwargs, output):
        visual = module
        hidden, _ = self.calls[0]
        S = hidden.shape[0]
        rows = list(range(S))
        indexes = list(getattr(visual, "deepstack_visual_indexes", None) or [])
        deep = []

        def full(h):
            out = h.new_zeros(S, h.shape[-1])
            out[rows] = h
            return out

        with torch.no_grad():
            for i, block in enumerate(visual.blocks):
                kw = self.calls[i][1]
                cu = kept_boundaries(kw["cu_seqlens"].tolist(), rows)
                cos, sin = kw["position_embeddings"]
                extra = {k: v for k, v in kw.items() if k not in ("cu_seqlens", "position_embeddings", "max_seqlen")}
                hidden = block(hidden, cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                               position_embeddings=(cos[rows], sin[rows]), **extra)
                if i in self.tokens:
                    where = {r: j for j, r in enumerate(rows)}
                    kept = self.tokens[i][0].tolist()
                    hidden = hidden[[where[r] for r in kept]]
                    rows = kept
                if i in indexes:
                    deep.append(visual.deepstack_merger_list[indexes.index(i)](full(hidden)))
            merged = visual.merger(full(hidden))
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        order = compat.qwen_unit_order(self.model, grid)  # tower (window) order -> merged-token order
        raster = torch.empty_like(merged)
        raster[order] = merged
        output.pooler_output = raster
        if deep:
            output.deepstack_features = []
            for d in deep:
                r = torch.empty_like(d)
                r[order] = d
                output.deepstack_features.append(r)
        return output


def visual_runs(model, ids: torch.Tensor) -> list:
    """Per row, the prompt positions of each run of consecutive image (or video) placeholders: the visual spans,
    found without vtr's layout."""
    config = model.config
    visual = [getattr(config, name, None) for name in ("image_token_id", "video_token_id", "image_token_index",
                                                        "video_token_index")]
    flags = torch.isin(ids, torch.tensor([v for v in visual if v is not None]))
    runs = []
    for b in range(ids.shape[0]):
        row, current = [], []
        for j, flag in enumerate(flags[b].tolist()):
            if flag:
                current.append(j)
            elif current:
                row.append(current)
                current = []
        if current:
            row.append(current)
        runs.append(row)
    return runs


def gather_seq(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """``x[..., b, index[b, i], ...]`` along the sequence dim of ``[B, L]``, ``[B, L, D]`` or ``[R, B, L]``."""
    if x.dim() == 3 and x.shape[1] == index.shape[0] and x.shape[2] != index.shape[0] and x.shape[0] in (3, 4):
        return torch.stack([gather_seq(r, index, fill) for r in x])
    out = []
    for b in range(index.shape[0]):
        row = x[b]
        picked = row[index[b].clamp(min=0)].clone()
        picked[index[b] < 0] = fill
        out.append(picked)
    return torch.stack(out)


def pruned_positions(positions: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, policy: str,
                     spans: list | None = None) -> torch.Tensor:
    """Positions of the kept slots: original (gathered), compact (minus the removed real tokens before each) or
    span_prefix (the kept tokens of each visual span, ``spans[b]`` lists of prompt positions, take the span's first
    positions in order; the others their own)."""
    kept = gather_seq(positions, index, 1)
    if policy == "original":
        return kept
    if policy == "span_prefix":
        kept = kept.clone()
        for b in range(index.shape[0]):
            for run in spans[b]:
                members = set(run)
                slots = [j for j, p in enumerate(index[b].tolist()) if p in members]
                kept[..., b, slots] = positions[..., b, run[:len(slots)]]
        return kept
    B, L = mask.shape
    present = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        present[b, index[b][index[b] >= 0]] = True
    removed = (mask.bool() & ~present).long()
    before = removed.cumsum(1) - removed
    return kept - gather_seq(before, index, 0)


def added_positions(lm_inputs: dict, index: torch.Tensor, added: list, mask: torch.Tensor, policy: str):
    """Positions of a stage's slots when it holds added tokens: original (an added token takes its recorded
    anchor's position) or compact (each row renumbered from its first real position, without gaps)."""
    positions = lm_inputs["positions"]
    anchors = index.clone()
    for b in range(index.shape[0]):
        ids = [j for j, p in enumerate(index[b].tolist()) if p < -1]
        for j, token in zip(ids, added[b]):
            anchors[b, j] = token.position
    kept = gather_seq(positions, anchors, 1)
    if policy == "original":
        return kept
    first = mask.long().argmax(1)
    rows = kept if kept.dim() == 3 else kept[None]
    start = rows[:, torch.arange(len(first)), first]
    out = torch.where(mask, start[..., None] + mask.long().cumsum(1) - 1, 1)
    return out if kept.dim() == 3 else out[0]


def additive_mask(key_valid: torch.Tensor, q_len: int, dtype, blocks: torch.Tensor | None = None,
                  window: int | None = None) -> torch.Tensor:
    """``[B, 1, q, kv]`` float mask: query i (the last q of kv slots) sees valid keys up to itself; with ``blocks``
    (``[B, kv]`` bidirectional block per slot, -1 none) also the keys of its own block; with a ``window``
    (sliding-window layers) only keys less than ``window`` slots before it, as Gemma 3 composes them:
    (causal OR same block) AND window."""
    B, kv = key_valid.shape
    q_slot = torch.arange(kv - q_len, kv)[:, None]
    keys = torch.arange(kv)[None, :]
    allowed = (keys <= q_slot)[None].expand(B, -1, -1)
    if blocks is not None:
        q_block = blocks[:, kv - q_len:, None]
        allowed = allowed | ((q_block == blocks[:, None, :]) & (q_block >= 0))
    if window is not None:
        allowed = allowed & (keys > q_slot - window)[None]
    allowed = allowed & key_valid.bool()[:, None, :]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def layer_window(lm, i: int) -> int | None:
    """The sliding window of decoder layer ``i`` (Gemma 3's local layers), or None."""
    types = getattr(lm.config, "layer_types", None)
    return lm.config.sliding_window if types is not None and types[i] == "sliding_attention" else None


def rope(lm, hidden, positions, i: int):
    """(cos, sin) of decoder layer ``i`` at ``positions`` (Gemma 3: each layer type has its own rotary base)."""
    return compat.rotary_embeddings(lm, hidden, positions, i)


def plain_cache(lm):
    """A cache whose every attention layer keeps all its keys (no sliding-window truncation: the references apply
    each layer's window through its mask instead, a mechanism independent of the engine's); linear-attention
    layers (Qwen3.5) keep their recurrent state."""
    types = getattr(lm.config, "layer_types", None) or []
    return DynamicCache() if "sliding_attention" in types else DynamicCache(config=lm.config)


def layer_mask(lm, i: int, key_valid: torch.Tensor, q_len: int, dtype, blocks=None):
    """The mask decoder layer ``i`` takes: additive 4-D for attention layers (``additive_mask``, with its window),
    the 2-D padding mask of the new tokens for a linear-attention layer (None for one token, which is never
    padding), as transformers' ``create_recurrent_attention_mask`` gives it."""
    types = getattr(lm.config, "layer_types", None)
    if types is not None and types[i] == "linear_attention":
        return key_valid[:, -q_len:].long() if q_len > 1 else None
    return additive_mask(key_valid, q_len, dtype, blocks, layer_window(lm, i))


def next_positions(lm_inputs: dict, index: torch.Tensor, policy: str) -> torch.Tensor:
    """Position of the first token after the prompt: the unpruned prompt's last real token + 1 (per M-RoPE axis,
    as generate() steps positions), minus the removed tokens under ``compact``. Returns ``[B, 1]`` or
    ``[3, B, 1]``."""
    positions, mask = _rope_rows(lm_inputs["positions"]), lm_inputs["mask"].bool()
    rows = positions if positions.dim() == 3 else positions[None]
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
    top = rows[:, torch.arange(len(last)), last] + 1  # [R, B]
    if policy == "compact":
        # kept real tokens: the prompt's (a stage that removed nothing records the padding slots too) and added ones
        kept = gather_seq(mask.long(), index, 0).sum(1) + (index < -1).sum(1) if index.numel() else mask.sum(1)
        top = top - (mask.sum(1) - kept)
    top = top[..., None]
    return top if positions.dim() == 3 else top[0]


def kept_deepstack(lm_inputs: dict, index: torch.Tensor) -> dict:
    """Qwen3-VL's DeepStack inputs cut to the kept tokens: the visual mask gathered, the feature rows of the kept
    visual tokens (features are stored in (row, position) order of the full mask)."""
    masks = lm_inputs.get("visual_pos_masks")
    if masks is None:
        return {}
    rank = (masks.flatten().long().cumsum(0) - 1).view_as(masks)
    kept = gather_seq(masks, index, False)
    rows = gather_seq(rank, index, 0)[kept]
    return {"visual_pos_masks": kept, "deepstack_visual_embeds": [e[rows] for e in lm_inputs["deepstack"]]}


def pre_llm_reference(model, lm_inputs: dict, index: torch.Tensor, policy: str, steps: int, tokens=None,
                      then=None):
    """Unpatched model on the kept tokens, decoded greedily (or fed ``tokens`` [B, steps], teacher forcing), then
    fed ``then`` [B, q] (a later turn's text) in one call. Returns (prefill logits [B, L', V], step logits
    [B, steps, V] or None, ``then`` logits [B, q, V] or None). With DeepStack (Qwen3-VL) the language model is
    called directly, since the top-level model only makes DeepStack features from pixels."""
    embeds = gather_seq(lm_inputs["embeds"], index, 0.0)
    mask = gather_seq(lm_inputs["mask"], index, 0)
    positions = pruned_positions(lm_inputs["positions"], lm_inputs["mask"], index, policy, lm_inputs.get("spans"))
    cache = DynamicCache(config=lm_of(model).config)
    deepstack = kept_deepstack(lm_inputs, index)
    token_types = lm_inputs.get("token_type_ids")  # Gemma 3: the kept tokens' types make its image blocks
    token_types = gather_seq(token_types, index, 0) if token_types is not None else None

    def forward(inputs_embeds, first=False, **kwargs):
        if first and token_types is not None:
            kwargs["token_type_ids"] = token_types
        if not deepstack:
            return model(inputs_embeds=inputs_embeds, **kwargs)
        extra = deepstack if first else {}
        hidden = lm_of(model)(inputs_embeds=inputs_embeds, **kwargs, **extra).last_hidden_state
        return types.SimpleNamespace(logits=model.lm_head(hidden))

    with torch.no_grad():
        out = forward(inputs_embeds=embeds, first=True, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)
        prefill = out.logits
        start = next_positions(lm_inputs, index, policy)

        def feed(chunk, offset):
            nonlocal mask
            q = chunk.shape[1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], q)], 1)
            pos = start + offset + torch.arange(q)
            return forward(inputs_embeds=model.get_input_embeddings()(chunk), attention_mask=mask,
                           position_ids=pos, past_key_values=cache, use_cache=True).logits

        step_logits, chunk_logits = _drive(prefill[:, -1], steps, tokens, then, feed)
    return prefill, step_logits, chunk_logits


def _drive(logits, steps, tokens, then, feed):
    """Greedy (or teacher-forced) steps, then one chunk of ``then`` tokens, through ``feed(tokens, offset)``."""
    step_logits = []
    for t in range(steps):
        step_logits.append(logits)
        token = logits.argmax(-1) if tokens is None else tokens[:, t]
        logits = feed(token[:, None], t)[:, -1]
    chunk = feed(then, steps) if then is not None else None
    return (torch.stack(step_logits, 1) if step_logits else None), chunk


def layer_reference(model, lm_inputs: dict, index: torch.Tensor, layer: int, policy: str, steps: int, tokens=None,
                    then=None):
    """Decoder loop over the unpatched layers, pruned before ``layer``: layers < ``layer`` hold the full prompt.
    Same arguments and returns as ``pre_llm_reference``."""
    return stages_reference(model, lm_inputs, [(layer, index)], policy, steps, tokens, then)


def stages_reference(model, lm_inputs: dict, stages: list, policy, steps: int, tokens=None, then=None,
                     policies=None, slice_earlier=None, post_attention=(), merged=None, layout=None):
    """Decoder loop over the unpatched layers, pruned in stages: ``stages`` is ``[(layer, index[, added[,
    replaced]])]`` in order, each ``index`` ``[B, L_s]`` the original prompt positions of the slots layers >=
    ``layer`` run on (-1 padding, -2 - a: added token a, whose state and anchor position come from ``added``, the
    stage record's); ``replaced``: per row ``{original position: state}``, the hidden states a merging layer stage
    gave those tokens (from its record). Layers before the first stage hold the full prompt; each stage layer's
    KV cache holds its stage's tokens. ``policy``: one position policy, or one per stage, where "keep" means the
    positions the tokens had in the previous stage (a gap-preserving stage after a compacting one).
    ``policies``: per stage, a policy overriding a single ``policy`` ("original" after a "compact" ``policy``:
    "keep"). ``slice_earlier``: per stage, whether the KV caches of the layers before it are cut to its kept tokens
    once the prefill is done (then decoding runs those layers on the stage's tokens too).
    ``post_attention``: stage layers K selected inside layer K-1 after its attention and residual add (that
    layer's MLP runs on the stage's tokens, its attention and cache on the previous ones). ``merged``: per stage,
    its record's merged tokens (per row, visual ids and the states they take in their slot; ``layout``: the
    record's, to find them) or None. Same returns as ``pre_llm_reference``."""
    lm = lm_of(model)
    merged = list(merged) if merged is not None else [None] * len(stages)
    groups = [(0, None)] + list(stages)
    if policies is not None:
        policies = ["keep" if p == "original" and policy in ("compact", "span_prefix") else (p or policy)
                    for p in policies]
    else:
        policies = [policy] * len(stages) if isinstance(policy, str) else list(policy)
    # per group: None, or the first layer whose cache the stage cuts (True: layer 0)
    slice_earlier = [None] + [None if s is False or s is None else 0 if s is True else int(s)
                              for s in (slice_earlier or [None] * len(stages))]
    masks, positions, starts, stacks = [], [], [], []
    for g, group in enumerate(groups):
        index = group[1]
        if g > 0 and policies[g - 1] == "keep" and not bool((index < -1).any()):
            prev = groups[g - 1][1]
            if prev is None:
                prev = torch.arange(lm_inputs["mask"].shape[1]).expand(index.shape[0], -1)
            where = torch.full_like(index, -1)
            for b in range(index.shape[0]):
                slot = {int(p): j for j, p in enumerate(prev[b].tolist()) if p >= 0}
                where[b] = torch.tensor([slot.get(int(p), -1) for p in index[b].tolist()])
            masks.append(gather_seq(lm_inputs["mask"].bool(), index, False))
            positions.append(gather_seq(positions[-1], where, 1))
            stacks.append(kept_deepstack(lm_inputs, index))
            starts.append(starts[-1])
            continue
        policy = policies[g - 1] if g > 0 else None
        if policy == "keep":  # with added tokens: numbered as "original" would
            policy = "original"
        if index is None:
            masks.append(lm_inputs["mask"].bool())
            positions.append(_rope_rows(lm_inputs["positions"]))
            stacks.append({"visual_pos_masks": lm_inputs.get("visual_pos_masks"),
                           "deepstack_visual_embeds": lm_inputs.get("deepstack")})
            starts.append(next_positions(lm_inputs, torch.zeros(0), "original"))
        elif not bool((index < -1).any()):
            masks.append(gather_seq(lm_inputs["mask"].bool(), index, False))
            positions.append(_rope_rows(pruned_positions(lm_inputs["positions"], lm_inputs["mask"], index, policy,
                                                         lm_inputs.get("spans"))))
            stacks.append(kept_deepstack(lm_inputs, index))
            starts.append(next_positions(lm_inputs, index, policy))
        else:  # with tokens a merging stage added (index -2 - a)
            mask = gather_seq(lm_inputs["mask"].bool(), index, False) | (index < -1)
            masks.append(mask)
            positions.append(_rope_rows(added_positions(lm_inputs, index, group[2], mask, policy)))
            stacks.append(kept_deepstack(lm_inputs, index))
            starts.append(next_positions(lm_inputs, index, policy))
    cache = plain_cache(lm)
    token_types = lm_inputs.get("token_type_ids")
    blocks = None
    if token_types is not None:  # Gemma 3: each run of kept image tokens stays one bidirectional block
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
        blocks = []
        for group in groups:
            index = group[1] if group[1] is not None else torch.arange(token_types.shape[1]).expand(
                token_types.shape[0], -1)
            anchors = index.clone()
            if len(group) > 2 and group[2] is not None:
                for b in range(index.shape[0]):
                    ids = [j for j, p in enumerate(index[b].tolist()) if p < -1]
                    for j, token in zip(ids, group[2][b]):
                        anchors[b, j] = token.position
            types = gather_seq(token_types, anchors, 0)
            blocks.append(get_block_sequence_ids_for_mask(types))

    sliced = [False]

    def group_of(i):
        if sliced[0]:  # decoding after the prefill: a slicing stage covers every layer before it
            later = [g for g, group in enumerate(groups) if slice_earlier[g] is not None and group[0] > i
                     and i >= slice_earlier[g]]
            if later:
                return max(later)
        return max(g for g, group in enumerate(groups) if group[0] <= i)

    def slice_caches():
        for g, group in enumerate(groups):
            if slice_earlier[g] is None:
                continue
            for i in range(slice_earlier[g], group[0]):
                held = groups[group_of(i)][1]
                B = group[1].shape[0]
                if held is None:
                    held = torch.arange(cache.layers[i].keys.shape[2]).expand(B, -1)
                select = torch.zeros_like(group[1])
                for b in range(B):
                    slot = {int(p): j for j, p in enumerate(held[b].tolist()) if p >= 0}
                    select[b] = torch.tensor([slot.get(int(p), 0) for p in group[1][b].tolist()])
                layer = cache.layers[i]
                layer.keys = torch.stack([layer.keys[b][:, select[b]] for b in range(B)])
                layer.values = torch.stack([layer.values[b][:, select[b]] for b in range(B)])
        sliced[0] = True

    def regather(hidden, prev_index, index, added, replaced=None, merges=None):
        """The slots of ``index`` taken from a sequence laid out as ``prev_index`` (original positions; added
        tokens new at this stage take their recorded state, replaced / merged ones their recorded new state)."""
        out = torch.zeros(index.shape[0], index.shape[1], hidden.shape[-1], dtype=hidden.dtype)
        for b in range(index.shape[0]):
            if replaced is not None:
                hidden = hidden.clone()
                for p, state in replaced[b].items():
                    hidden[b, prev_index[b].tolist().index(p)] = state.to(hidden.dtype)
            if merges is not None and len(merges[b].kept):
                hidden = hidden.clone()
                at = {int(p): j for j, p in enumerate(prev_index[b].tolist()) if p != -1}
                for v, state in zip(merges[b].kept.tolist(), merges[b].embeds):
                    hidden[b, at[int(layout.rows[b].visual_positions[v])]] = state.to(hidden.dtype)
            where = {int(p): j for j, p in enumerate(prev_index[b].tolist()) if p != -1}
            states = {}
            if added is not None:
                ids = [p for p in index[b].tolist() if p < -1]
                states = {p: t.state for p, t in zip(ids, added[b])}
            for j, p in enumerate(index[b].tolist()):
                if p in where:
                    out[b, j] = hidden[b, where[p]]
                elif p < -1:
                    out[b, j] = states[p].to(hidden.dtype)
        return out

    def to_group(hidden, g):
        prev = groups[g - 1][1]
        if prev is None:
            prev = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
        return regather(hidden, prev, groups[g][1], groups[g][2] if len(groups[g]) > 2 else None,
                        groups[g][3] if len(groups[g]) > 3 else None, merged[g - 1])

    def run(hidden, q_pos, prefill):
        for i, block in enumerate(lm.layers):
            g = group_of(i)
            if prefill and g > 0 and groups[g][0] == i and i not in post_attention:
                hidden = to_group(hidden, g)
            q = hidden.shape[1]
            cos, sin = rope(lm, hidden, q_pos[g], i)
            group_blocks = blocks[g] if blocks is not None and prefill else None
            kwargs = {"attention_mask": layer_mask(lm, i, masks[g], q, hidden.dtype, group_blocks),
                      "position_embeddings": (cos, sin), "position_ids": None, "past_key_values": cache,
                      "use_cache": True}
            split = prefill and i + 1 in post_attention and g + 1 < len(groups) and groups[g + 1][0] == i + 1
            if split:  # the layer by hand: attention on this group's tokens, its MLP on the next group's
                hidden = to_group(attention_half(block, hidden, kwargs), g + 1)
                hidden = mlp_half(block, hidden)
                g += 1
            else:
                hidden = block(hidden, **kwargs)
            stack = stacks[g]
            if prefill and stack.get("deepstack_visual_embeds") and i < len(stack["deepstack_visual_embeds"]):
                hidden = hidden.clone()
                hidden[stack["visual_pos_masks"]] += stack["deepstack_visual_embeds"][i]
        return model.lm_head(lm.norm(hidden))

    with torch.no_grad():
        prefill = run(lm_inputs["embeds"], positions, True)
        slice_caches()

        def feed(chunk, offset):
            q = chunk.shape[1]
            for g, mask in enumerate(masks):
                masks[g] = torch.cat([mask, mask.new_ones(mask.shape[0], q)], 1)
            step = offset + torch.arange(q)
            return run(model.get_input_embeddings()(chunk), [start + step for start in starts], False)

        step_logits, chunk_logits = _drive(prefill[:, -1], steps, tokens, then, feed)
    return prefill, step_logits, chunk_logits


def attention_half(block, hidden, kwargs):
    """A decoder layer's first half: ``x + attn(norm(x))``, the attention output normed first where the layer
    does so (Gemma 3's ``post_attention_layernorm``, GLM-4.1V's ``post_self_attn_layernorm``)."""
    attended, _ = block.self_attn(hidden_states=block.input_layernorm(hidden), **kwargs)
    if hasattr(block, "pre_feedforward_layernorm"):
        attended = block.post_attention_layernorm(attended)
    elif hasattr(block, "post_self_attn_layernorm"):
        attended = block.post_self_attn_layernorm(attended)
    return hidden + attended


def mlp_half(block, hidden):
    """A decoder layer's second half: ``h + mlp(norm(h))`` (Gemma 3: its pre- and post-feed-forward norms; GLM-4.1V:
    ``post_mlp_layernorm`` on the MLP output)."""
    if hasattr(block, "pre_feedforward_layernorm"):
        return hidden + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
    out = block.mlp(block.post_attention_layernorm(hidden))
    if hasattr(block, "post_mlp_layernorm"):
        out = block.post_mlp_layernorm(out)
    return hidden + out


def _rope_rows(positions: torch.Tensor) -> torch.Tensor:
    """Positions as the rotary embedding takes them: drop the text row of Qwen's 4-row position ids."""
    return positions[1:] if positions.dim() == 3 and positions.shape[0] == 4 else positions


def with_merges(lm_inputs: dict, record) -> dict:
    """The language-model inputs with the embeddings a merging method gave its merged tokens (from the record of
    the pruned run, ``handle.last.merged``): the reference then feeds the kept, merged tokens."""
    merged = record.merged if record is not None else None
    if not merged:
        return lm_inputs
    embeds = lm_inputs["embeds"].clone()
    deepstack = [level.clone() for level in lm_inputs["deepstack"]] if lm_inputs.get("deepstack") else None
    for b, (row, tokens) in enumerate(zip(record.layout.rows, merged)):
        if len(tokens.kept):
            positions = row.visual_positions[tokens.kept]
            embeds[b, positions] = tokens.embeds.to(embeds.dtype)
            if tokens.deepstack is not None:  # Qwen3-VL: merged DeepStack features too, in (row, position) order
                masks = lm_inputs["visual_pos_masks"]
                rows = (masks.flatten().long().cumsum(0) - 1).view_as(masks)[b, positions]
                for level, part in zip(deepstack, tokens.deepstack.split(embeds.shape[-1], -1)):
                    level[rows] = part.to(level.dtype)
    return dict(lm_inputs, embeds=embeds, **({"deepstack": deepstack} if deepstack is not None else {}))


def reference_for(model, method, lm_inputs, index, steps, tokens=None, then=None, record=None):
    """The reference matching a patched method's (single) stage: (prefill, step, ``then`` logits). ``record``:
    the pruned run's ``handle.last``, whose merged embeddings (if any) replace those of the merged tokens."""
    merging = record is not None and record.vision_merges
    if record is not None and record.vision_tokens:  # the unpatched tower run on the kept (merged) patches
        lm_inputs = lm_inputs["again"](record.vision_tokens, (record.vision_merges, method) if merging else None)
    if record is not None and record.layout is not None:  # adjacent images (LLaVA) are one run of placeholders
        lm_inputs = dict(lm_inputs, spans=[[s.positions.tolist() for s in row.spans] for row in record.layout.rows])
    decode = method.decode_stage()
    if decode is not None:  # a kv_cache stage (DyCoke): the recorded per-step subsets
        return decode_subset_reference(model, lm_inputs, index, method.positions, steps, decode.layer, record, tokens,
                                       then)
    specs = method.stages()
    post = {s.layer for s in specs if s.post_attention}
    if post:  # FrameFusion: merging stages selected after a layer's attention, one position policy
        stages = _changing(record)
        return stages_reference(model, lm_inputs, [(s.layer, s.index, s.added) for s in stages],
                                method.positions, steps, tokens, then, post_attention=post,
                                merged=[s.merged for s in stages], layout=record.layout)
    if len(specs) > 1 and specs[0].stage.value == "pre_llm" and any(s.merged for s in record.stages[1:]):
        return merging_stages_reference(model, method, lm_inputs, record, steps, tokens, then)
    if not merging:  # a merging vision stage's merged embeddings come from the recomputed tower instead
        lm_inputs = with_merges(lm_inputs, record)
    if specs[0].stage.value in ("pre_llm", "vision") and len(specs) == 1:
        return pre_llm_reference(model, lm_inputs, index, method.positions, steps, tokens, then)
    # one layer stage that added tokens (SparseVLM's recycled tokens when ``layers`` names a single stage): the
    # staged reference, which places them
    added = record is not None and any(getattr(s, "added", None) for s in record.stages)
    if len(specs) > 1 or added:
        stages = _changing(record)
        by_layer = {(s.stage.value, s.layer): s for s in specs}
        done = [by_layer.get((s.stage, s.layer)) for s in stages]
        return stages_reference(model, lm_inputs, [(s.layer, s.index, s.added) for s in stages],
                                method.positions, steps, tokens, then,
                                policies=[d.positions if d is not None else None for d in done],
                                slice_earlier=[d.slice_from if d is not None and d.slice_earlier else None
                                               for d in done])
    return layer_reference(model, lm_inputs, index, specs[0].layer, method.positions, steps, tokens, then)


def merging_stages_reference(model, method, lm_inputs, record, steps, tokens=None, then=None):
    """A pre_llm stage then layer stages that replace hidden states (HoliTom): the pre_llm stage's merged
    embeddings at the input, each layer stage's recorded states at its layer, each stage's own position policy."""
    first = record.stages[0]
    if first.merged:
        embeds = lm_inputs["embeds"].clone()
        for b, (row, tokens_) in enumerate(zip(record.layout.rows, first.merged)):
            if len(tokens_.kept):
                embeds[b, row.visual_positions[tokens_.kept]] = tokens_.embeds.to(embeds.dtype)
        lm_inputs = dict(lm_inputs, embeds=embeds)
    stages, policies = [], []
    for spec, stage in zip(method.stages(), record.stages):
        replaced = None
        if stage.stage == "layer" and stage.merged:
            replaced = [{int(row.visual_positions[k]): e for k, e in zip(m.kept.tolist(), m.embeds)}
                        if len(m.kept) else {} for row, m in zip(record.layout.rows, stage.merged)]
        stages.append((stage.layer, stage.index, stage.added, replaced))
        own = spec.positions or method.positions
        policies.append("keep" if stage.stage == "layer" and own == "original" else own)
    return stages_reference(model, lm_inputs, stages, policies, steps, tokens, then)


def _changing(record) -> list:
    """The record's stages that changed the sequence: a stage that removed nothing reports the layout it left as it
    was (before any stage: the unpruned one, padding slots included), and the layers after it run as before it."""
    rows = record.layout.rows
    out, before = [], torch.arange(rows[0].length).expand(len(rows), -1)
    for stage in record.stages:
        if stage.index is not None and not (stage.index.shape == before.shape and torch.equal(stage.index, before)):
            out.append(stage)
            before = stage.index
    return out


def decode_subset_reference(model, lm_inputs: dict, index, policy: str, steps: int, layer: int, record,
                            tokens=None, then=None):
    """A ``kv_cache``-stage method (DyCoke): the unpatched decoder layers on the kept prompt (``index``, None: the
    whole prompt), then greedy (or teacher-forced) steps in which layers >= ``layer`` attend only to the visual
    tokens the record lists for that step (``record.decode_steps[t][b]``, the row's visual numbering; None: all),
    every other key as usual; then ``then`` [B, q] in one call (several tokens: every layer sees the whole cache).
    Each layer gets its own explicit additive mask. Returns (prefill logits, step logits ``[B, steps, V]``,
    ``then`` logits or None)."""
    lm = lm_of(model)
    lm_inputs = with_merges(lm_inputs, record)
    B, L = lm_inputs["mask"].shape
    if index is None:  # nothing pruned before decoding: the whole prompt (padding slots -1, as vtr records them)
        index = torch.where(lm_inputs["mask"].bool(), torch.arange(L), -1)
    embeds = gather_seq(lm_inputs["embeds"], index, 0.0)
    mask = gather_seq(lm_inputs["mask"], index, 0).bool()
    positions = _rope_rows(pruned_positions(lm_inputs["positions"], lm_inputs["mask"], index, policy))
    start = _rope_rows(next_positions(lm_inputs, index, policy))
    deepstack = kept_deepstack(lm_inputs, index) if lm_inputs.get("visual_pos_masks") is not None else {}
    visual_slot = torch.full(index.shape, -1)  # slot -> the row's visual id (non-newline tokens only)
    for b, row in enumerate(record.layout.rows):
        ids = {}
        for span in row.spans:
            for j, p in enumerate(span.positions.tolist()):
                if not bool(span.newline[j]):
                    ids[p] = span.offset + j
        for s, p in enumerate(index[b].tolist()):
            if p in ids:
                visual_slot[b, s] = ids[p]
    cache = plain_cache(lm)
    token_types = lm_inputs.get("token_type_ids")
    blocks = None
    if token_types is not None:
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
        blocks = get_block_sequence_ids_for_mask(gather_seq(token_types, index, 0))

    def run(hidden, pos, full, sub, prefill):
        for i, block in enumerate(lm.layers):
            m = sub if (sub is not None and i >= layer) else full
            cos, sin = rope(lm, hidden, pos, i)
            mask = layer_mask(lm, i, m, hidden.shape[1], hidden.dtype, blocks if prefill else None)
            hidden = block(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                           past_key_values=cache, use_cache=True)
            if prefill and deepstack.get("deepstack_visual_embeds") and i < len(deepstack["deepstack_visual_embeds"]):
                hidden = hidden.clone()
                hidden[deepstack["visual_pos_masks"]] += deepstack["deepstack_visual_embeds"][i]
        return model.lm_head(lm.norm(hidden))

    with torch.no_grad():
        prefill = run(embeds, positions, mask, None, True)
        logits, out = prefill[:, -1], []
        for t in range(steps):
            out.append(logits)
            token = logits.argmax(-1) if tokens is None else tokens[:, t]
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            sub = None
            if t < len(record.decode_steps):
                sub = mask.clone()
                for b, chosen in enumerate(record.decode_steps[t]):
                    if chosen is None:
                        continue
                    row = visual_slot[b]
                    dropped = (row >= 0) & ~torch.isin(row, chosen)
                    sub[b, :len(row)] &= ~dropped
            logits = run(model.get_input_embeddings()(token[:, None]), start + t, mask, sub, False)[:, -1]
        chunk = None
        if then is not None:
            mask = torch.cat([mask, mask.new_ones(B, then.shape[1])], 1)
            chunk = run(model.get_input_embeddings()(then), start + steps + torch.arange(then.shape[1]), mask, None,
                        False)
    return prefill, torch.stack(out, 1) if out else None, chunk
