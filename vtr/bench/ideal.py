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
    """Prefill and greedy decode steps over the unpatched decoder layers with tokens dropped before layer ``layer``.

    lm_inputs: what the language model received in the dense prefill: ``embeds`` ``[B, L, D]``, ``mask``
    ``[B, L]`` or None, ``positions`` ``[B, L]`` / ``[R, B, L]`` or None. index: ``[B|1, L']`` kept slots of the
    prompt (ascending; -1 for padding). Kept tokens keep their original positions (FastV's and DART's policy).
    Qwen3-VL's DeepStack additions to the first layers' visual states are left out (three additions of ``[n, D]``
    per prefill: a bound slightly under the true one)."""

    def __init__(self, model, lm_inputs: dict, index: torch.Tensor, layer: int):
        self.model, self.lm, self.layer = model, compat.text_model(model), layer
        embeds = lm_inputs["embeds"]
        B, L = embeds.shape[:2]
        self.index = index.expand(B, -1)
        mask = lm_inputs["mask"]
        self.full_mask = (mask.bool() if mask is not None
                          else torch.ones(B, L, dtype=torch.bool, device=embeds.device))
        positions = lm_inputs["positions"]
        self.full_pos = (_rope_rows(positions) if positions is not None
                         else torch.arange(L, device=embeds.device).expand(B, L))
        self.kept_mask = gather_rows(self.full_mask.unsqueeze(-1), self.index, False).squeeze(-1)
        self.kept_pos = gather_positions(self.full_pos, self.index)
        self.embeds, self.cache = embeds, None

    def _layers(self, hidden: torch.Tensor, full_pos, kept_pos, prefill: bool) -> torch.Tensor:
        lm = self.lm
        emb = compat.rotary_embeddings(lm, hidden, full_pos)
        for i, block in enumerate(compat.decoder_layers(lm)):
            if i == self.layer:
                if prefill:
                    hidden = gather_rows(hidden, self.index)
                emb = compat.rotary_embeddings(lm, hidden, kept_pos)
            mask2d = self.full_mask if i < self.layer else self.kept_mask
            mask = compat.causal_mask(lm, i, hidden, mask2d, self.cache)
            hidden = block(hidden, attention_mask=mask, position_embeddings=emb, position_ids=None,
                           past_key_values=self.cache, use_cache=True)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.model.lm_head(lm.norm(hidden[:, -1:]))[:, -1]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Last-position logits ``[B, V]`` of the prompt; starts a new KV cache."""
        self.cache = compat.new_cache(self.lm)
        return self._layers(self.embeds, self.full_pos, self.kept_pos, True)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decoding step on ``token`` ``[B, 1]``: logits ``[B, V]``. Positions continue after the unpruned
        prompt in every layer."""
        ones = self.full_mask.new_ones(self.full_mask.shape[0], 1)
        self.full_mask = torch.cat([self.full_mask, ones], 1)
        self.kept_mask = torch.cat([self.kept_mask, ones], 1)
        self.full_pos = self.full_pos[..., -1:] + 1
        self.kept_pos = self.full_pos
        return self._layers(self.model.get_input_embeddings()(token), self.full_pos, self.kept_pos, False)
