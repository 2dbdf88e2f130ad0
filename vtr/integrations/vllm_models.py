"""vLLM model classes with vtr's pruning (imported by vLLM's model registry, never by ``import vtr``).

Each class is the stock vLLM class when vtr is not configured. Configured (``vtr.integrations.vllm``):

* the processor sizes each image's and video's placeholder run to ``Method.budget`` of its merged-token count,
  from the grid, at prompt time (before any vision pass);
* the model turns on vLLM's multimodal pruning switch (the flag is tied to ``video_pruning_rate > 0``, so vtr sets
  it to a value no code path of these classes reads as a rate, see ``SWITCH``), keeps the tokens
  ``vtr.serving.select_tokens`` chooses, and appends to each kept token its original M-RoPE position, which the
  model runner restores with ``recompute_mrope_positions`` (vLLM's EVS interface).

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
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, recompute_mrope_positions
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ..serving import kept_count, select_tokens
from .vllm import REFUSED, configured_method

# Qwen3-VL: the 5th position channel of vtr's images (stock: 0 for images, 0/1 "is a video token" for videos).
IMAGE_MARK = -1
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
        if positions.shape[1] == 4:
            # The 4th channel is where recompute_mrope_positions starts the text after the input, counted from the
            # input's start. EVS writes the grid width there; HF (and vLLM's unpruned path) use the largest
            # position of the whole grid + 1, which differs for inputs taller than wide and for long videos.
            positions = positions.clone()
            positions[:, 3] = positions[:, :3].max() + 1
        keep = select_tokens(self._vtr_method, emb[:, :hidden], (t, h // merge, w // merge), kind)
        return emb[keep], positions.to(emb.device)[keep], keep

    # The inputs whose pruned runs the stock get_mrope_input_positions cannot lay out (it assumes full runs).
    _vtr_provisional_for = ("image", "video")

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """M-RoPE positions at prompt time, before the kept tokens are known: 0, 1, 2... on all three axes, of the
        pruned prompt's length. Exact up to the first visual input (as the stock positions are); when an input is
        embedded, the model runner rewrites its run and all text after it (``recompute_mrope_positions``), before
        the language model reads them, chunked prefill included."""
        if self._vtr_method is None or not any(f.modality in self._vtr_provisional_for for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        n = len(input_tokens)
        return torch.arange(n).expand(3, n).clone(), 0


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
            emb, positions, _ = self._vtr_keep(emb, grid, "image", compute_mrope_for_media(grid, merge))
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
                                                video_second_per_grid=second)
            emb, positions, _ = self._vtr_keep(emb, grid, "video", positions)
            out.append(torch.cat([emb, positions.to(emb.dtype)], dim=1))
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3VL(_Pruning, Qwen3VLForConditionalGeneration):
    """Qwen3-VL (DeepStack) with vtr's pruning of images and videos (stock when vtr is not configured)."""

    # Videos: the stock positions lay out EVS's lumped runs, and _get_expanded_positions reads them for the
    # unpruned video (the original 3-D positions of every token, text between frames included).
    _vtr_provisional_for = ("image",)

    def __init__(self, *, vllm_config, prefix: str = "model"):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self._vtr_method is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        merge, out = self.visual.spatial_merge_size, []
        for emb, grid in zip(image_embeds_split, image_input["image_grid_thw"].tolist()):
            positions = compute_mrope_for_media(grid, merge)
            emb, positions, _ = self._vtr_keep(emb, grid, "image", positions)
            mark = torch.full_like(positions[:, :1], IMAGE_MARK)  # 5 channels, as stock; see recompute_...
            out.append(torch.cat([emb, positions.to(emb.dtype), mark.to(emb.dtype)], dim=1))
        return tuple(out)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Stock, except for two things. Images: with 5 channels vLLM starts the text after an image at the
        largest position of its *kept* tokens + 1; HF (and vLLM unpruned) at the largest of the whole grid + 1. So
        an image's channels go to EVS's 4-channel rule instead, whose 4th channel (the text offset) ``_vtr_keep``
        sets to that HF value. Videos keep the 5-channel rule (their embeddings hold the frames' text tokens and
        the original positions of all), with the prompt's outer <vision_start> hidden (below)."""
        if self._vtr_method is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        # transformers >= 5.10 expands only the video token, so a video's frames (each "<t seconds> <vision_start>
        # tokens <vision_end>") sit inside the prompt's own <vision_start> ... <vision_end>. EVS takes the first
        # <vision_start> it finds to be the first frame's, and so places the video's positions as many tokens
        # early as the first timestamp is long; hide the outer one (followed by neither visual tokens nor
        # <vision_end>) from it.
        config = self.config
        following = torch.cat([ids[1:], ids.new_full((1,), -1)])
        inner = torch.tensor([config.image_token_id, config.video_token_id, config.vision_end_token_id],
                             device=device)
        ids = ids.masked_fill((ids == config.vision_start_token_id) & ~torch.isin(following, inner), -1)
        embeds, positions = [], []
        with gpu_sync_allowed():
            for mm in multimodal_embeddings:
                position = mm[:, -5:].permute(1, 0).long()
                if position.shape[1] and int(position[4, 0]) == IMAGE_MARK:
                    position = position[:4]
                embeds.append(mm[:, :-5])
                positions.append(position)
            new, delta = recompute_mrope_positions(ids, positions, mrope_positions, num_computed_tokens,
                                                   self.config.vision_start_token_id, self.config.image_token_id,
                                                   self.config.video_token_id)
        return embeds, new, delta

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
            out.append(self._create_final_video_embeddings(
                video_embeddings=emb, num_tokens_per_frame=per_frame, timestamps=video_input.timestamps[i],
                video_grid_thw=grid, retention_mask=retained))
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
