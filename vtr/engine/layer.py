"""``layer`` stages: hidden states gathered before a stage layer; every later layer gets the mask,
rotary embeddings and positions of the stage it runs in (prefill and decoding)."""
from __future__ import annotations

import torch

from .. import compat, kernels
from ..methods.base import Stage
from .core import ForwardState, SeqLayout, deepstack_inputs, shift_positions


class LayerStages:
    """Part of ``Engine`` (see ``vtr.engine``)."""

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
                fwd.captures.pop(i - 1, None)  # layer i-1's attention inputs: no later stage reads them
                if pruned is not None:
                    _, select, merged, added = pruned
                    if merged:  # merged tokens keep their slot and enter layer i with their new state
                        hidden = hidden.clone()
                        for b, slots, embeds in merged:
                            hidden[b, slots] = embeds.to(hidden.dtype)
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
                    # a pre-LLM (or vision) stage's shift is already in the language model's positions
                    first = fwd.request.layouts[0]
                    done = first.shift if first.stage is Stage.PRE_LLM else 0
                    positions = shift_positions(positions.expand(hidden.shape[0], -1), active.shift - done)
                    fwd.memo[key, "pos"] = positions
                    fwd.memo[key, "rope"] = compat.rotary_embeddings(self.lm, hidden, positions)
                kwargs["position_ids"] = fwd.memo[key, "pos"]
        kwargs["attention_mask"] = fwd.memo[key, "mask"]
        if (key, "rope") in fwd.memo:
            kwargs["position_embeddings"] = fwd.memo[key, "rope"]

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
