"""The speed bound of a layer-stage method: the unpatched decoder layers, the first K on the full sequence and the
rest on the kept tokens (the sequence surgery done once, by index, with nothing chosen). What a layer method
costs beyond this is selection and the engine's overhead; what it saves below the dense model is bounded by it.
(Feeding only the kept tokens from layer 0, the pre-LLM ideal, would charge a layer method for the K full
layers its design keeps.)
"""
from __future__ import annotations

import torch

from .. import compat
from ..kernels import gather_positions, gather_rows


def _rope_rows(positions: torch.Tensor) -> torch.Tensor:
    # Qwen's language model takes 4-row position ids (text row first); RoPE reads the 3 M-RoPE rows.
    return positions[1:] if positions.dim() == 3 and positions.shape[0] == 4 else positions


class LayeredIdeal:
    """Prefill and greedy decode steps over the unpatched decoder layers with tokens dropped before stage layers.

    lm_inputs: what the language model received in the dense prefill: ``embeds`` ``[B, L, D]``, ``mask``
    ``[B, L]`` or None, ``positions`` ``[B, L]`` / ``[R, B, L]`` or None. index: ``[B|1, L']`` kept slots of the
    prompt (ascending; -1 for padding), dropped before ``layer``; or ``stages``: ``[(layer, index)]`` in order,
    each index as ``handle.last.stages[s].index`` (original prompt positions; ``-2 - a`` for a token a merging
    stage added: the bound runs it as a copy of a kept token, which costs the same); a stage may carry a third
    element, ``cut_from``: once the prefill reaches it, the KV caches of layers ``cut_from`` up to its layer are cut
    to its tokens (``StageSpec.slice_earlier``: PruneVid, MustDrop), so that decoding costs what the method's
    does. Kept tokens keep their
    original positions (FastV's and DART's policy; the cost does not depend on the numbering). Qwen3-VL's DeepStack
    additions to the first layers' visual states are left out (three additions of ``[n, D]`` per prefill: a bound
    slightly under the true one)."""

    def __init__(self, model, lm_inputs: dict, index: torch.Tensor | None = None, layer: int | None = None,
                 stages: list | None = None):
        self.model, self.lm = model, compat.text_model(model)
        embeds = lm_inputs["embeds"]
        B, L = embeds.shape[:2]
        mask = lm_inputs["mask"]
        full_mask = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=embeds.device)
        positions = lm_inputs["positions"]
        full_pos = (_rope_rows(positions) if positions is not None
                    else torch.arange(L, device=embeds.device).expand(B, L))
        stages = stages if stages is not None else [(layer, index)]
        self.layers = [stage[0] for stage in stages]
        self.cuts = [stage[2] if len(stage) > 2 else None for stage in stages]
        self.masks, self.positions, self.gathers = [full_mask], [full_pos], []
        previous = torch.arange(L, device=embeds.device).expand(B, L)
        self.ids = [previous]  # per group: the prompt positions its sequence holds
        for _, ids, *_ in stages:
            ids = ids.expand(B, -1)
            self.ids.append(ids)
            real = torch.where(ids >= 0, ids, -1)
            self.gathers.append(_slots_in(previous, ids))
            self.masks.append((ids != -1) & gather_rows(full_mask.unsqueeze(-1), real, True).squeeze(-1))
            self.positions.append(gather_positions(full_pos, real))
            previous = ids
        self.embeds, self.cache = embeds, None
        self.cache_group: list[int] = []  # per layer, after the prefill: the group its KV cache is laid out as

    def _group(self, i: int) -> int:
        return sum(k <= i for k in self.layers)

    def _cut_caches(self, g: int) -> None:
        """Cut the KV caches of layers ``cuts[g - 1]`` up to ``layers[g - 1]`` (already filled) to group ``g``'s
        tokens, as the engine's ``slice_earlier`` does."""
        for j in range(self.cuts[g - 1], self.layers[g - 1]):
            old = self.cache_group[j]
            compat.gather_cache_layer(self.cache, j, _slots_in(self.ids[old], self.ids[g]).clamp(min=0))
            self.cache_group[j] = g

    def _layers(self, hidden: torch.Tensor, positions: list, prefill: bool) -> torch.Tensor:
        lm = self.lm
        emb = compat.rotary_embeddings(lm, hidden, positions[0])
        for i, block in enumerate(compat.decoder_layers(lm)):
            g = self._group(i)
            if i in self.layers:
                if prefill:
                    hidden = gather_rows(hidden, self.gathers[g - 1])
                    if self.cuts[g - 1] is not None:
                        self._cut_caches(g)
                emb = compat.rotary_embeddings(lm, hidden, positions[g])
            if prefill:
                self.cache_group.append(g)
            mask = compat.causal_mask(lm, i, hidden, self.masks[self.cache_group[i]], self.cache)
            hidden = block(hidden, attention_mask=mask, position_embeddings=emb, position_ids=None,
                           past_key_values=self.cache, use_cache=True)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.model.lm_head(lm.norm(hidden[:, -1:]))[:, -1]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Last-position logits ``[B, V]`` of the prompt; starts a new KV cache."""
        self.cache, self.cache_group = compat.new_cache(self.lm), []
        return self._layers(self.embeds, self.positions, True)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decoding step on ``token`` ``[B, 1]``: logits ``[B, V]``. Positions continue after the unpruned
        prompt in every layer."""
        ones = self.masks[0].new_ones(self.masks[0].shape[0], 1)
        self.masks = [torch.cat([m, ones], 1) for m in self.masks]
        step = self.positions[0][..., -1:] + 1
        self.positions = [step] * len(self.positions)
        return self._layers(self.model.get_input_embeddings()(token), self.positions, False)


def _slots_in(previous: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L']``: where each token of ``ids`` sits in a sequence laid out as ``previous`` (-1: padding; a token
    not in ``previous``, one a merging stage added, reads slot 0)."""
    out = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        where = {p: j for j, p in enumerate(previous[b].tolist()) if p != -1}
        out[b] = torch.tensor([-1 if p == -1 else where.get(p, 0) for p in ids[b].tolist()])
    return out
