"""``layer`` stages: hidden states gathered before a stage layer; every later layer gets the mask,
rotary embeddings and positions of the stage it runs in (prefill and decoding)."""
from __future__ import annotations

import torch

from .. import compat, kernels
from ..methods.base import Stage
from .core import ForwardState, SeqLayout, deepstack_inputs, shift_positions


class LayerStages:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _capture_keys_hook(self, layer: int):
        """The key projection's output of layer ``layer`` (before the rotary embedding) in a prefill: the signals
        rotate it at each row's own positions, or read it unrotated, instead of projecting the keys again."""
        def hook(module, args, output):
            fwd = self._state()
            if fwd is not None and fwd.prefill and fwd.request is not None:
                fwd.captures["keys", layer] = output
            return None
        return hook

    def _capture_hook(self, layer: int):
        def hook(module, args, kwargs):
            fwd = self._state()
            if fwd is not None and fwd.prefill and fwd.request is not None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                cos, sin = kwargs["position_embeddings"]
                fwd.captures[layer] = (module, hidden, cos, sin)
            return None
        return hook

    def _own_projection_hooks(self, reg, layers) -> None:
        """A method scoring with a stage layer's own input norm and key projection (``"layer_inputs"``: PyramidDrop)
        computes them over the whole sequence before the stage prunes; the layer would then compute them again for
        the tokens kept. Instead, once per prefill, a pre-hook hands the norm (and the projection) one row of its
        input (negligible work) and a forward hook returns the kept rows of what the signal computed (the same
        rows: both are row-wise)."""
        for spec in self.specs:
            if spec.stage is Stage.LAYER:
                layer = layers[spec.layer]
                for name, module in (("normed", compat.input_norm(layer)),
                                     ("keys", compat.key_projection(compat.self_attention(layer)))):
                    reg(module.register_forward_pre_hook(self._reuse_input(spec.layer, name)))
                    reg(module.register_forward_hook(self._reuse_output(spec.layer, name)))

    def _reuse_input(self, i: int, name: str):
        def hook(module, args):
            fwd = self._state()
            entry = fwd.reuse.get(i) if fwd is not None and fwd.prefill else None
            if entry is None or name not in entry[1] or not args:
                return None
            select, own = entry
            full = own.pop(name)
            if not own:
                del fwd.reuse[i]
            rows = full if select is None else kernels.gather_rows(full, select)
            if rows.shape[:2] != args[0].shape[:2]:
                return None
            fwd.reuse["out", i, name] = rows
            return (args[0][:, :1],) + tuple(args[1:])
        return hook

    def _reuse_output(self, i: int, name: str):
        def hook(module, args, output):
            fwd = self._state()
            return fwd.reuse.pop(("out", i, name), None) if fwd is not None else None
        return hook

    def _post_attention_hooks(self, reg, layers) -> None:
        """Post-attention stages at K: a pre-hook on layer K-1's feed-forward norm selects on the post-attention
        residual stream, gathers it and runs the layer's MLP block on the pruned sequence itself; the layer's own
        norm and MLP then get one token (negligible work) and a forward hook on the layer returns the pruned
        block's output instead of the layer's."""
        for spec in self.specs:
            if spec.stage is Stage.LAYER and spec.post_attention:
                layer = layers[spec.layer - 1]
                norm = compat.feed_forward_norm(layer)
                reg(norm.register_forward_pre_hook(self._post_attention_hook(spec, layer)))
                reg(layer.register_forward_hook(self._block_output_hook(spec.layer - 1)))

    def _post_attention_hook(self, spec, layer):
        def hook(module, args):
            fwd = self._state()
            if fwd is None or fwd.request is None or not fwd.prefill or fwd.in_block:
                return None
            hidden = args[0]
            pruned = self._prune(fwd, spec, fwd.request.final(), hidden)
            fwd.captures.pop(spec.layer - 1, None)
            fwd.captures.pop(("keys", spec.layer - 1), None)
            if pruned is None:
                return None
            new, select, merged, added = pruned
            hidden = self._gathered(hidden, select, merged, added)
            fwd.in_block = True
            try:
                fwd.block_outputs[spec.layer - 1] = compat.feed_forward_block(layer, hidden)
            finally:
                fwd.in_block = False
            fwd.current = new  # what the layer's output is laid out as (Qwen3-VL's DeepStack reads it)
            return (args[0][:, -1:],) + tuple(args[1:])
        return hook

    def _block_output_hook(self, i: int):
        def hook(module, args, output):
            fwd = self._state()
            out = fwd.block_outputs.pop(i, None) if fwd is not None else None
            if out is None:
                return None
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    @staticmethod
    def _gathered(hidden, select, merged, added):
        """The next layout's states: merged tokens take their new state in their slot, added tokens are appended,
        then the slots of ``select`` are gathered."""
        if merged:  # merged tokens keep their slot with their new state
            hidden = hidden.clone()
            for b, slots, embeds, _ in merged:  # DeepStack features: pre_llm stages only (checked)
                hidden[b, slots] = embeds.to(hidden.dtype)
        return kernels.gather_rows(hidden if added is None else torch.cat([hidden, added], 1), select)

    def _layer_hook(self, i: int):
        stage_at = {spec.layer: spec for spec in self.specs if spec.stage is Stage.LAYER and not spec.post_attention}

        def hook(module, args, kwargs):
            fwd = self._state()
            if fwd is None or fwd.request is None:
                return None
            request = fwd.request
            hidden = args[0] if args else kwargs["hidden_states"]
            if fwd.prefill and i in stage_at:
                prev = request.final()
                spec = stage_at[i]
                earlier = [request.layout_at(j) for j in range(spec.slice_from, i)] if spec.slice_earlier else None
                pruned = self._prune(fwd, spec, prev, hidden)
                fwd.captures.pop(i - 1, None)  # layer i-1's attention inputs: no later stage reads them
                fwd.captures.pop(("keys", i - 1), None)
                own = fwd.own_projections.pop(i, None)
                if pruned is not None:
                    layout, select, merged, added = pruned
                    hidden = self._gathered(hidden, select, merged, added)
                    if earlier is not None:
                        self._slice_earlier(fwd, layout, earlier, added is not None, spec.slice_from)
                    if own and not merged and added is None:
                        fwd.reuse[i] = (select, own)
                elif own:
                    fwd.reuse[i] = (None, own)
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

    def _slice_earlier(self, fwd: ForwardState, layout: SeqLayout, earlier: list, added: bool, start: int = 0):
        """Cut the KV caches of layers ``start`` to the one before a ``slice_earlier`` stage (just filled by the
        prefill, layer ``start + j`` laid out as ``earlier[j]``) down to ``layout``'s slots; from then on those
        layers run on ``layout`` too."""
        if added:
            raise RuntimeError(f"{self.method.name}: a stage that cuts the earlier KV caches cannot add tokens")
        layout.earlier, layout.earlier_from = True, start
        if fwd.cache is None:
            return
        memo = {}
        for j, old in enumerate(earlier):
            if id(old) not in memo:
                B, width = old.index.shape[0], int(old.index.max()) + 1
                inverse = torch.zeros(B, max(width, 1), dtype=torch.long, device=old.index.device)
                rows, slots = (old.index >= 0).nonzero(as_tuple=True)
                inverse[rows, old.index[rows, slots]] = slots
                index = layout.index.to(inverse.device)
                memo[id(old)] = torch.where(index >= 0, inverse.gather(1, index.clamp(min=0)), 0)
            compat.gather_cache_layer(fwd.cache, start + j, memo[id(old)])

    def _substitute(self, fwd: ForwardState, i: int, active: SeqLayout, hidden: torch.Tensor, kwargs: dict):
        """Give layer ``i`` the mask, rotary embeddings and positions of the pruned sequence it runs on. Masks and
        rotary embeddings are per layer type (Gemma 3's sliding and global layers differ in both): one per
        (layout, type), built for the first such layer (the layers of a type that run on one layout hold equal
        caches). In the prefill each image block stays bidirectional over its kept tokens."""
        key, kind = id(active), compat.layer_type(self.lm, i)
        compact = active.policy == "compact"
        if fwd.prefill:
            if (key, "mask", kind) not in fwd.memo:
                fwd.memo[key, "mask", kind] = compat.causal_mask(self.lm, i, hidden, active.mask2d, fwd.cache,
                                                                 fwd.request.layout_blocks(active))
            if (key, "rope", kind) not in fwd.memo:
                if compact:
                    rope = compat.rotary_embeddings(self.lm, hidden, active.positions, i)
                else:
                    rope = tuple(kernels.gather_rows(t, active.local) for t in kwargs["position_embeddings"])
                fwd.memo[key, "rope", kind] = rope
            positions = kwargs.get("position_ids")
            if isinstance(positions, torch.Tensor) and positions.shape[-1] == fwd.request.lm_input_length:
                if (key, "pos") not in fwd.memo:
                    fwd.memo[key, "pos"] = (active.positions if compact
                                            else kernels.gather_positions(positions, active.local))
                kwargs["position_ids"] = fwd.memo[key, "pos"]
        else:
            if (key, "mask", kind) not in fwd.memo:
                mask2d = torch.cat([active.mask2d, fwd.decode_tail], 1)
                fwd.memo[key, "mask", kind] = compat.causal_mask(self.lm, i, hidden, mask2d, fwd.cache)
            if compact:
                if (key, "pos") not in fwd.memo:
                    positions = kwargs.get("position_ids")
                    if positions is None:
                        raise ValueError("vtr: compact positions need position_ids when decoding")
                    # a pre-LLM (or vision) stage's shift is already in the language model's positions
                    first = fwd.request.layouts[0]
                    done = first.shift if first.stage is Stage.PRE_LLM else 0
                    fwd.memo[key, "pos"] = shift_positions(positions.expand(hidden.shape[0], -1), active.shift - done)
                if (key, "rope", kind) not in fwd.memo:
                    fwd.memo[key, "rope", kind] = compat.rotary_embeddings(self.lm, hidden, fwd.memo[key, "pos"], i)
                kwargs["position_ids"] = fwd.memo[key, "pos"]
        kwargs["attention_mask"] = fwd.memo[key, "mask", kind]
        if (key, "rope", kind) in fwd.memo:
            kwargs["position_embeddings"] = fwd.memo[key, "rope", kind]

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
