"""The speed bound of a pruning method: the unpatched model running each decoder layer on the tokens the method's
stage for that layer leaves, with nothing chosen (the sequence surgery done by index, from the kept positions the
method reported). What a method costs beyond this is selection and the engine's overhead; what it saves below the
dense model is bounded by it.

Each stage is bounded where it acts: a stage before the language model (``pre_llm``, ``vision``) feeds the model
only its kept tokens; a ``layer`` stage at K runs layers < K on the sequence before it and the rest on its kept
tokens; a post-attention stage at K (FrameFusion) runs layer K-1's MLP block on its kept tokens already; a stage
that cuts the earlier layers' KV caches (PruneVid) cuts them in the bound too. (Feeding only the last stage's kept
tokens from layer 0 would charge a layer method nothing for the full layers its design keeps; running the layers
before a method's first layer stage on the full prompt would ignore its pre-LLM stage.)

The bound runs through the model's own forward (embedding, mask construction, decoder, LM head), prefill and
decoding steps alike, so that its per-call costs are the ones the pruned run pays: hooks on the decoder layers
gather the hidden states before each stage layer and give each layer the mask and rotary embeddings of its stage.
"""
from __future__ import annotations

import torch

from .. import compat
from ..kernels import gather_positions, gather_rows


class LayeredIdeal:
    """Prefill and greedy decoding steps of the unpatched model with tokens dropped before stage layers.

    lm_inputs: what the language model received in the dense prefill: ``embeds`` ``[B, L, D]``, ``mask``
    ``[B, L]`` or None, ``positions`` ``[B, L]`` / ``[R, B, L]`` or None. ``stages``: ``[(layer, index)]`` in order,
    each index ``[B|1, L']`` as ``handle.last.stages[s].index`` (original prompt positions, ascending per row; -1
    for padding; ``-2 - a`` for a token a merging stage added: the bound runs it as a copy of a kept token, which
    costs the same); a stage at layer 0 is one before the language model (the model is fed its kept tokens). Or
    ``index`` and ``layer`` for a single stage. ``post_attention``: the stage layers whose stage selects inside the
    layer before (its MLP block runs on the kept tokens); ``slice_earlier``: the stage layers that cut the KV caches
    of the layers before them to their kept tokens once the prefill filled them; ``slice_from``: per such stage
    layer, the first layer it cuts (default 0; MustDrop leaves the layers before its first pruning layer - 1 whole). Kept tokens keep their original
    positions (the cost does not depend on the numbering). Qwen3-VL's DeepStack additions to the first layers'
    visual states are left out (three additions of ``[n, D]`` per prefill: a bound slightly under the true one).

    Use as a context manager (the hooks are on the model while it is open)::

        with LayeredIdeal(model, lm_inputs, stages=[(0, kept), (8, kept_8)]) as ideal:
            logits = ideal.prefill()
            logits = ideal.step(logits.argmax(-1, keepdim=True))
    """

    def __init__(self, model, lm_inputs: dict, index: torch.Tensor | None = None, layer: int | None = None,
                 stages: list | None = None, post_attention=(), slice_earlier=(), slice_from: dict | None = None):
        self.model, self.lm = model, compat.text_model(model)
        embeds = lm_inputs["embeds"]
        B, L = embeds.shape[:2]
        device = embeds.device
        mask = lm_inputs["mask"]
        full_mask = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=device)
        raw = lm_inputs["positions"]
        raw = raw if raw is not None else torch.arange(L, device=device).expand(B, L)
        stages = list(stages if stages is not None else [(layer, index)])
        first = None
        if stages and stages[0][0] == 0:  # before the language model: fed the kept tokens
            _, first = stages.pop(0)
            first = first.expand(B, -1)
        ids0 = first if first is not None else torch.arange(L, device=device).expand(B, L)
        self.inputs = {"inputs_embeds": gather_rows(embeds, ids0) if first is not None else embeds,
                       "attention_mask": self._mask_of(ids0, full_mask).long(),
                       "position_ids": gather_positions(raw, ids0) if first is not None else raw}
        self.layers = [k for k, _ in stages]
        self.post_attention = {k for k in self.layers if k in set(post_attention)}
        self.slice_earlier = {k for k in self.layers if k in set(slice_earlier)}
        self.slice_from = {k: (slice_from or {}).get(k, 0) for k in self.slice_earlier}
        if self.post_attention & self.slice_earlier:
            raise ValueError("a stage cannot both select after attention and cut the earlier caches")
        # per group g (0: the model's input, g: after the g-th layer stage): its tokens' 2-D mask, where each token
        # sits in group 0's sequence (its rotary embedding there: positions are original) and in the group before
        self.masks, self.locals, self.gathers = [self._mask_of(ids0, full_mask)], [None], []
        previous = ids0
        for _, ids in stages:
            ids = ids.expand(B, -1)
            self.masks.append(self._mask_of(ids, full_mask))
            self.gathers.append(_slots_in(previous, ids))
            self.locals.append(_slots_in(ids0, ids))
            previous = ids
        self.next_ids = self.inputs["position_ids"][..., -1:] + 1  # decoding continues after the prompt
        self.n_layers = len(compat.decoder_layers(self.lm))
        self.cache, self.generated, self._prefill, self._memo, self._block = None, 0, False, {}, {}
        self._handles = []

    @staticmethod
    def _mask_of(ids: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
        real = torch.where(ids >= 0, ids, 0)
        return (ids != -1) & gather_rows(full_mask.unsqueeze(-1), real, True).squeeze(-1)

    # ---------------------------------------------------------------------------------------------- hooks
    def __enter__(self) -> "LayeredIdeal":
        layers = compat.decoder_layers(self.lm)
        start = 0 if self.slice_earlier else min(self.layers, default=self.n_layers)
        for i in range(start, self.n_layers):
            self._handles.append(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for k in self.post_attention:
            layer = layers[k - 1]
            self._handles.append(compat.feed_forward_norm(layer).register_forward_pre_hook(self._block_hook(k)))
            self._handles.append(layer.register_forward_hook(self._block_output(k)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _group(self, i: int) -> int:
        """The group decoder layer ``i`` runs on (its KV cache's layout): after the prefill, a layer before a stage
        that cut the earlier caches runs on that stage's tokens."""
        g = sum(k <= i for k in self.layers)
        if not self._prefill:
            later = [n + 1 for n, k in enumerate(self.layers)
                     if k in self.slice_earlier and self.slice_from[k] <= i < k]
            g = max([g] + later)
        return g

    def _substitute(self, i: int, g: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        mask2d = self.masks[g]
        if not self._prefill:
            mask2d = torch.cat([mask2d, mask2d.new_ones(mask2d.shape[0], self.generated + hidden.shape[1])], 1)
        if (g, "mask") not in self._memo:  # the layers of one group share a cache length, so a mask
            self._memo[g, "mask"] = compat.causal_mask(self.lm, i, hidden, mask2d, self.cache)
        kwargs["attention_mask"] = self._memo[g, "mask"]
        if self._prefill:
            if (g, "rope") not in self._memo:
                self._memo[g, "rope"] = tuple(gather_rows(t, self.locals[g]) for t in kwargs["position_embeddings"])
            kwargs["position_embeddings"] = self._memo[g, "rope"]
            positions = kwargs.get("position_ids")
            if isinstance(positions, torch.Tensor) and positions.shape[-1] == self.masks[0].shape[1]:
                kwargs["position_ids"] = gather_positions(positions, self.locals[g])
        return kwargs

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            g = self._group(i)
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._prefill and i in self.layers and i not in self.post_attention:
                hidden = gather_rows(hidden, self.gathers[g - 1])
                if i in self.slice_earlier:
                    self._slice(g)
            if g == 0:
                return None
            kwargs = self._substitute(i, g, hidden, kwargs)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs
        return hook

    def _slice(self, g: int) -> None:
        """Cut the KV caches of the layers before stage ``g`` (just filled by the prefill; from its ``slice_from``)
        to its tokens."""
        for j in range(self.slice_from[self.layers[g - 1]], self.layers[g - 1]):
            # its cache's layout: the group it ran on, or the last earlier stage that cut it (MustDrop's stages)
            h = max([sum(k <= j for k in self.layers)] + [n + 1 for n, k in enumerate(self.layers[:g - 1])
                                                          if k in self.slice_earlier and self.slice_from[k] <= j < k])
            compat.gather_cache_layer(self.cache, j, self._between(h, g))

    def _between(self, h: int, g: int) -> torch.Tensor:
        """``[B, L_g]``: the slot of each token of group ``g`` in group ``h``'s sequence (``h <= g``)."""
        select = None
        for s in range(h, g):
            step = self.gathers[s].clamp(min=0)
            select = step if select is None else select.gather(1, step)
        return select

    def _block_hook(self, k: int):
        def hook(module, args):
            if not self._prefill or self._block.get("busy"):
                return None
            layer = compat.decoder_layers(self.lm)[k - 1]
            g = self.layers.index(k) + 1
            hidden = gather_rows(args[0], self.gathers[g - 1])
            self._block["busy"] = True
            try:
                self._block[k] = compat.feed_forward_block(layer, hidden)
            finally:
                self._block["busy"] = False
            return (args[0][:, -1:],) + tuple(args[1:])
        return hook

    def _block_output(self, k: int):
        def hook(module, args, output):
            out = self._block.pop(k, None)
            if out is None:
                return None
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    # ---------------------------------------------------------------------------------------------- runs
    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Last-position logits ``[B, V]`` of the prompt, through the model's forward; starts a new KV cache."""
        self.cache, self.generated, self._memo, self._prefill = compat.new_cache(self.lm), 0, {}, True
        try:
            out = self.model(**self.inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            self._prefill = False
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decoding step on ``token`` ``[B, 1]`` through the model's forward: logits ``[B, V]``. Positions
        continue after the unpruned prompt in every layer."""
        self._memo = {}
        zero = self.masks[self._group(0)]
        mask = torch.cat([zero, zero.new_ones(zero.shape[0], self.generated + 1)], 1).long()
        positions = self.next_ids + self.generated
        out = self.model(input_ids=token, past_key_values=self.cache, use_cache=True, attention_mask=mask,
                         position_ids=positions)
        self.generated += 1
        return out.logits[:, -1]


def _slots_in(previous: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L']``: where each token of ``ids`` sits in a sequence laid out as ``previous`` (-1: padding; a token
    not in ``previous``, one a merging stage added, reads slot 0)."""
    out = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        where = {p: j for j, p in enumerate(previous[b].tolist()) if p != -1}
        out[b] = torch.tensor([-1 if p == -1 else where.get(p, 0) for p in ids[b].tolist()])
    return out
