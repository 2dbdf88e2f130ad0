"""The ``pre_llm`` stage: the language model's inputs replaced by the pruned sequence, and its
decoding masks."""
from __future__ import annotations

import threading

import torch

from .. import compat, kernels
from ..methods.base import BEFORE_LM, Stage
from ..report import PrefillRecord
from .core import ForwardState, RequestState, SeqLayout, deepstack_inputs, shift_positions


class PreLLMStage:
    """Part of ``Engine`` (see ``vtr.engine``)."""

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
        mapping = isinstance(mask_in, dict)  # the base model built the masks (Gemma 3): start from its 2-D mask
        if mapping:
            mask_in = fwd.inputs.get("attention_mask")
        valid = mask_in.bool() if mask_in is not None else torch.ones(B, L, dtype=torch.bool, device=device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(L, device=device).expand(B, L)
        elif positions.shape[-2] != B:
            positions = positions.expand(*positions.shape[:-2], B, L)
        fwd.layout = self.family.layout(self.model, fwd.inputs, hidden, positions)
        fwd.lm_embeds = hidden
        if kwargs.get("visual_pos_masks") is not None and kwargs.get("deepstack_visual_embeds") is not None:
            fwd.deepstack = (kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])
        fwd.vision = self._vision.get(threading.get_ident())
        if fwd.vision is not None:
            fwd.expansion = self._expansion.get(threading.get_ident(), 1)
            if B % fwd.expansion:
                raise RuntimeError(f"vtr: generate() repeated its visual encodings {fwd.expansion} times but the "
                                   f"prefill has {B} rows")
        arange = torch.arange(L, device=device).expand(B, L)
        base = SeqLayout(index=arange, local=arange, mask2d=valid, positions=positions,
                         shift=torch.zeros(B, dtype=torch.long, device=device))
        request = RequestState(prompt_length=L, base=base, added=[[] for _ in range(B)],
                               record=PrefillRecord(n_visual=fwd.layout.n_visual, layout=fwd.layout,
                                                    n_layers=len(compat.decoder_layers(self.lm)),
                                                    nominal_retention=self.method.nominal_retention))
        request.length_layer = compat.length_layer(self.lm)
        if self.family.bidirectional_blocks:
            request.blocks = self.family.block_ids(self.model, fwd.inputs)
        if self.method.keep is not None:  # a layer-averaged keep out of the schedule's reach, before any layer runs
            for row in fwd.layout.rows:
                for span in row.spans:
                    self.method.check_layer_average(request.record.n_layers, span.n)
        fwd.request, fwd.cache = request, cache
        if cache is not None:
            with self._lock:
                self._requests[cache] = request
        spec = self.specs[0]
        if spec.stage in BEFORE_LM:
            if spec.stage is Stage.VISION and fwd.vision is not None and fwd.vision.stage is not None:
                request.record.vision_tokens = fwd.vision.stage.history
                request.record.vision_merges = getattr(fwd.vision.stage, "merges", None) or None
                request.record.selection_seconds += fwd.vision.stage.seconds
            pruned = self._prune(fwd, spec, base, hidden)
            if pruned is not None:
                layout, select, merged, _ = pruned
                levels = kwargs.get("deepstack_visual_embeds")
                if merged:  # merged tokens take their slot with their new embedding (and DeepStack features)
                    hidden = hidden.clone()
                    rank = None
                    for b, slots, embeds, deepstack in merged:
                        hidden[b, slots] = embeds.to(hidden.dtype)
                        if deepstack is not None:
                            masks = kwargs["visual_pos_masks"]
                            if rank is None:
                                rank = masks.flatten().long().cumsum(0).view_as(masks) - 1
                                levels = [level.clone() for level in levels]
                            rows = rank[b, slots.to(rank.device)]
                            for level, features in zip(levels, deepstack.split(hidden.shape[-1], -1)):
                                level[rows.to(level.device)] = features.to(level)
                kwargs["inputs_embeds"] = kernels.gather_rows(hidden, select)
                kwargs["attention_mask"] = layout.mask2d.to(mask_in.dtype if mask_in is not None else torch.long)
                if mapping:  # the masks of the pruned sequence, each image block bidirectional over its kept tokens
                    kwargs["attention_mask"] = compat.mask_mapping(self.lm, kwargs["inputs_embeds"], layout.mask2d,
                                                                   cache, request.layout_blocks(layout))
                kwargs["position_ids"] = layout.positions
                if kwargs.get("visual_pos_masks") is not None:
                    masks, embeds = deepstack_inputs(kwargs["visual_pos_masks"], levels, select)
                    kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = masks, embeds
        return kwargs

    def _lm_decode(self, fwd: ForwardState, kwargs) -> dict:
        request = fwd.request
        mask_in = kwargs.get("attention_mask")
        mapping = isinstance(mask_in, dict)  # the base model built the masks (Gemma 3): start from its 2-D mask
        if mapping:
            mask_in = fwd.mask2d
        if mask_in is not None and not (isinstance(mask_in, torch.Tensor) and mask_in.dim() == 2):
            raise ValueError("vtr needs a 2-D attention mask (or none) when decoding a pruned cache")
        hidden = kwargs.get("inputs_embeds")
        q_len = hidden.shape[1] if hidden is not None else kwargs["input_ids"].shape[1]
        # Mask columns of the tokens after the prompt (generated so far plus this step): [B, t + q_len]. Taken
        # before any layer runs, since layer 0's cache grows during this forward.
        if mask_in is not None:
            fwd.decode_tail = mask_in[:, request.prompt_length:].bool()
        else:
            generated = compat.cache_length(fwd.cache) - request.cache_prompt_length
            B = request.base.index.shape[0]
            fwd.decode_tail = torch.ones(B, generated + q_len, dtype=torch.bool, device=request.base.index.device)
        first = request.layouts[0] if request.layouts else None
        zero = request.layout_at(0)  # what the layer-0 cache holds: the pre-LLM layout, or a layer stage's that
        if zero is request.base:     # cut the earlier caches
            return kwargs
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([zero.mask2d, fwd.decode_tail], 1).to(
            mask_in.dtype if mask_in is not None else torch.long)
        if mapping:  # new tokens are text: causal (and windowed) over the pruned cache, no block to keep
            probe = hidden if hidden is not None else torch.zeros(
                zero.mask2d.shape[0], q_len, 1, dtype=next(self.lm.parameters()).dtype, device=zero.mask2d.device)
            kwargs["attention_mask"] = compat.mask_mapping(self.lm, probe, kwargs["attention_mask"], fwd.cache)
        if first.stage is Stage.PRE_LLM and first.policy == "compact" and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = shift_positions(kwargs["position_ids"], first.shift)
        return kwargs
