"""Signals of the decoder layers: attention rows of chosen queries, keys, values and rotary embeddings at
the scoring layer (layer K-1's captured inputs, or the stage layer's own projections), computed for the rows a
method asks for only."""
from __future__ import annotations

import torch

from .. import compat, kernels
from .core import ContextBase


class DecoderSignals(ContextBase):
    """Layer-stage signals (FastV, DART, PyramidDrop, SparseVLM, PruneVid, FrameFusion, HoliTom...)."""

    @property
    def _own_layer(self) -> bool:
        """The method scores with the stage layer's own attention (its input norm and projections applied to the
        stage's hidden states, PyramidDrop) rather than with layer K-1's (FastV, DART)."""
        return "layer_inputs" in self.engine.method.needs

    @property
    def _scoring_layer(self) -> int:
        return self.spec.layer if self._own_layer else self.spec.layer - 1

    def _window_mask(self, slots: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]`` keys within the scoring layer's sliding window of query ``slots`` ``[B]`` (Gemma 3's local
        layers: a query sees itself and the ``W - 1`` slots before it), or None for a layer without window: the
        scores are the attention the layer itself computes."""
        window = compat.sliding_window(self.engine.lm, self._scoring_layer)
        if window is None:
            return None
        keys = torch.arange(self.valid.shape[1], device=self.valid.device)
        slots = slots.to(self.valid.device)[:, None]
        return (keys[None] <= slots) & (keys[None] > slots - window)

    def _attention_inputs(self):
        if self._own_layer:
            if "own" not in self._memo:
                layer = compat.decoder_layers(self.engine.lm)[self.spec.layer]
                h = compat.input_norm(layer)(self.hidden)
                positions = self.prev.positions
                cos, sin = compat.rotary_embeddings(self.engine.lm, h, positions[-3:] if positions.dim() == 3
                                                    else positions, self.spec.layer)
                self._memo["own"] = (compat.self_attention(layer), h, cos, sin)
                # the layer computes the same norm for the tokens the stage keeps: the engine hands it these rows
                self.fwd.own_projections[self.spec.layer] = {"normed": h}
            return self._memo["own"]
        capture = self.fwd.captures.get(self.spec.layer - 1)
        if capture is None:
            raise RuntimeError(f"{self.engine.method.name}: no attention inputs captured at layer "
                               f"{self.spec.layer - 1}; the method must declare needs={{'attention_inputs'}}")
        return capture

    def last_slots(self) -> torch.Tensor:
        """``[B]``: slot of each row's last real token (the prompt's last token, whichever side the padding is)."""
        L = self.valid.shape[1]
        return L - 1 - self.valid.flip(1).long().argmax(1)

    def last_token_attention(self) -> torch.Tensor:
        """``[B, L]``: softmax attention of each row's last real token over all tokens at layer K-1 (at layer K for
        a method that needs ``"layer_inputs"``), mean over heads (in ``score_dtype``; fp32 softmax as eager
        attention does)."""
        if "last_attention" not in self._memo:
            attn, h, _, _ = self._attention_inputs()
            cos, sin = self._rotary()
            rows, last = torch.arange(h.shape[0], device=h.device), self.last_slots().to(h.device)
            q = compat.project_queries(attn, h[rows, last][:, None], cos[rows, last][:, None],
                                       sin[rows, last][:, None])
            window = self._window_mask(last)
            valid = self.valid if window is None else self.valid & window
            scores = kernels.attention_scores(q, self.keys(), valid, compat.attention_scaling(attn), "mean",
                                              dtype=self.score_dtype)
            self._memo["last_attention"] = scores[:, 0]
        return self._memo["last_attention"]

    def last_tokens_attention(self, row: int, n: int) -> torch.Tensor:
        """``[L]``: causal softmax attention of the row's last ``n`` real tokens over the current sequence at the
        scoring layer, mean over heads and those queries, in ``score_dtype`` (FrameFusion's Qwen2-VL score, its
        official ``num=4``); ``n = 1`` is ``last_token_attention()[row]``."""
        if n == 1:
            return self.last_token_attention()[row]
        key = ("last_tokens_attention", row, n)
        if key not in self._memo:
            self._memo[key] = self.attention_rows(row, self.valid[row].nonzero().flatten()[-n:]).mean(0)
        return self._memo[key]

    def attention_rows(self, row: int, queries: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """``[q, L]``: softmax attention of the row's tokens at slots ``queries`` (``[q]``) over the current sequence
        at the scoring layer, causal (a query sees the keys up to its own slot), mean over heads, in
        ``score_dtype``; ``[H, q, L]`` per head with ``per_head``. Only these rows are computed, never the full
        attention matrix."""
        attn, h, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        slots = queries.to(h.device)
        q = compat.project_queries(attn, h[row, slots][None], cos[row, slots][None], sin[row, slots][None])
        score = kernels.reference.attention_scores if per_head else kernels.attention_scores
        reduce, scale = "none" if per_head else "mean", compat.attention_scaling(attn)
        window = self._window_mask(slots)
        if window is not None:  # a sliding layer: each query over its own window
            return torch.cat([score(q[..., j:j + 1, :], self.keys()[row:row + 1],
                                    self.valid[row:row + 1] & window[j:j + 1], scale, reduce,
                                    dtype=self.score_dtype)[0] for j in range(len(slots))], -2)
        scores = score(q, self.keys()[row:row + 1], self.valid[row:row + 1], scale, reduce, q_positions=slots[None],
                       dtype=self.score_dtype)
        return scores[0]

    def unrotated_attention(self, row: int, queries: torch.Tensor, reduce: str = "max") -> torch.Tensor:
        """``[q, L]``: softmax attention of the row's tokens at slots ``queries`` over every real token of the
        current sequence at the scoring layer, from the queries and keys BEFORE the rotary embedding and without
        the causal mask (PruneVid's ``attn_weights_wo_pos``), reduced over heads (``"max"``, ``"mean"``), in
        ``score_dtype`` (fp32 softmax). Only these rows are computed."""
        attn, h, _, _ = self._attention_inputs()
        slots = queries.to(h.device)
        q = compat.project_unrotated(attn, "q", h[row, slots][None])
        projected = self._projected_keys()
        k = (compat.project_unrotated(attn, "k", h[row:row + 1]) if projected is None
             else compat.keys_from_projection(attn, projected[row:row + 1], None, None))
        scores = kernels.reference.attention_scores(q, k, self.valid[row:row + 1].to(h.device),
                                                    compat.attention_scaling(attn), reduce, dtype=self.score_dtype)
        return scores[0]

    def queries(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """``[H, q, d]``: post-RoPE queries of the row's tokens at ``slots`` at the scoring layer (the row's own
        positions), in ``score_dtype``."""
        attn, h, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        slots = slots.to(h.device)
        q = compat.project_queries(attn, h[row, slots][None], cos[row, slots][None], sin[row, slots][None])
        return q[0].to(self.score_dtype)

    def values(self) -> torch.Tensor:
        """``[B, H_kv, L, d]``: the scoring layer's values (before grouped-query repetition), in ``score_dtype``: read
        from the KV cache layer K-1 just filled, else projected from its inputs."""
        if "values" not in self._memo:
            values = None
            if not self._own_layer:
                values = compat.cached_values(self.fwd.cache, self.spec.layer - 1, self.hidden.shape[1])
            if values is None:
                attn, h, _, _ = self._attention_inputs()
                values = compat.project_values(attn, h)
            self._memo["values"] = values.to(self.score_dtype)
        return self._memo["values"]

    def _projected_keys(self) -> torch.Tensor | None:
        """``[B, L, H_kv * d]``: layer K-1's key projection as the layer computed it (before the rotary embedding),
        if captured."""
        return None if self._own_layer else self.fwd.captures.get(("keys", self.spec.layer - 1))

    def rotary_gravity(self, row: int, queries: torch.Tensor) -> torch.Tensor:
        """``[q, L]``: the scaled attention logit an all-ones query at slots ``queries`` and an all-ones key at each
        slot get from the rotary embedding alone, at the scoring layer's positions (SparseVLM+'s "attention
        gravity": a function of the relative offset; it can be near 0 or negative for some offsets)."""
        attn, _, _, _ = self._attention_inputs()
        cos, sin = self._rotary()
        cos, sin = cos[row].to(self.score_dtype), sin[row].to(self.score_dtype)
        half = cos.shape[-1] // 2
        sign = torch.cat([-torch.ones(half), torch.ones(cos.shape[-1] - half)]).to(cos)  # rotate_half(ones)
        rotated = cos + sign * sin  # RoPE applied to an all-ones vector at each slot: [L, d]
        return rotated[queries.to(rotated.device)] @ rotated.T * compat.attention_scaling(attn)

    def keys(self) -> torch.Tensor:
        """``[B, H_kv, L, d]``: post-RoPE keys of layer K-1 (of layer K for ``"layer_inputs"`` methods; before
        grouped-query repetition), rotated at each row's own positions, i.e. as the row alone would have them: read
        from the KV cache when layer K-1 just filled it with those positions, else recomputed from its inputs. (A
        plain forward over a left-padded batch numbers a row from its first padding slot; attention does not care,
        the L1 norm of a key does.)"""
        if "keys" not in self._memo:
            keys = None
            if not self._own_layer and not bool(self.position_offsets().any()):
                keys = compat.cached_keys(self.fwd.cache, self.spec.layer - 1, self.hidden.shape[1])
            if keys is None and self._own_layer:
                attn, h, _, _ = self._attention_inputs()
                projected = compat.key_projection(attn)(h)  # the layer's own key projection, over every token
                self.fwd.own_projections.setdefault(self.spec.layer, {})["keys"] = projected
                keys = compat.keys_from_projection(attn, projected, *self._rotary())
            elif keys is None:  # rows numbered from a padding slot: the layer's own keys, rotated at own positions
                attn, h, _, _ = self._attention_inputs()
                projected = self._projected_keys()
                keys = (compat.project_keys(attn, h, *self._rotary()) if projected is None
                        else compat.keys_from_projection(attn, projected, *self._rotary()))
            self._memo["keys"] = keys
        return self._memo["keys"]

    def _rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[B, L, d]`` of layer K-1 at each row's own positions."""
        if "rotary" not in self._memo:
            _, h, cos, sin = self._attention_inputs()
            offset = self.position_offsets()
            if bool(offset.any()):
                positions = self.prev.positions
                own = (positions[-3:] if positions.dim() == 3 else positions) - offset.view(-1, 1)
                cos, sin = compat.rotary_embeddings(self.engine.lm, h, own, self._scoring_layer)
            B = h.shape[0]
            self._memo["rotary"] = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
        return self._memo["rotary"]

    def position_offsets(self) -> torch.Tensor:
        """``[B]``: how far each row's positions are from the ones the row alone gets (its first real token at 0)."""
        positions = self.prev.positions
        rows = positions[-3:] if positions.dim() == 3 else positions[None]
        first = self.valid.long().argmax(1).to(positions.device)
        return rows[0, torch.arange(len(first), device=positions.device), first]

    def normed_hidden(self) -> torch.Tensor:
        """``[B, L, D]``: the stage's hidden states through the language model's final norm."""
        if "normed" not in self._memo:
            self._memo["normed"] = compat.final_norm(self.engine.lm)(self.hidden)
        return self._memo["normed"]
