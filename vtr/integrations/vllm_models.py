"""vLLM model classes with vtr's pruning (imported by vLLM's model registry, never by ``import vtr``).

Each class is the stock vLLM class when vtr is not configured for the model (``vtr.integrations.vllm``).
Configured, a request's visual inputs are pruned in two places, as vLLM's own video pruning (EVS) does:

* the processor (API server process), before any vision pass, sizes each image's and video's placeholder run to the
  method's keep count for its grid (``vtr.serving.prompt_count``; the span comes from the family's own
  ``layout``), and attaches the request's settings (and, for a method that reads the prompt's text, the prompt) to
  each input, in the input's multimodal hash;
* the model (worker), in ``embed_multimodal``, runs vLLM's own vision tower (capturing the layers a method reads,
  ``vllm_signals``), then keeps of each input what ``vtr.serving.select`` chooses: the same ``Method.select`` and
  ``vtr.signals`` as ``vtr.patch`` in Hugging Face models.

Positions. LLaVA-1.5 / NeXT / OneVision (1-D RoPE): vLLM numbers the shorter prompt consecutively, which is
``positions="compact"``, vtr's default on these models. Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE (M-RoPE;
kept tokens keep their grid positions): ``get_mrope_input_positions`` gives every text token its position in the
unpruned prompt when the prompt is processed, and ``recompute_mrope_positions`` (vLLM's
``SupportsMultiModalPruning``, which the model runner calls before each forward when multimodal pruning is on) places
the kept tokens of the runs embedded in that step from position channels appended to their embeddings. So a
request whose image sits in a prefix served from vLLM's prefix cache (never embedded again) gets the same positions
as one that embeds it. Qwen2-VL has no pruning interface in vLLM; its class here adds it.

Written against vLLM 0.32 (the models' ``_process_image_input`` / ``_process_video_input`` /
``_process_video_pixels``, Qwen2.5-VL's and Qwen3-VL's ``_postprocess_*_embeds_evs`` and Qwen3-VL's
``_create_final_video_embeddings``, ``BaseMultiModalProcessor.apply`` / ``_get_mm_hashes`` / ``_get_prompt_updates``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import threading
import time
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info, _build_llava_or_pixtral_hf_processor)
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.model_executor.models.qwen3_5 import (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
                                                Qwen3_5MoeProcessingInfo, Qwen3_5ProcessingInfo)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem
from vllm.multimodal.parse import (ImageEmbeddingItems, ImageProcessorItems, VideoEmbeddingItems,
                                   VideoProcessorItems)
from vllm.multimodal.video_prune.evs import compute_mrope_for_media
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from .. import compat, serving
from ..serving import layout_span
from .vllm import REQUEST_KEY, ModelFacts, VtrConfigError, method_for, request_settings, server_settings
from .vllm_metrics import count_tokens, record_selection
from .vllm_signals import TowerCapture, crop_slice, qwen_slice

# What vtr sets ``video_pruning_rate`` to, to turn vLLM's multimodal pruning switch on (Qwen-VL: the runner then
# calls ``recompute_mrope_positions``): positive, and so small that ``1 - SWITCH`` is 1.0 in float64, so that a
# stock EVS count (``int(n * (1 - q))``), wherever vLLM still computes one, keeps every token.
SWITCH = 1e-17
# The channels appended to each kept token's embedding (Qwen-VL): its original (t, h, w) grid position relative to
# its run's origin (``recompute_mrope_positions`` strips them).
POSITION_CHANNELS = 3
FIELD = "vtr_{}"  # the per-input field of the request's settings: vtr_image, vtr_video


# ------------------------------------------------------------------------------------------ per-input settings
def encode_item(settings: dict, ordinal: int, prompt: list[int] | None, dummy: bool = False) -> torch.Tensor:
    """``[1 + b + p]`` int64: the byte count of the JSON of the settings (and the input's place in the prompt; and
    whether it is vLLM's profiling input, which the metrics skip), its bytes, then the prompt's token ids."""
    data = json.dumps({"settings": settings, "ordinal": ordinal, "dummy": dummy}, sort_keys=True).encode()
    return torch.tensor([len(data), *data, *(prompt or [])], dtype=torch.long)


def decode_item(row: torch.Tensor) -> tuple[dict, int, list[int], bool]:
    row = row.tolist()
    n = row[0]
    data = json.loads(bytes(row[1:1 + n]).decode())
    return data["settings"], data["ordinal"], row[1 + n:], data["dummy"]


def _rows(value) -> list[torch.Tensor]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else list(value.unbind(0))


# ------------------------------------------------------------------------------------------------- processors
class _Processor:
    """The processor side (mixin of a vLLM ``BaseMultiModalProcessor``): per-request settings, placeholder runs of
    the kept length, the settings in each input's hash and kwargs. The processor is shared by vLLM's renderer
    threads, so the request in flight is thread-local."""

    _vtr_local = threading.local()
    _vtr_received_lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # input hash -> visual tokens before pruning, for the metrics of inputs whose kwargs the engine's cache holds
        self._vtr_received = collections.OrderedDict()
        config = self.info.get_hf_config()
        self._vtr_server = server_settings(config)
        self._vtr_facts = None
        if self._vtr_server is not None:  # a bad server configuration fails here, before the engine starts
            self._vtr_facts = ModelFacts.of(config)
            method_for(self._vtr_server, self._vtr_facts, "server settings")

    def get_dummy_mm_inputs(self, *args, **kwargs):
        """vLLM's profiling and warm-up inputs: processed as any request, left out of the metrics."""
        self._vtr_local.dummy = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            self._vtr_local.dummy = False

    def _vtr_view(self):
        """What ``vtr.patches`` reads of a model, at prompt time: its config (and a marker newline vector)."""
        return SimpleNamespace(config=self.info.get_hf_config(), model=SimpleNamespace(image_newline=torch.ones(1)))

    def apply(self, inputs, timing_ctx, *args, **kwargs):
        hf_kwargs = dict(inputs.hf_processor_mm_kwargs)
        request = hf_kwargs.pop(REQUEST_KEY, None)
        settings = request_settings(self._vtr_server, request)
        if settings is None:
            return super().apply(inputs, timing_ctx, *args, **kwargs)
        method = method_for(settings, self._vtr_facts, "mm_processor_kwargs['vtr']")
        reads_text = serving.reads_prompt(method)  # then the prompt is part of each input's hash
        state = SimpleNamespace(settings=settings, method=method, prompt=list(inputs.prompt) if reads_text else None)
        previous = getattr(self._vtr_local, "request", None)
        self._vtr_local.request = state
        try:
            result = super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=hf_kwargs), timing_ctx,
                                   *args, **kwargs)
        finally:
            self._vtr_local.request = previous
        self._vtr_attach(result, state, inputs)
        return result

    def _vtr_attach(self, result, state, inputs) -> None:
        """Each input's settings in its kwargs (``vtr_image`` / ``vtr_video``), and the tokens counted."""
        kwargs, dummy = result["mm_kwargs"], getattr(self._vtr_local, "dummy", False)
        for modality in ("image", "video"):
            items = kwargs.get(modality)
            if not items:
                continue
            placeholders = result["mm_placeholders"][modality]
            attached = []
            for i, item in enumerate(items):
                ranges = placeholders[i]
                kept = int(ranges.is_embed.sum()) if ranges.is_embed is not None else ranges.length
                kept = self._vtr_kept_tokens(modality, result["prompt_token_ids"], ranges, kept)
                key = result["mm_hashes"][modality][i]
                with self._vtr_received_lock:
                    if item is not None and key not in self._vtr_received:
                        self._vtr_received[key] = self._vtr_span(modality, i, inputs.mm_data_items, item).n
                    received = self._vtr_received.get(key, kept)
                    if key in self._vtr_received:
                        self._vtr_received.move_to_end(key)
                    while len(self._vtr_received) > 4096:
                        self._vtr_received.popitem(last=False)
                if not dummy:
                    count_tokens(state.method.name, modality, received, kept)
                if item is None:  # held by the engine's cache, which has it with this hash's settings
                    attached.append(item)
                    continue
                elem = MultiModalFieldElem(data=encode_item(state.settings, i, state.prompt, dummy),
                                           field=MultiModalBatchedField(keep_on_cpu=True))
                attached.append(MultiModalKwargsItem({**item, FIELD.format(modality): elem}))
            kwargs[modality] = attached

    def _vtr_kept_tokens(self, modality, prompt_ids, ranges, embedded: int) -> int:
        return embedded

    def _get_mm_hashes(self, inputs):
        """The stock hashes, with the request's settings (and, for a method that reads the prompt's text, the
        prompt and the input's place in it) added: the encoder cache and the prefix cache key on them."""
        hashes = super()._get_mm_hashes(inputs)
        state = getattr(self._vtr_local, "request", None)
        if state is None:
            return hashes
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        text = {} if state.prompt is None else {"vtr_prompt": state.prompt}
        return {modality: [MultiModalHasher.hash_kwargs(algorithm, item=h, vtr=state.settings, vtr_ordinal=i, **text)
                           if text else MultiModalHasher.hash_kwargs(algorithm, item=h, vtr=state.settings)
                           for i, h in enumerate(items)]
                for modality, items in hashes.items()}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        state = getattr(self._vtr_local, "request", None)
        if state is None:
            return updates
        return [dataclasses.replace(u, replacement=self._vtr_replacement(u, state, mm_items, out_mm_kwargs))
                if u.modality in ("image", "video") else u for u in updates]

    def _vtr_replacement(self, update, state, mm_items, out_mm_kwargs):
        original = update.replacement

        def replacement(item_idx: int):
            full = original(item_idx) if callable(original) else original
            if isinstance(mm_items.get(update.modality), (ImageEmbeddingItems, VideoEmbeddingItems)):
                raise VtrConfigError(f"vtr: {state.method.name} prunes {update.modality}s the model encodes; this "
                                     f"request passes precomputed {update.modality} embeddings")
            span = self._vtr_span(update.modality, item_idx, mm_items, out_mm_kwargs[update.modality][item_idx],
                                  full)
            try:
                kept = serving.prompt_count(state.method, span, self._vtr_facts.family, self._vtr_view())
            except ValueError as error:
                raise VtrConfigError(str(error)) from None
            return self._vtr_cut(update.modality, full, kept, item_idx, out_mm_kwargs)
        return replacement

    def _vtr_cut(self, modality, full, kept: int, item_idx: int, out_mm_kwargs):
        """The placeholder run of ``kept`` tokens, from the stock one ``full``."""
        return full[:kept]

    def _vtr_span(self, modality, item_idx, mm_items, item, full=None):
        """The ``VisualSpan`` of one input at prompt time (family-specific)."""
        raise NotImplementedError



class _QwenProcessor(_Processor):
    def _vtr_span(self, modality, item_idx, mm_items, item, full=None):
        grid = item[f"{modality}_grid_thw"].data
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        n = int(grid.prod()) // merge ** 2
        return layout_span(self._vtr_facts.family, self._vtr_view(), modality, n,
                           **{f"{modality}_grid_thw": torch.as_tensor(grid).reshape(1, 3)})


class VtrQwen2VLProcessor(_QwenProcessor, Qwen2VLMultiModalProcessor):
    pass


class VtrQwen2_5_VLProcessor(_QwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class VtrQwen3VLProcessor(_QwenProcessor, Qwen3VLMultiModalProcessor):
    """Videos: each frame keeps its timestamp and vision start / end tokens, and the kept tokens of the whole
    video are lumped into the first frame's run, as vLLM's EVS does: the model knows how many of each frame it
    kept only after the vision pass, and rebuilds the frames' runs then (``_create_final_video_embeddings``)."""

    def _vtr_cut(self, modality, full, kept, item_idx, out_mm_kwargs):
        if modality != "video":
            return super()._vtr_cut(modality, full, kept, item_idx, out_mm_kwargs)
        config, tokenizer = self.info.get_hf_config(), self.info.get_tokenizer()
        item = out_mm_kwargs["video"][item_idx]
        t = int(item["video_grid_thw"].data[0])
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[kept] + [0] * (t - 1), timestamps=item["timestamps"].data, tokenizer=tokenizer,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id, select_token_id=False)

    def _vtr_kept_tokens(self, modality, prompt_ids, ranges, embedded):
        if modality != "video":
            return embedded
        run = prompt_ids[ranges.offset:ranges.offset + ranges.length]
        return run.count(self.info.get_hf_config().video_token_id)


class VtrLlavaProcessor(_Processor, LlavaMultiModalProcessor):
    def _vtr_span(self, modality, item_idx, mm_items, item, full=None):
        images = mm_items.get_items("image", ImageProcessorItems)
        if full is None:
            size = images.get_image_size(item_idx)
            full = [0] * self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
        return layout_span(self._vtr_facts.family, self._vtr_view(), "image", len(full))


def _vtr_llava_processor(info, dummy_inputs):
    """vLLM's factory, with vtr's processor for LLaVA's CLIP / SigLIP models (Pixtral-HF ones stay stock)."""
    if isinstance(info, LlavaProcessingInfo):
        return VtrLlavaProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


class _AnyresProcessor(_Processor):
    """LLaVA-NeXT / OneVision images: the base grid, then the unpadded high-resolution grid with a newline token
    after each row (OneVision's ``anyres_max``: resized), as vLLM's processing info counts them."""

    def _vtr_span(self, modality, item_idx, mm_items, item, full=None):
        if modality == "video":
            return self._vtr_video_span(item_idx, mm_items)
        from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape
        info, config = self.info, self.info.get_hf_config()
        images = mm_items.get_items("image", ImageProcessorItems)
        size = images.get_image_size(item_idx)
        encoder = info.get_vision_encoder_info()
        base = get_num_selected_vision_tokens(
            encoder.get_num_image_tokens(image_width=size.width, image_height=size.height),
            config.vision_feature_select_strategy)
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size=(size.height, size.width),
                                                       grid_pinpoints=config.image_grid_pinpoints,
                                                       patch_size=encoder.get_image_size())
        unpadded, rows = info._get_num_unpadded_features(
            original_height=size.height, original_width=size.width, npatches=encoder.get_patch_grid_length(),
            num_patch_height=tiles_h, num_patch_width=tiles_w)
        width = unpadded // rows
        marks = torch.zeros(base + rows * (width + 1), 1)
        marks[base + width::width + 1] = 1  # newline tokens end each row: the view's image_newline
        return layout_span(self._vtr_facts.family, self._vtr_view(), "image", len(marks), embeds=marks,
                           image_sizes=torch.tensor([[size.height, size.width]]))

    def _vtr_video_span(self, item_idx, mm_items):
        raise NotImplementedError


class VtrLlavaNextProcessor(_AnyresProcessor, LlavaNextMultiModalProcessor):
    pass


class VtrLlavaOnevisionProcessor(_AnyresProcessor, LlavaOnevisionMultiModalProcessor):
    def _vtr_video_span(self, item_idx, mm_items):
        videos = mm_items.get_items("video", VideoProcessorItems)
        frames = videos.get_num_frames(item_idx)
        size = videos.get_frame_size(item_idx)
        n = self.info.get_num_video_tokens(image_width=size.width, image_height=size.height, num_frames=frames)
        return layout_span(self._vtr_facts.family, self._vtr_view(), "video", n,
                           pixel_values_videos=torch.empty(1, frames))


# ----------------------------------------------------------------------------------------------------- models
class _Model:
    """The model side (mixin of a vLLM model class): the settings of each input of an ``embed_multimodal`` call,
    the tower capture, and the selection."""

    def _vtr_setup(self, vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        self._vtr_server = server_settings(config)
        self._vtr_facts = ModelFacts.of(config) if self._vtr_server is not None else None
        self._vtr_tokenizer_name = vllm_config.model_config.tokenizer
        self._vtr_items, self._vtr_calls, self._vtr_tower, self._vtr_loaded = {}, [], None, {}
        self._vtr_aside = {}  # weights vLLM drops that a method reads (kept out of the module tree)

    # vLLM's tower and the HF-like view of this model that vtr's signals and families read
    def _vtr_tower_layers(self):
        raise NotImplementedError

    def _vtr_view(self):
        model = SimpleNamespace(multi_modal_projector=getattr(self, "multi_modal_projector", None),
                                image_newline=getattr(self, "image_newline", None),
                                apply_pooling=getattr(self, "apply_pooling", None),
                                vision_tower=SimpleNamespace(vision_model=SimpleNamespace(
                                    post_layernorm=self._vtr_aside.get("post_layernorm"))))
        vision = self.config.vision_config
        if hasattr(vision, "spatial_merge_size"):  # Qwen-VL
            model.visual = SimpleNamespace(spatial_merge_size=vision.spatial_merge_size,
                                           patch_size=vision.patch_size)
            if getattr(vision, "window_size", None) and hasattr(vision, "fullatt_block_indexes"):
                model.visual.window_size = vision.window_size
        return SimpleNamespace(config=self.config, model=model)

    def embed_multimodal(self, **kwargs):
        fields = {m: kwargs.pop(FIELD.format(m), None) for m in ("image", "video")}
        if self._vtr_server is None:
            return super().embed_multimodal(**kwargs)
        self._vtr_items = {m: [self._vtr_item(*decode_item(row)) for row in _rows(value)]
                           for m, value in fields.items() if value is not None}
        layers = set()
        for items in self._vtr_items.values():
            for item in items:
                if "vision" in item.method.needs:
                    layers.update(item.method.vision_layers(self._vtr_facts.vision_layers,
                                                            self._vtr_facts.feature_layer))
        if layers and self._vtr_tower is None:
            self._vtr_check_tower_heads()
            self._vtr_tower = TowerCapture(*self._vtr_tower_layers())
        capture = self._vtr_tower.capture(layers) if layers else contextlib.nullcontext([])
        try:
            with capture as calls:
                self._vtr_calls = calls
                return super().embed_multimodal(**kwargs)
        finally:
            self._vtr_items, self._vtr_calls = {}, []

    def _vtr_check_tower_heads(self) -> None:
        """Tower signals average over all attention heads; tensor parallelism splits the tower's heads across
        ranks, unless the tower runs data-parallel (``--mm-encoder-tp-mode data``)."""
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.models.vision import is_vit_use_data_parallel
        if get_tensor_model_parallel_world_size() > 1 and not is_vit_use_data_parallel():
            raise VtrConfigError("vtr: methods that read the vision tower's attention need all its heads on each "
                                 "rank; with tensor parallelism, run the tower data-parallel: --mm-encoder-tp-mode "
                                 "data")

    def _vtr_item(self, settings: dict, ordinal: int, prompt: list[int], dummy: bool):
        method = method_for(settings, self._vtr_facts, "mm_processor_kwargs['vtr']")
        return SimpleNamespace(method=method, ordinal=ordinal, prompt=prompt, dummy=dummy)

    def _vtr_call(self, index: int = 0) -> dict | None:
        return self._vtr_calls[index] if len(self._vtr_calls) > index else None

    def _vtr_text_signals(self, item, modality: str) -> dict:
        """The prompt's text a method reads, from the prompt the processor attached: the mean input embedding of
        its text tokens (placeholders and vision delimiters excluded) and, for CLIP relevance, the text after the
        input (decoded with the language model's tokenizer) and the CLIP model."""
        method, out = item.method, {}
        if not item.prompt:
            return out
        config = self.config
        placeholders = self._vtr_facts.family.placeholder_ids(config)
        skip = set(placeholders) | set(self._vtr_facts.family.delimiter_ids(config))
        text = [t for t in item.prompt if t not in skip]
        if text:
            device = next(self.parameters()).device
            embeds = self.embed_input_ids(torch.tensor(text, device=device))
            out["text_embedding"] = embeds.float().mean(0)
        if "clip_text" in method.needs:
            token = config.image_token_id if modality == "image" else config.video_token_id
            places = [i for i, t in enumerate(item.prompt) if t == token]
            after = [t for t in item.prompt[places[item.ordinal] + 1:] if t not in placeholders]
            tokenizer = self._vtr_load("tokenizer", method.tokenizer or self._vtr_tokenizer_name)
            out["instruction"] = tokenizer.decode(after, skip_special_tokens=True).strip()
            out["clip"] = self._vtr_load("clip", method.clip)
        return out

    def _vtr_load(self, kind: str, name: str):
        if (kind, name) not in self._vtr_loaded:
            if kind == "tokenizer":
                self._vtr_loaded[kind, name] = compat.load_tokenizer(name)
            else:
                clip, tokenizer = compat.load_clip(name)
                self._vtr_loaded[kind, name] = clip.to(next(self.parameters()).device), tokenizer
        return self._vtr_loaded[kind, name]

    def _vtr_select(self, modality: str, index: int, embeds: torch.Tensor, span, signals=None):
        """What the input's method keeps of ``embeds`` ``[n, D]`` (the language model's inputs of input ``index``
        of this call's ``modality``): a ``vtr.serving.Selection`` (everything for an input without settings)."""
        items = self._vtr_items.get(modality, [])
        item = items[index] if index < len(items) else None
        if item is None:
            everything = torch.arange(embeds.shape[0], device=embeds.device)
            return serving.Selection(keep=everything, slots=everything[:0])
        method = item.method
        signals = dataclasses.replace(signals or serving.InputSignals(), **self._vtr_text_signals(item, modality))
        start = time.perf_counter()
        chosen = serving.select(method, span, embeds, signals, self._vtr_facts.family, self._vtr_view(),
                                self._vtr_facts.feature_layer)
        if embeds.device.type != "cpu":
            torch.accelerator.synchronize()
        if not item.dummy:
            record_selection(method.name, time.perf_counter() - start)
        expected = serving.prompt_count(method, span, self._vtr_facts.family, self._vtr_view())
        if len(chosen.keep) != expected:
            raise RuntimeError(f"vtr: {method.name} kept {len(chosen.keep)} tokens of a {modality} whose placeholder "
                               f"run the processor sized to {expected}")
        return chosen

    def load_weights(self, weights):
        """Stock, keeping the CLIP tower's post-layernorm aside: vLLM drops it (the projector reads an earlier
        layer), and CDPruner's CLIP relevance maps the feature layer into CLIP's joint space through it."""
        config = self.config

        def kept_aside():
            state = {}
            for name, tensor in weights:
                if "vision_model.post_layernorm." in name and "vision_tower" in name:
                    state[name.rsplit(".", 1)[1]] = tensor
                    continue
                yield name, tensor
            if state.keys() == {"weight", "bias"}:
                norm = torch.nn.LayerNorm(state["weight"].shape[0], eps=config.vision_config.layer_norm_eps)
                norm.load_state_dict(state)
                self._vtr_aside["post_layernorm"] = norm.to(next(self.parameters()).device, state["weight"].dtype)
        return super().load_weights(kept_aside())


# ------------------------------------------------------------------------------------------------ LLaVA family
class _Llava(_Model):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtr_setup(vllm_config)

    def _vtr_tower_layers(self):
        return self.vision_tower.vision_model.encoder.layers, False

    def _vtr_image(self, index: int, embeds: torch.Tensor, crops: tuple[int, int], image_size=None):
        """Input ``index``'s kept rows of ``embeds`` ``[n, D]``; its tower inputs are ``crops`` of the call."""
        extra = {} if image_size is None else {"image_sizes": torch.as_tensor(image_size).reshape(1, 2)}
        span = layout_span(self._vtr_facts.family, self._vtr_view(), "image", embeds.shape[0], embeds=embeds,
                           **extra)
        call = self._vtr_call()
        signals = serving.InputSignals(tower=crop_slice(call, *crops) if call else {},
                                       image_size=tuple(int(x) for x in image_size) if image_size is not None
                                       else None)
        return self._vtr_select("image", index, embeds, span, signals).apply(embeds)


@MULTIMODAL_REGISTRY.register_processor(_vtr_llava_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtrLlava(_Llava, LlavaForConditionalGeneration):
    """LLaVA-1.5 with vtr's pruning of images (stock when vtr is not configured)."""

    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if not self._vtr_items.get("image"):
            return out
        return tuple(self._vtr_image(i, e, (i, i + 1)) for i, e in enumerate(_rows(out)))


class _AnyresModel(_Llava):
    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if not self._vtr_items.get("image") or image_input.get("type") != "pixel_values":
            return out
        pixels, sizes = image_input["pixel_values"], image_input["image_sizes"]
        counts = [p.shape[0] for p in _rows(pixels)]  # the crops each image sent through the tower
        first, kept = 0, []
        for i, embeds in enumerate(_rows(out)):
            size = sizes[i].tolist()
            crops = compat.anyres_patch_count(self.config, size)  # vLLM drops the padding crops after these
            kept.append(self._vtr_image(i, embeds.reshape(-1, embeds.shape[-1]), (first, first + crops), size))
            first += counts[i]
        return kept


@MULTIMODAL_REGISTRY.register_processor(VtrLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtrLlavaNext(_AnyresModel, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with vtr's pruning of images (base grid, tiles, newline tokens; stock when not configured)."""


@MULTIMODAL_REGISTRY.register_processor(VtrLlavaOnevisionProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class VtrLlavaOnevision(_AnyresModel, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with vtr's pruning of images and videos (frames of pooled tokens, then one newline)."""

    def _process_video_pixels(self, inputs):
        out = super()._process_video_pixels(inputs)
        if not self._vtr_items.get("video"):
            return out
        frames = [int(v.shape[0]) for v in _rows(inputs["pixel_values_videos"])]
        kept = []
        for i, embeds in enumerate(_rows(out)):
            embeds = embeds.reshape(-1, embeds.shape[-1])
            span = layout_span(self._vtr_facts.family, self._vtr_view(), "video", embeds.shape[0],
                               pixel_values_videos=torch.empty(1, frames[i]))
            kept.append(self._vtr_select("video", i, embeds, span,
                                         serving.InputSignals(frames=frames[i])).apply(embeds))
        return kept


# ---------------------------------------------------------------------------------------------- Qwen-VL family
class _MRoPE(_Model):
    """Qwen-VL: pruned runs with M-RoPE positions (see the module docstring), and the selection on each input's
    merged tokens (the tower's rows of one input are contiguous in its call: signals are sliced per input)."""

    supports_multimodal_pruning = True  # vLLM's SupportsMultiModalPruning (Qwen2-VL lacks it)

    def _vtr_configure(self, vllm_config) -> None:
        """Before the stock ``__init__`` (which reads the switch): turn vLLM's multimodal pruning on."""
        self._vtr_setup(vllm_config)
        if self._vtr_server is None:
            return
        method_for(self._vtr_server, self._vtr_facts, "server settings")
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config.is_multimodal_pruning_enabled():
            raise VtrConfigError(f"vtr: --video-pruning-rate {mm_config.video_pruning_rate} turns on vLLM's own "
                                 f"video pruning ({mm_config.video_pruning_method}); with vtr configured leave it "
                                 "unset: vtr prunes images and videos")
        mm_config.video_pruning_rate = SWITCH

    def _vtr_tower_layers(self):
        return self.visual.blocks, True

    def _vtr_grid_input(self, modality, index, embeds, grid, positions, first_row: int):
        """Input ``index``'s kept rows of ``embeds`` ``[n, C]`` (C: the language model's width, then Qwen3-VL's
        DeepStack features), each with its ``positions`` ``[n, 3]`` appended; the call's tower rows of the input
        start at ``first_row``."""
        t, h, w = (int(x) for x in grid)
        hidden = self.config.get_text_config().hidden_size
        span = layout_span(self._vtr_facts.family, self._vtr_view(), modality, embeds.shape[0],
                           **{f"{modality}_grid_thw": torch.tensor([[t, h, w]])})
        call = self._vtr_call()
        tower, extras = qwen_slice(call, first_row, first_row + t * h * w) if call else ({}, {})
        signals = serving.InputSignals(tower=tower, extras=extras, grid_thw=torch.tensor([[t, h, w]]),
                                       deepstack=embeds[:, hidden:] if embeds.shape[1] > hidden else None)
        chosen = self._vtr_select(modality, index, embeds[:, :hidden], span, signals)
        kept = chosen.apply(embeds)
        return kept, positions.to(embeds.device)[chosen.keep.to(embeds.device)], chosen.keep

    def _vtr_with_positions(self, embeds, positions):
        return torch.cat([embeds, positions.to(embeds.dtype)], dim=1)

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
        if self._vtr_server is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
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

    def _vtr_pruned(self, modality, splits, grids, second_per_grid=None):
        """Each input of the call pruned, with its position channels (Qwen2-VL, Qwen2.5-VL)."""
        merge = self.config.vision_config.spatial_merge_size
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1)
        out, first_row = [], 0
        for i, (embeds, grid) in enumerate(zip(splits, grids)):
            kwargs = {}
            if modality == "video" and second_per_grid is not None:
                kwargs = dict(tokens_per_second=per_second, video_second_per_grid=second_per_grid[i])
            positions = compute_mrope_for_media(grid, merge, **kwargs)[:, :3]
            kept, positions, _ = self._vtr_grid_input(modality, i, embeds, grid, positions, first_row)
            out.append(self._vtr_with_positions(kept, positions))
            first_row += grid[0] * grid[1] * grid[2]
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VtrQwen2VL(_MRoPE, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with vtr's pruning of images and videos, and the pruning interface vLLM's class lacks (stock when
    vtr is not configured)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _process_image_input(self, image_input):
        out = super()._process_image_input(image_input)
        if self._vtr_server is None:
            return out
        return self._vtr_pruned("image", out, image_input["image_grid_thw"].tolist())

    def _process_video_input(self, video_input):
        out = super()._process_video_input(video_input)
        if self._vtr_server is None:
            return out
        return self._vtr_pruned("video", out, video_input["video_grid_thw"].tolist())


@MULTIMODAL_REGISTRY.register_processor(VtrQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtrQwen2_5_VL(_MRoPE, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with vtr's pruning of images and videos (stock when vtr is not configured)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self._vtr_server is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        return self._vtr_pruned("image", image_embeds_split, image_input["image_grid_thw"].tolist())

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._vtr_server is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        seconds = video_input.get("second_per_grid_ts")
        # the temporal positions of the HF model: frame index x seconds per frame (cast to int, as HF) x tokens
        # per second
        seconds = [1] * len(video_embeds_split) if seconds is None else seconds.long().tolist()
        return self._vtr_pruned("video", video_embeds_split, video_input["video_grid_thw"].tolist(), seconds)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3VL(_MRoPE, Qwen3VLForConditionalGeneration):
    """Qwen3-VL (DeepStack) with vtr's pruning of images and videos (stock when vtr is not configured)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        self._vtr_configure(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _vtr_full_run(self, feature, run: list[int]) -> list[int]:
        """Videos: the frames' layout the stock processor gives an unpruned video (each frame's timestamp, then
        <vision_start>, its tokens, <vision_end>), which the lumped layout of a pruned one replaces."""
        if feature.modality != "video":
            return super()._vtr_full_run(feature, run)
        config = self.config
        merge = config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in feature.data["video_grid_thw"].data)
        per_frame = (h // merge) * (w // merge)
        if run.count(config.video_token_id) == t * per_frame and config.vision_start_token_id in run:
            first = run.index(config.vision_start_token_id)
            if run.index(config.vision_end_token_id, first) - first - 1 == per_frame:
                return run  # already the unpruned layout
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[per_frame] * t, timestamps=feature.data["timestamps"].data,
            tokenizer=self._tokenizer, vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id).full

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

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self._vtr_server is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        return self._vtr_pruned("image", image_embeds_split, image_input["image_grid_thw"].tolist())

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._vtr_server is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        merge, out, first_row = self.visual.spatial_merge_size, [], 0
        for i, (embeds, grid) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist())):
            t, h, w = grid
            kept, _, keep = self._vtr_grid_input("video", i, embeds, grid, torch.zeros(embeds.shape[0], 0),
                                                 first_row)
            retained = torch.zeros(t * (h // merge) * (w // merge), dtype=torch.bool, device=embeds.device)
            retained[keep.to(embeds.device)] = True
            final = self._create_final_video_embeddings(
                video_embeddings=kept, num_tokens_per_frame=retained.view(t, -1).sum(1).tolist(),
                timestamps=video_input.timestamps[i], video_grid_thw=grid, retention_mask=retained)
            # its 5 position channels: (t, h, w) of every token of the run from the run's start, then vLLM's
            # "is <vision_start>" and "is a video token" flags, which vtr's positions do not need
            out.append(final[:, :-2])
            first_row += t * h * w
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3VLMoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3VLMoe(VtrQwen3VL, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE with vtr's pruning of images and videos (stock when vtr is not configured): vLLM's class is
    Qwen3-VL's with a mixture-of-experts language model, the same vision tower, processor and pruning interface, so
    ``VtrQwen3VL``'s methods apply as they are; only the processing info (its config class) and the language model
    (``Qwen3VLMoeForConditionalGeneration.__init__``) are the MoE class's."""


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3_5ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3_5(VtrQwen3VL, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 with vtr's pruning of images and videos (stock when vtr is not configured): vLLM's class is Qwen3-VL's
    (its processor, its pruning interface, no DeepStack) on a hybrid language model (Gated DeltaNet layers beside
    full-attention layers), which sees only the shorter prompt, so ``VtrQwen3VL``'s methods apply as they are."""


@MULTIMODAL_REGISTRY.register_processor(VtrQwen3VLProcessor, info=Qwen3_5MoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtrQwen3_5Moe(VtrQwen3_5, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5-MoE: ``VtrQwen3_5`` with the mixture-of-experts language model
    (``Qwen3_5MoeForConditionalGeneration.__init__``)."""
