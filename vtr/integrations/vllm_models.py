"""vLLM model classes with vtr's pruning (imported by vLLM's model registry, never by ``import vtr``).

Each class is the stock vLLM class when vtr is not configured. Configured (``vtr.integrations.vllm``):

* the processor sizes each image's and video's placeholder run to ``Method.budget`` of its merged-token count,
  from the grid, at prompt time (before any vision pass);
* the model turns on vLLM's multimodal pruning switch (the flag is tied to ``video_pruning_rate > 0``, so vtr sets
  it to a value no code path of these classes reads as a rate, see ``SWITCH``), keeps the tokens
  ``vtr.serving.select_tokens`` chooses, and appends to each kept token its original M-RoPE grid position;
* positions: ``get_mrope_input_positions`` gives every text token its position in the unpruned prompt when the
  prompt is processed, and ``recompute_mrope_positions`` (vLLM's ``SupportsMultiModalPruning``, called by the
  model runner before each forward) places the kept tokens of the runs embedded in that step. A request whose
  image sits in a prefix served from vLLM's prefix cache therefore gets the same positions as one that embeds it.

Written against vLLM 0.32 (``Qwen2_5_VLForConditionalGeneration._postprocess_image_embeds_evs`` /
``_postprocess_video_embeds_evs``, Qwen3-VL's ``_create_final_video_embeddings``).
"""
from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import compute_mrope_for_media
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ..serving import kept_count, select_tokens
from .vllm import REFUSED, configured_method

# The channels appended to each kept token's embedding: its original (t, h, w) grid position relative to its run's
# origin (``recompute_mrope_positions`` strips them).
POSITION_CHANNELS = 3
# What vtr sets ``video_pruning_rate`` to, to turn vLLM's pruning switch on: positive, so that the switch is on;
# so small that a stock EVS count (which these classes replace) would keep every token.
SWITCH = 1e-9


def _method_for(obj, hf_config):
    if not hasattr(obj, "_vtr_method"):
        obj._vtr_method = configured_method(hf_config)
    return obj._vtr_method


# ------------------------------------------------------------------------------------------------- processors
class _KeepCountUpdates:
    """Placeholder runs of the kept length: the stock replacement, cut to the method's keep count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        method = _method_for(self, self.info.get_hf_config())
        if method is None:
            return updates
        return [self._vtr_update(u, method, hf_processor_mm_kwargs, out_mm_kwargs) for u in updates]

    def _vtr_update(self, update, method, hf_processor_mm_kwargs, out_mm_kwargs):
        original = update.replacement

        def replacement(item_idx: int):
            tokens = original(item_idx)  # one placeholder id per merged token
            return tokens[:kept_count(method, len(tokens))]
        return dataclasses.replace(update, replacement=replacement)


class VtrQwen2_5_VLProcessor(_KeepCountUpdates, Qwen2_5_VLMultiModalProcessor):
    pass


class VtrQwen3VLProcessor(_KeepCountUpdates, Qwen3VLMultiModalProcessor):
    """Videos: each frame keeps its timestamp and vision start / end tokens, and the kept tokens of the whole
    video are lumped into the first frame's run, as vLLM's EVS does: the model knows how many of each frame it
    kept only after the vision pass, and rebuilds the frames' runs then (``_create_final_video_embeddings``)."""

    def _vtr_update(self, update, method, hf_processor_mm_kwargs, out_mm_kwargs):
        if update.modality != "video":
            return super()._vtr_update(update, method, hf_processor_mm_kwargs, out_mm_kwargs)
        tokenizer, config = self.info.get_tokenizer(), self.info.get_hf_config()
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size

        def replacement(item_idx: int):
            item = out_mm_kwargs["video"][item_idx]
            t, h, w = (int(x) for x in item["video_grid_thw"].data)
            per_frame = (h // merge) * (w // merge)
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[kept_count(method, t * per_frame)] + [0] * (t - 1),
                timestamps=item["timestamps"].data, tokenizer=tokenizer,
                vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id, select_token_id=False)
        return dataclasses.replace(update, replacement=replacement)


# ----------------------------------------------------------------------------------------------------- models
class _Pruning:
    """What the pruning subclasses share: the switch, and the kept rows of one input with their positions."""

    def _vtr_configure(self, vllm_config) -> None:
        model_config = vllm_config.model_config
        method = configured_method(model_config.hf_config)
        if method is not None:
            if method.positions == "compact":
                raise ValueError(f"vtr: positions='compact' is not defined for {type(self).__name__}, whose M-RoPE "
                                 "gives visual tokens 3-D grid positions; in vLLM kept tokens keep them")
            method = dataclasses.replace(method, positions="original")
            mm_config = model_config.multimodal_config
            if mm_config.is_multimodal_pruning_enabled():
                raise ValueError(f"vtr: --video-pruning-rate {mm_config.video_pruning_rate} turns on vLLM's own video "
                                 f"pruning ({mm_config.video_pruning_method}); with vtr configured ({method.name}) "
                                 "leave it unset: vtr prunes images and videos")
            mm_config.video_pruning_rate = SWITCH
        self._vtr_method = method

    def _vtr_keep(self, emb: torch.Tensor, grid: list[int], kind: str, positions: torch.Tensor):
        """Kept rows of one input's embeddings ``[n, C]`` (the first ``hidden_size`` channels are the language
        model's input; Qwen3-VL appends DeepStack features) and of its ``[n, P]`` positions; the kept indices."""
        merge = self.visual.spatial_merge_size
        t, h, w = (int(x) for x in grid)
        hidden = self.config.text_config.hidden_size
        keep = select_tokens(self._vtr_method, emb[:, :hidden], (t, h // merge, w // merge), kind)
        return emb[keep], positions.to(emb.device)[keep], keep

    def _vtr_full_run(self, feature, run: list[int]) -> list[int]:
        """The placeholder run ``feature`` had before pruning (``run`` itself when it holds every merged token):
        one image / video token per merged token."""
        merge = self.config.vision_config.spatial_merge_size
        n = int(feature.data[f"{feature.modality}_grid_thw"].data.prod()) // merge ** 2
        token = self.config.image_token_id if feature.modality == "image" else self.config.video_token_id
        return run if run.count(token) == n else [token] * n

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """M-RoPE positions at prompt time: every text token gets its position in the unpruned prompt (the stock
        positions of the prompt with each pruned run expanded back to its full length), which is what Hugging
        Face gives it with ``positions="original"``; so does the decoding offset. A pruned run's own tokens get
        provisional positions: which tokens it keeps is known only after the vision pass, when the model runner
        rewrites the run (``recompute_mrope_positions``) before the language model reads it.

        So the positions are right whether or not the vision pass runs for this request: an image or video in a
        prefix served from vLLM's prefix cache is never embedded again, and the text after it must not depend on
        that (it did, when these were provisional, and a multi-turn chat resending an image got wrong answers)."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        full_tokens, full_features, index, cursor, shift = [], [], [], 0, 0
        for feature in features:
            offset, length = feature.mm_position.offset, feature.mm_position.length
            run = self._vtr_full_run(feature, list(input_tokens[offset:offset + length]))
            full_tokens += input_tokens[cursor:offset]
            index += range(cursor + shift, offset + shift)
            start = len(full_tokens)
            full_tokens += run
            full_features.append(dataclasses.replace(
                feature, mm_position=dataclasses.replace(feature.mm_position, offset=start, length=len(run),
                                                         is_embed=None if len(run) != length
                                                         else feature.mm_position.is_embed)))
            index += [start + min(j, len(run) - 1) for j in range(length)]  # provisional, see above
            shift += len(run) - length
            cursor = offset + length
        full_tokens += input_tokens[cursor:]
        index += range(cursor + shift, len(input_tokens) + shift)
        if not shift:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        positions, _ = super().get_mrope_input_positions(full_tokens, full_features)
        return positions[:, index].contiguous(), int(positions.max()) + 1 - len(input_tokens)

    def _vtr_runs(self, ids: list[int]) -> list[tuple[int, int]]:
        """``[start, stop)`` of every visual run of the prompt: maximal runs of image or video tokens."""
        config, runs, i = self.config, [], 0
        visual = (config.image_token_id, config.video_token_id)
        while i < len(ids):
            if ids[i] in visual:
                j = i
                while j < len(ids) and ids[j] == ids[i]:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        return runs

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """The positions of the pruned runs embedded in this step (vLLM's ``SupportsMultiModalPruning``; the model
        runner calls it before every forward, with the embeddings gathered for the step): each kept token's
        original 3-D grid position, carried in the last ``POSITION_CHANNELS`` channels of its embedding relative
        to the run's origin, plus the origin, one past the position of the token before the run (text, whose
        positions ``get_mrope_input_positions`` laid out at prompt time and which this never changes).

        Each embedding is the rest of one run (the runner gathers them in prompt order, the first possibly
        starting inside its run: chunked prefill, or a prefix-cache hit that ends inside the run). Idempotent: a
        request resumed after preemption gets the same positions again. Returns the embeddings without the
        position channels, the positions, and the decoding offset (after the largest position of the prompt)."""
        ids = list(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)
        positions = mrope_positions.clone()
        embeds, cursor, runs = [], num_computed_tokens, None
        with gpu_sync_allowed():
            for mm in multimodal_embeddings:
                embeds.append(mm[:, :-POSITION_CHANNELS])
                if not mm.shape[0]:
                    continue
                runs = self._vtr_runs(ids) if runs is None else runs
                start, stop = next((s, e) for s, e in runs if e > cursor)
                first = max(cursor, start)
                if first + mm.shape[0] > stop:
                    raise RuntimeError(f"vtr: {mm.shape[0]} embeddings from prompt index {first} overrun their "
                                       f"visual run [{start}, {stop})")
                origin = positions[:, start - 1:start] + 1
                positions[:, first:first + mm.shape[0]] = mm[:, -POSITION_CHANNELS:].T.long().to(positions.device) \
                    + origin
                cursor = first + mm.shape[0]
        return embeds, positions, int(positions.max()) + 1 - len(ids)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtrQwen2_5_VL(_Pruning, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with vtr's pruning of images and videos (stock when vtr is not configured)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self._vtr_method is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        merge, out = self.visual.spatial_merge_size, []
        for emb, grid in zip(image_embeds_split, image_input["image_grid_thw"].tolist()):
            emb, positions, _ = self._vtr_keep(emb, grid, "image", compute_mrope_for_media(grid, merge)[:, :3])
            out.append(torch.cat([emb, positions.to(emb.dtype)], dim=1))
        return tuple(out)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._vtr_method is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        merge, out = self.visual.spatial_merge_size, []
        seconds = video_input.get("second_per_grid_ts")
        seconds = [1] * len(video_embeds_split) if seconds is None else seconds.long().tolist()
        per_second = self.config.vision_config.tokens_per_second
        for emb, grid, second in zip(video_embeds_split, video_input["video_grid_thw"].tolist(), seconds):
            # the temporal positions of the HF model: frame index x seconds per frame x tokens per second
            positions = compute_mrope_for_media(grid, merge, tokens_per_second=per_second,
                                                video_second_per_grid=second)[:, :3]
            emb, positions, _ = self._vtr_keep(emb, grid, "video", positions)
            out.append(torch.cat([emb, positions.to(emb.dtype)], dim=1))
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3VL(_Pruning, Qwen3VLForConditionalGeneration):
    """Qwen3-VL (DeepStack) with vtr's pruning of images and videos (stock when vtr is not configured)."""

    def _vtr_full_run(self, feature, run: list[int]) -> list[int]:
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in feature.data[f"{feature.modality}_grid_thw"].data)
        config = self.config
        if feature.modality != "video" or run.count(config.video_token_id) == t * h * w // merge ** 2:
            return super()._vtr_full_run(feature, run)
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[(h // merge) * (w // merge)] * t, timestamps=feature.data["timestamps"].data,
            tokenizer=self._tokenizer, vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id).full

    def __init__(self, *, vllm_config, prefix: str = "model"):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self._vtr_method is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        merge, out = self.visual.spatial_merge_size, []
        for emb, grid in zip(image_embeds_split, image_input["image_grid_thw"].tolist()):
            emb, positions, _ = self._vtr_keep(emb, grid, "image", compute_mrope_for_media(grid, merge)[:, :3])
            out.append(torch.cat([emb, positions.to(emb.dtype)], dim=1))
        return tuple(out)

    def _vtr_runs(self, ids: list[int]) -> list[tuple[int, int]]:
        """Image runs, and each video's whole run: transformers >= 5.10 expands only the video token, so the frames
        (each "<t seconds> <vision_start> tokens <vision_end>", all embedded from the video, see
        ``_create_final_video_embeddings``) lie inside the prompt's own <vision_start> ... <vision_end>: the run
        starts after a <vision_start> that no visual token or <vision_end> follows and ends before the first of
        two consecutive <vision_end>."""
        config, runs, i = self.config, [], 0
        start_id, end_id = config.vision_start_token_id, config.vision_end_token_id
        frame = (config.image_token_id, config.video_token_id, end_id)
        while i < len(ids):
            if ids[i] == start_id and i + 1 < len(ids) and ids[i + 1] not in frame:
                j = i + 2
                while j < len(ids) and not (ids[j] == end_id and ids[j - 1] == end_id):
                    j += 1
                runs.append((i + 1, j))
                i = j
            elif ids[i] == config.image_token_id:
                j = i
                while j < len(ids) and ids[j] == ids[i]:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        return runs

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._vtr_method is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        merge, out = self.visual.spatial_merge_size, []
        for i, (emb, grid) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist())):
            t, h, w = grid
            emb, _, keep = self._vtr_keep(emb, grid, "video", torch.zeros(emb.shape[0], 0))
            retained = torch.zeros(t * (h // merge) * (w // merge), dtype=torch.bool, device=emb.device)
            retained[keep] = True
            per_frame = retained.view(t, -1).sum(1).tolist()
            final = self._create_final_video_embeddings(
                video_embeddings=emb, num_tokens_per_frame=per_frame, timestamps=video_input.timestamps[i],
                video_grid_thw=grid, retention_mask=retained)
            # its 5 position channels: (t, h, w) of every token of the run from the run's start, then vLLM's
            # "is <vision_start>" and "is a video token" flags, which vtr's positions do not need
            out.append(final[:, :-2])
        return tuple(out)


# ---------------------------------------------------------------------------------------------- refused models
def _refusing(arch: str):
    """The stock vLLM class of ``arch``, which refuses to load when vtr is configured (no pruning interface)."""
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS
    module, name = _MULTIMODAL_MODELS[arch]
    base = getattr(__import__(f"vllm.model_executor.models.{module}", fromlist=[name]), name)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        method = configured_method(vllm_config.model_config.hf_config)
        if method is not None:
            raise ValueError(
                f"vtr: {arch} is not supported in vLLM ({method.name} is configured): vLLM's multimodal pruning "
                "interface (SupportsMultiModalPruning: kept tokens with their original M-RoPE positions) exists for "
                "Qwen2.5-VL and Qwen3-VL only; Qwen2-VL lacks it and the LLaVA family uses 1-D positions. Use "
                "vtr.patch with Hugging Face transformers for this model, or unset VTR_METHOD / hf_overrides['vtr']")
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
    return type(f"Refusing{arch}", (base,), {"__init__": __init__, "__module__": __name__})


for _arch in REFUSED:
    globals()[f"Refusing{_arch}"] = _refusing(_arch)
