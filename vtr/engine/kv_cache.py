"""The ``kv_cache`` stage (DyCoke): at every single-token decoding step, layers >= L attend to a subset of the
visual part of their cache that the method chooses from the new token's attention at layer L - 1. The cache keeps
every token (nothing is evicted), so the next step chooses again; the subset is applied as a mask on the layers'
keys, which equals attention over the gathered subset."""
from __future__ import annotations

import torch

from .. import compat, kernels
from .core import ForwardState, RequestState


class KVCacheStage:
    """Part of ``Engine`` (see ``vtr.engine``)."""

    def _attach_decode(self, reg, layers) -> None:
        spec = self.decode_spec
        attn = compat.self_attention(layers[spec.layer - 1])
        reg(attn.register_forward_pre_hook(self._decode_capture, with_kwargs=True))
        for i in range(spec.layer, len(layers)):
            reg(layers[i].register_forward_pre_hook(self._decode_hook(i), with_kwargs=True))

    def _decode_capture(self, module, args, kwargs):
        fwd = self._state()
        if fwd is not None and not fwd.prefill and fwd.request is not None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            fwd.captures["decode"] = (module, hidden, cos, sin)

    def _decode_hook(self, i: int):
        def hook(module, args, kwargs):
            fwd = self._state()
            if fwd is None or fwd.prefill or fwd.request is None or "decode" not in fwd.captures:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != 1:  # a continuation of several tokens attends to the whole cache
                return None
            if "decode_mask2d" not in fwd.memo:
                fwd.memo["decode_mask2d"] = self._decode_subset(fwd)
            mask2d = fwd.memo["decode_mask2d"]
            if mask2d is None:
                return None
            if ("decode_mask", i) not in fwd.memo:  # layers >= L share one cache layout (no layer stage there)
                fwd.memo["decode_mask", i] = compat.causal_mask(self.lm, i, hidden, mask2d, fwd.cache)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = fwd.memo["decode_mask", i]
            return args, kwargs
        return hook

    def _decode_spans(self, request: RequestState) -> list:
        """Per row: (span, ``[n]`` cache slots of its visual tokens present in layers >= L, ``[n]`` their ids)."""
        if request.decode_spans is None:
            layout = request.layout_at(self.decode_spec.layer)
            rows = []
            for b, row in enumerate(request.record.layout.rows):
                where = torch.full((request.prompt_length,), -1, dtype=torch.long)
                index = layout.index[b].cpu()
                real = (index >= 0) & (index < request.prompt_length)
                where[index[real]] = real.nonzero().flatten()
                spans = []
                for span in row.spans:
                    slots = where[span.positions.cpu()]
                    present = slots >= 0
                    if not self.method.newline_candidates:  # newline tokens are never pruned, nor scored
                        present &= ~span.newline.cpu()
                    spans.append((span, slots[present], present.nonzero().flatten()))
                rows.append(spans)
            request.decode_spans = rows
        return request.decode_spans

    def _decode_subset(self, fwd: ForwardState):
        """This step's 2-D key mask for layers >= L (``[B, cache + 1]``), or None when every visual token stays.
        Records the step's subsets in ``handle.last.decode_steps``."""
        request, L = fwd.request, self.decode_spec.layer
        module, h, cos, sin = fwd.captures["decode"]
        q = compat.project_queries(module, h[:, -1:], cos[:, -1:], sin[:, -1:])
        keys = compat.layer_keys(fwd.cache, L - 1)
        before = request.layout_at(L - 1)
        valid = torch.cat([before.mask2d, fwd.decode_tail], 1).to(keys.device)
        if valid.shape[1] != keys.shape[2]:
            raise RuntimeError(f"vtr: layer {L - 1}'s cache holds {keys.shape[2]} tokens, the request stands for "
                               f"{valid.shape[1]}")
        dtype = q.dtype if self.method.score_dtype == "model" else torch.float32
        scores = kernels.attention_scores(q, keys, valid, compat.attention_scaling(module), "mean", dtype=dtype)[:, 0]
        layout = request.layout_at(L)
        keep = layout.mask2d.clone()
        steps, dropped_any = [], False
        for b, spans in enumerate(self._decode_spans(request)):
            kept = []
            for span, slots, ids in spans:
                if not len(slots):
                    continue
                chosen = self.method.select_decode(request.decode_state, b, span, scores[b, slots.to(scores.device)])
                if chosen is None:
                    kept.append(span.offset + ids)
                    continue
                chosen = self._checked(chosen, len(chosen), len(slots))
                drop = torch.ones(len(slots), dtype=torch.bool)
                drop[chosen.cpu()] = False
                keep[b, slots[drop].to(keep.device)] = False
                dropped_any = dropped_any or bool(drop.any())
                kept.append(span.offset + ids[~drop])
            steps.append(torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long))
        request.record.decode_steps.append(steps if dropped_any else [None] * len(steps))
        if not dropped_any:
            return None
        return torch.cat([keep, fwd.decode_tail.to(keep.device)], 1)
