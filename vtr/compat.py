"""Every place where vtr depends on transformers internals, in one module.

Supported range: transformers 5.17 to 5.23 (tested at both ends). What is relied on:

* model tree: ``model.model.language_model.layers[i].self_attn`` with ``q_proj``/``k_proj``/``scaling``/
  ``head_dim``, ``language_model.norm``, ``language_model.rotary_emb``, and ``apply_rotary_pos_emb`` in the
  attention module's own file;
* decoder-layer keyword arguments ``attention_mask``, ``position_embeddings`` (cos, sin each ``[B|1, L, head_dim]``;
  M-RoPE sections already merged), ``position_ids`` and ``past_key_values``;
* ``masking_utils.create_causal_mask(..., layer_idx=)`` builds the mask of one cache layer for the configured
  attention backend, and ``DynamicCache`` layers may hold different lengths;
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings

import torch
import transformers
from packaging.version import Version
from transformers import masking_utils
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS = Version("5.23.99")
# Backends whose masks vtr rebuilds through transformers' own mask functions.
ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2")
# Decoder layer types whose masks, caches and positions vtr follows (``causal_mask``): global and sliding-window
# softmax attention (Gemma 3) and linear attention with a recurrent state (Qwen3.5's Gated DeltaNet).
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")


def check_transformers_version() -> None:
    version = Version(transformers.__version__)
    if not MIN_TRANSFORMERS <= version <= MAX_TRANSFORMERS:
        warnings.warn(f"vtr is tested with transformers {MIN_TRANSFORMERS} to 5.23; found {version}. "
                      "Pruned outputs may be wrong if the decoder-layer interface changed.", stacklevel=3)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model holding vision tower and language model (``LlavaModel``, ``Qwen2VLModel``)."""
    return model.model


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.language_model


def text_config(model: torch.nn.Module):
    return model.config.get_text_config()


def decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    return lm.layers


def self_attention(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.self_attn


def input_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a decoder layer applies to its input before self-attention."""
    return layer.input_layernorm


def _feed_forward_norms(layer: torch.nn.Module):
    """(the norm before the MLP, the norm after it or None) of a decoder layer built as ``h = x + attn'(x)``,
    ``out = h + post(mlp(pre(h)))``: Llama / Qwen (``post_attention_layernorm`` before the MLP, nothing after),
    Gemma 3 (``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``), GLM-4.1V (``post_attention_layernorm``
    / ``post_mlp_layernorm``). Raises ``ValueError`` for another structure."""
    if getattr(layer, "mlp", None) is not None:
        if hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm"):
            return layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
        norm = getattr(layer, "post_attention_layernorm", None)
        if norm is not None and not hasattr(layer, "post_feedforward_layernorm"):
            return norm, getattr(layer, "post_mlp_layernorm", None)
    raise ValueError(f"vtr: a post-attention stage needs decoder layers of the form h = x + attn(x), "
                     f"out = h + mlp(norm2(h)); {type(layer).__name__} is not one")


def feed_forward_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a decoder layer applies to the residual stream after self-attention, before its MLP (its input is
    the post-attention residual stream). Raises ``ValueError`` for a layer not built as ``h = x + attn'(x);
    out = h + post(mlp(norm2(h)))`` (Llama, Qwen2, Qwen3, Gemma 3, GLM-4.1V)."""
    return _feed_forward_norms(layer)[0]


def feed_forward_block(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The second half of a decoder layer on the post-attention residual stream: ``h + post(mlp(norm2(h)))``."""
    pre, post = _feed_forward_norms(layer)
    out = layer.mlp(pre(hidden))
    return hidden + (post(out) if post is not None else out)


def final_norm(lm: torch.nn.Module) -> torch.nn.Module:
    return lm.norm


def attn_implementation(model: torch.nn.Module) -> str:
    return text_config(model)._attn_implementation


def layer_types(lm: torch.nn.Module) -> list[str]:
    n = len(lm.layers)
    return list(getattr(lm.config, "layer_types", None) or ["full_attention"] * n)[:n]


def new_cache(lm: torch.nn.Module) -> DynamicCache:
    """The cache the text model would create for itself when ``use_cache`` and no cache is passed."""
    return DynamicCache(config=lm.config)


def use_cache(lm: torch.nn.Module, kwargs: dict) -> bool:
    value = kwargs.get("use_cache")
    return bool(lm.config.use_cache if value is None else value)


def is_dynamic_cache(cache) -> bool:
    return isinstance(cache, DynamicCache)


def length_layer(lm: torch.nn.Module) -> int:
    """The decoder layer whose KV cache ``cache.get_seq_length()`` reads: layer 0, or on hybrid models the first
    layer that is not linear attention (a recurrent state tracks no length)."""
    return next((i for i, t in enumerate(layer_types(lm)) if t != "linear_attention"), 0)


def cache_length(cache, layer_idx: int = 0) -> int:
    return 0 if cache is None else cache.get_seq_length(layer_idx)


def cached_keys(cache, layer_idx: int, length: int) -> torch.Tensor | None:
    """Post-RoPE keys ``[B, H_kv, length, d]`` that layer ``layer_idx`` stored in this forward, if it holds exactly
    ``length`` of them (a fresh prefill), else None."""
    if cache is None or layer_idx >= len(cache.layers):
        return None
    keys = getattr(cache.layers[layer_idx], "keys", None)
    return keys if keys is not None and keys.dim() == 4 and keys.shape[-2] == length else None


def cached_values(cache, layer_idx: int, length: int) -> torch.Tensor | None:
    """Values ``[B, H_kv, length, d]`` that layer ``layer_idx`` stored in this forward, if it holds exactly ``length``
    of them (a fresh prefill), else None."""
    if cache is None or layer_idx >= len(cache.layers):
        return None
    values = getattr(cache.layers[layer_idx], "values", None)
    return values if values is not None and values.dim() == 4 and values.shape[-2] == length else None


def gather_cache_layer(cache, layer_idx: int, select: torch.Tensor) -> None:
    """Keep, in place, the slots ``select`` ``[B, L']`` (per row, ascending or not) of layer ``layer_idx`` of a
    ``DynamicCache`` (keys and values ``[B, H_kv, L, d]``)."""
    layer = cache.layers[layer_idx]
    for name in ("keys", "values"):
        x = getattr(layer, name)
        index = select.to(x.device)[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1])
        setattr(layer, name, x.gather(2, index))


def layer_keys(cache, layer_idx: int) -> torch.Tensor:
    """Post-RoPE keys ``[B, H_kv, length, d]`` layer ``layer_idx`` holds in a ``DynamicCache``."""
    return cache.layers[layer_idx].keys


def rotary_embeddings(lm: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int = 0):
    """(cos, sin) for explicit positions: ``position_ids`` is ``[B, L]`` (or ``[3, B, L]`` for M-RoPE). Models
    whose layer types have their own rotary bases (Gemma 3: global and sliding layers) take the type of
    ``layer_idx``."""
    if "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters:
        return lm.rotary_emb(hidden, position_ids, layer_type(lm, layer_idx))
    return lm.rotary_emb(hidden, position_ids)


def causal_mask(lm: torch.nn.Module, layer_idx: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache,
                blocks: torch.Tensor | None = None):
    """The attention mask that decoder layer ``layer_idx`` needs for a sequence whose padding is ``mask2d``, built by
    transformers' own mask functions for the layer's type.

    hidden: ``[B, q, D]`` (only shape, dtype and device are read); mask2d: ``[B, past + q]`` bool. The mask is sized
    against the cache of ``layer_idx``, whose length differs from layer 0 once the layer runs on a pruned sequence
    (a sliding layer's cache: its window). blocks: ``[B, past + q]`` bidirectional block of each token (Gemma 3's
    ``block_sequence_ids``: -1 causal), or None. Per type: ``full_attention`` causal OR same block;
    ``sliding_attention`` (window) AND (causal OR same block), as Gemma 3 composes them; ``linear_attention`` the
    2-D padding mask of the new tokens (Qwen3.5's recurrent layers). Returns whatever the configured backend expects
    (4-D bool / float mask, 2-D mask, or ``None``)."""
    kind = layer_types(lm)[layer_idx]
    args = dict(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d, past_key_values=cache,
                position_ids=None)
    if kind == "full_attention":
        extra = {"block_sequence_ids": blocks} if blocks is not None else {}
        return create_causal_mask(**args, layer_idx=layer_idx, **extra)
    if kind == "sliding_attention":
        if blocks is None:
            return masking_utils.create_sliding_window_causal_mask(**args, layer_idx=layer_idx)
        early_exit, _, _, _, kv_length, _, kv_offset = masking_utils._preprocess_mask_arguments(
            **args, layer_idx=layer_idx)
        if not early_exit:
            blocks = masking_utils.maybe_pad_block_sequence_ids(blocks, mask2d, kv_length, kv_offset)
        return create_causal_mask(**args, or_mask_function=masking_utils.blockwise_overlay(blocks),
                                  and_mask_function=masking_utils.sliding_window_overlay(lm.config.sliding_window),
                                  layer_idx=layer_idx)
    if kind == "linear_attention":
        return masking_utils.create_recurrent_attention_mask(**args)
    raise NotImplementedError(f"vtr cannot rebuild masks for {kind!r} layers")


def mask_mapping(lm: torch.nn.Module, hidden: torch.Tensor, mask2d: torch.Tensor, cache,
                 blocks: torch.Tensor | None = None) -> dict:
    """``{layer type: mask}`` for every layer type of the language model (each built for the first layer of its
    type), as models whose base model builds the masks (Gemma 3) hand them to the language model."""
    out = {}
    for i, kind in enumerate(layer_types(lm)):
        if kind not in out:
            out[kind] = causal_mask(lm, i, hidden, mask2d, cache, blocks)
    return out


def bidirectional_block_ids(model: torch.nn.Module, token_types: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the bidirectional attention block of each token as the model derives it from its
    ``token_type_ids`` (Gemma 3: each run of image tokens is a block, -1 elsewhere)."""
    module = sys.modules[type(model.model).__module__]
    return module.get_block_sequence_ids_for_mask(token_types, device=token_types.device)


def layer_type(lm: torch.nn.Module, layer_idx: int) -> str:
    """``"full_attention"``, ``"sliding_attention"`` (Gemma 3), ``"linear_attention"`` (Qwen3.5's Gated DeltaNet)."""
    return layer_types(lm)[layer_idx]


def sliding_window(lm: torch.nn.Module, layer_idx: int) -> int | None:
    """Keys a query of a sliding-window layer sees (itself included), or None for other layers."""
    return lm.config.sliding_window if layer_type(lm, layer_idx) == "sliding_attention" else None


def _rotate(attn: torch.nn.Module):
    module = sys.modules[type(attn).__module__]
    return module.apply_rotary_pos_emb


def _project(attn, proj: str, norm: str, hidden: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    x = getattr(attn, proj)(hidden)
    config = getattr(attn, "config", None)
    if proj == "q_proj" and config is not None and x.shape[-1] == 2 * config.num_attention_heads * attn.head_dim:
        # gated attention (Qwen3.5): each head's query, then its output gate
        B, L, _ = x.shape
        x = x.view(B, L, -1, 2 * attn.head_dim)[..., :attn.head_dim].reshape(B, L, -1)
    return _heads(attn, norm, x, cos, sin)


def _heads(attn, norm: str, projected: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    B, L, _ = projected.shape
    x = projected.view(B, L, -1, attn.head_dim)
    if hasattr(attn, norm):  # Qwen3: per-head RMSNorm before RoPE
        x = getattr(attn, norm)(x)
    x = x.transpose(1, 2)
    if cos is not None:
        x, _ = _rotate(attn)(x, x, cos, sin)
    return x


def key_projection(attn: torch.nn.Module) -> torch.nn.Module:
    """The attention module's key projection (a linear layer: ``[B, L, D] -> [B, L, H_kv * d]``)."""
    return attn.k_proj


def keys_from_projection(attn: torch.nn.Module, projected: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys ``[B, H_kv, L, d]`` from the key projection's output ``[B, L, H_kv * d]`` (what
    ``project_keys`` computes, in two steps, so that the projection can be kept)."""
    return _heads(attn, "k_norm", projected, cos, sin)


def project_unrotated(attn: torch.nn.Module, which: str, hidden: torch.Tensor) -> torch.Tensor:
    """Queries (``which="q"``, ``[B, H, L, d]``) or keys (``"k"``, ``[B, H_kv, L, d]``) as the attention module
    computes them before the rotary embedding (Qwen3's per-head norm included). hidden: ``[B, L, D]`` (after the
    input layernorm)."""
    return _project(attn, f"{which}_proj", f"{which}_norm", hidden, None, None)


def project_keys(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys as the attention module computes them. hidden: ``[B, L, D]`` (after the input layernorm);
    cos/sin: ``[B|1, L, d]``. Returns ``[B, H_kv, L, d]``."""
    return _project(attn, "k_proj", "k_norm", hidden, cos, sin)


def project_queries(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries for the rows in ``hidden`` (``[B, R, D]``, cos/sin ``[B|1, R, d]``).
    Returns ``[B, H, R, d]``."""
    return _project(attn, "q_proj", "q_norm", hidden, cos, sin)


def project_values(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Values as the attention module computes them (no RoPE). hidden: ``[B, L, D]`` (after the input layernorm).
    Returns ``[B, H_kv, L, d]``."""
    B, L, _ = hidden.shape
    return attn.v_proj(hidden).view(B, L, -1, attn.head_dim).transpose(1, 2)


def attention_scaling(attn: torch.nn.Module) -> float:
    return float(attn.scaling)


def loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The loss the model's own forward computes from ``logits`` and ``labels``."""
    extra = {k: v for k, v in kwargs.items() if k == "num_items_in_batch"}
    return model.loss_function(logits=logits, labels=labels, vocab_size=text_config(model).vocab_size, **extra)


def skip_weight_init():
    """Context manager: build a model without initialising its weights (they are filled right after)."""
    from transformers.initialization import no_init_weights
    return no_init_weights()


def image_newline(model) -> torch.Tensor:
    """LLaVA-NeXT / OneVision's learned newline embedding ``[D]``, appended verbatim after grid rows."""
    return model.model.image_newline


def anyres_geometry(config, image_size, side: int) -> tuple[int, int, int, int]:
    """(tiles high, tiles wide, unpadded grid height, unpadded grid width) of an anyres image of ``image_size``
    (height, width) pixels, as LLaVA-NeXT's own helpers compute them."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints,
                                                   config.vision_config.image_size)
    unpadded = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), torch.tensor(image_size))
    return int(tiles_h), int(tiles_w), unpadded.shape[1], unpadded.shape[2]


def anyres_max_width(config, side: int) -> int:
    """The most tokens one row of an anyres image's high-resolution grid can hold: the widest grid of tiles
    (``image_grid_pinpoints``) times ``side`` patches; unpadding and OneVision's ``anyres_max`` only narrow it."""
    tile = config.vision_config.image_size
    return max(int(width) // tile for _, width in config.image_grid_pinpoints) * side


def tower_pixels(model, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
    """``[n_crops, 3, H, W]``: the crops ``get_image_features`` hands the vision tower, from its ``pixel_values``
    (anyres models: ``[n_images, max_crops, 3, H, W]`` padded with empty crops, which it strips)."""
    if pixel_values.dim() == 4:
        return pixel_values
    counts = [anyres_patch_count(model.config, size) for size in image_sizes]
    return torch.cat([p[:n] for p, n in zip(pixel_values, counts)])


def pack_onevision_values(model, values: torch.Tensor, image_size, newline: float) -> torch.Tensor:
    """``[n]``: one number per language-model token of a LLaVA-OneVision image, from ``values`` ``[c, N]`` given per
    token of each of the image's vision-tower inputs (base crop first; [CLS] included under the "default"
    strategy), laid out by the model's own feature packing: the base grid, then the tiles stitched, unpadded and
    (``anyres_max``) bilinearly resized, ``newline`` in every newline slot. fp32."""
    if vision_feature_strategy(model) == "default":
        values = values[:, 1:]
    packed, _ = model.model.pack_image_features(
        [values.float()[..., None]], torch.as_tensor([list(image_size)]),
        image_newline=torch.full((1,), float(newline), device=values.device),
        vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0][:, 0] if isinstance(packed, (list, tuple)) else packed[:, 0]


def anyres_patch_count(config, image_size) -> int:
    """Vision-encoder inputs (base image + tiles) LLaVA-NeXT / OneVision make of an image of ``image_size``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    return int(image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size))


def shadow_method(obj, name: str, wrapper) -> None:
    """Route ``obj.name(...)`` through ``wrapper(original, ...)`` by shadowing the bound method on the instance.

    Used where no public hook exists: Qwen3-VL's DeepStack additions between decoder layers
    (``language_model._deepstack_process``), ``generate`` (a request in flight, with a ``finally`` that also runs on
    ``KeyboardInterrupt``) and ``forward`` (torch skips always-call forward hooks when a ``BaseException`` other than
    ``Exception`` ends the call). An instance attribute already there
    (accelerate's device hooks set ``module.forward``) is what the wrapper calls, and ``unshadow_method`` puts it
    back; otherwise it removes the instance attribute, restoring the class's method."""
    original = getattr(obj, name)
    shadow = functools.partial(wrapper, original)
    functools.update_wrapper(shadow, original)  # generate() reads get_image_features' signature to call it
    shadow.__dict__["_vtr_previous"] = vars(obj).get(name, _ABSENT)
    setattr(obj, name, shadow)


_ABSENT = object()


def unshadow_method(obj, name: str) -> None:
    if name in vars(obj):
        previous = getattr(vars(obj)[name], "_vtr_previous", _ABSENT)
        if previous is _ABSENT:
            delattr(obj, name)
        else:
            setattr(obj, name, previous)


def refuse_cache(cache, message: str) -> None:
    """Make every later use of ``cache`` (a ``DynamicCache``) to run a model raise ``ValueError(message)``: its
    ``update`` (every attention layer writes through it) and ``get_mask_sizes`` (every mask is sized by it) are
    shadowed on the instance, so the unpatched model, or any other code, fails before computing anything on it.
    Copies (``copy.deepcopy``) carry the refusal; reading the cache (``get_seq_length``, its tensors) still works."""
    refusal = functools.partial(_refused_cache, message)
    for name in ("update", "get_mask_sizes"):
        setattr(cache, name, refusal)
    cache._vtr_refusal = message


def cache_refusal(cache) -> str | None:
    """The message ``refuse_cache`` gave ``cache``, if any."""
    return getattr(cache, "_vtr_refusal", None)


def _refused_cache(message: str, *args, **kwargs):
    raise ValueError(message)


# ``generate`` (transformers >= 5.2x) encodes a batch's images and videos once, before it repeats each row for beam
# search or several return sequences, and repeats each row's encodings with it (``_expand_multimodal_outputs``):
# the prefill's row ``r`` is then copy ``r % E`` of prompt ``r // E``, encoded as prompt ``r // E``. Older releases
# expand the pixels instead and encode every row in the prefill.
GENERATE_EXPANSION = "_expand_inputs_for_generation"


def pre_encoded_expansion(function, args: tuple, kwargs: dict) -> int:
    """The factor a ``_expand_inputs_for_generation`` call repeats the rows by, when it repeats visual encodings
    ``generate`` made before (``mm_encoder_outputs``); 1 otherwise."""
    expand = call_argument(function, args, kwargs, "expand_size") or 1
    return int(expand) if kwargs.get("mm_encoder_outputs") else 1


def processor_without_video(cls, **kwargs):
    """A processor of class ``cls`` with no video processor. Without torchvision transformers cannot build one, and
    its type check of ``video_processor=None`` fails, so a subclass leaves the attribute out of its list."""
    sub = type(cls.__name__ + "NoVideo", (cls,),
               {"get_attributes": classmethod(lambda c: [a for a in cls.get_attributes() if a != "video_processor"])})
    proc = sub(video_processor=None, **kwargs)
    proc.video_processor = None
    return proc


# ---------------------------------------------------------------------------------------------- vision tower
# LLaVA-family towers are CLIP / SigLIP ``*VisionModel``s: ``vision_tower[.vision_model].encoder.layers[i]`` with
# ``self_attn`` (``q_proj``/``k_proj``/``num_heads``/``head_dim``/``scale``), whose output tuple starts with the
# hidden states; ``get_image_features`` (on the base model) runs the tower, keyword ``image_sizes`` for anyres.
IMAGE_FEATURES = "get_image_features"
VIDEO_FEATURES = "get_video_features"  # LLaVA-OneVision: the frames through the tower, the projector, 2x2 pooling


def has_own_video_encoding(model: torch.nn.Module) -> bool:
    """Whether the model encodes videos by its own ``get_video_features`` (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL),
    not through ``get_image_features`` (Qwen3-VL), so that video frames' tower signals can be told from images'."""
    base = base_model(model)
    if not hasattr(base, VIDEO_FEATURES):
        return False
    return IMAGE_FEATURES not in inspect.getsource(type(base).get_video_features)


def video_pixels(function, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``[videos, frames, C, H, W]`` pixels a ``get_video_features`` call receives (``pixel_values_videos``
    from transformers 5.2x on, ``pixel_values`` before)."""
    for name in ("pixel_values_videos", "pixel_values"):
        value = call_argument(function, args, kwargs, name)
        if value is not None:
            return value
    return None


def pool_video_frames(model: torch.nn.Module, values: torch.Tensor) -> torch.Tensor:
    """LLaVA-OneVision's own pooling of video frames (``apply_pooling``: bilinear, ``side -> ceil(side / 2)``) on
    any per-patch quantity: ``[F, side * side, k]`` -> ``[F, ceil(side / 2) ** 2, k]``, raster order. Signals of the
    vision tower (attention, scores) are pooled exactly as the features the language model receives."""
    base = base_model(model)
    if not hasattr(base, "apply_pooling"):
        raise ValueError(f"vtr: {type(model).__name__} does not pool video frames (LLaVA-OneVision does)")
    return base.apply_pooling(values)


def siglip_pooling_signals(siglip: torch.nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's attention-pooling ("MAP") head applied to vision-tower outputs, as FastVID's LLaVA-OneVision code does
    (``post_layernorm``, then the head with its probe query): ``(pooled [F, D_v], probe attention [F, P])``, the
    attention mean over heads (``nn.MultiheadAttention``'s default), fp32.

    siglip: a ``SiglipVisionModel`` / ``SiglipModel`` / ``SiglipVisionTransformer`` with its head
    (``google/siglip-so400m-patch14-384``; the ``-hf`` LLaVA-OneVision checkpoints drop it); features: ``[F, P, D_v]``
    the tower outputs of ``F`` frames. Raises ``ValueError`` when the module has no head."""
    vision = vision_pooling_module(siglip)
    width = vision.post_layernorm.normalized_shape[-1]
    if width != features.shape[-1]:
        raise ValueError(f"vtr: siglip_head is {width} wide, this model's vision tower {features.shape[-1]}: pass "
                         "the SigLIP checkpoint the tower comes from (google/siglip-so400m-patch14-384 for "
                         "LLaVA-OneVision)")
    param = next(vision.parameters())
    x = vision.post_layernorm(features.to(param.device, param.dtype))
    head = vision.head
    probe = head.probe.expand(x.shape[0], -1, -1)
    _, weights = head.attention(probe, x, x, need_weights=True, average_attn_weights=True)
    return head(x).float().to(features.device), weights[:, 0].float().to(features.device)


def vision_pooling_module(siglip) -> torch.nn.Module:
    """The SigLIP vision transformer holding ``post_layernorm`` and the attention-pooling ``head``; ``ValueError``
    naming what is missing otherwise."""
    vision = getattr(siglip, "vision_model", siglip)
    head = getattr(vision, "head", None)
    if not isinstance(vision, torch.nn.Module) or head is None or not hasattr(head, "probe") \
            or not hasattr(vision, "post_layernorm"):
        raise ValueError("vtr: expected a SigLIP vision model with its attention-pooling head and post_layernorm "
                         "(SiglipVisionModel.from_pretrained('google/siglip-so400m-patch14-384'), built with "
                         f"vision_use_head=True), got {type(siglip).__name__}")
    return vision


def vision_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The vision tower's encoder layers (Qwen-VL: its blocks)."""
    visual = getattr(model.model, "visual", None)
    if visual is not None:
        return visual.blocks
    tower = getattr(model.model, "vision_tower", None)
    tower = getattr(tower, "vision_model", tower)  # older releases wrap the transformer once more
    if tower is None or not hasattr(tower, "encoder"):
        raise ValueError(f"vtr: {type(model).__name__} has no CLIP/SigLIP-style vision tower")
    encoder = tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer  # InternViT: ``encoder.layer``


def vision_self_attention(layer: torch.nn.Module) -> torch.nn.Module:
    for name in ("self_attn", "attn", "attention"):  # CLIP / SigLIP, Qwen-VL, InternViT
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"vtr: no attention module found in the vision layer {type(layer).__name__}")


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def vision_feature_layer(model: torch.nn.Module) -> int:
    """0-based index of the vision layer whose output the projector reads (``vision_feature_layer=-2`` of a
    24-layer CLIP is layer 22: ``hidden_states`` starts with the embeddings). Qwen-VL's merger reads the last
    block."""
    chosen = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(chosen, int):
        raise ValueError(f"vtr: vision_feature_layer={chosen!r} (several layers concatenated) is not supported by "
                         "methods that read vision-tower signals")
    n = len(vision_layers(model))
    index = chosen % (n + 1) - 1
    if index < 0:
        raise ValueError("vtr: vision_feature_layer selects the patch embeddings, which no vision layer produces")
    return index


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def vision_grid_side(model: torch.nn.Module) -> int:
    """Patches per row of one square vision-tower input."""
    vision = model.config.vision_config
    return _side(vision.image_size) // _side(vision.patch_size)


def vision_patch_size(model: torch.nn.Module) -> int:
    """Pixels per side of one vision-tower patch."""
    return _side(model.config.vision_config.patch_size)


# InternVL: each tile's patch grid (CLS dropped) is pixel-shuffled 2x2 (``downsample_ratio`` 0.5) into language tokens
# by ``InternVLModel.pixel_shuffle``, four patch features concatenated per token.
def vision_token_side(model: torch.nn.Module) -> int:
    """Language tokens per row of one tile after the pixel shuffle (16 for a 448-px InternViT tile)."""
    return int(vision_grid_side(model) * model.config.downsample_ratio)


def tokens_per_tile(model: torch.nn.Module) -> int:
    return vision_token_side(model) ** 2


def pixel_shuffle_units(model: torch.nn.Module) -> torch.Tensor:
    """``[T, u]``: the raster patch indices (0-based, no [CLS]) whose features the model's own pixel shuffle
    concatenates into each of a tile's ``T`` language tokens, in concatenation order (``u = 4``), found by running
    ``pixel_shuffle`` on the patch indices themselves."""
    side = vision_grid_side(model)
    grid = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
    shuffled = model.model.pixel_shuffle(grid, scale_factor=model.config.downsample_ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def vision_feature_output(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's feature selection makes of the feature layer's output: InternVL with
    ``vision_feature_layer=-1`` reads the tower's ``last_hidden_state``, i.e. after its final ``layernorm`` (an
    identity under ``use_mean_pooling``); LLaVA reads ``hidden_states`` (the layer output itself)."""
    tower = getattr(model.model, "vision_tower", None)
    if type(model).__name__ == "InternVLForConditionalGeneration" and model.config.vision_feature_layer == -1:
        return tower.layernorm(hidden)
    return hidden


def vision_feature_strategy(model: torch.nn.Module) -> str:
    """``"default"`` (the [CLS] token is dropped before the projector) or ``"full"``."""
    return model.config.vision_feature_select_strategy


def call_argument(function, args: tuple, kwargs: dict, name: str):
    """The value ``function(*args, **kwargs)`` receives for parameter ``name`` (None if not passed)."""
    if name in kwargs:
        return kwargs[name]
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(name)


def _vision_heads(attn: torch.nn.Module, proj: str, hidden: torch.Tensor) -> torch.Tensor:
    """``[n, N, D]`` -> ``[n, H, N, d]`` projections of a CLIP/SigLIP/InternViT attention module (InternViT-6B: its
    RMSNorm over the whole projection, ``q_norm`` / ``k_norm``, before the split into heads)."""
    n, N, _ = hidden.shape
    x = getattr(attn, proj)(hidden)
    norm = getattr(attn, proj[0] + "_norm", None)
    if norm is not None:
        x = norm(x)
    return x.view(n, N, attn.num_heads, attn.head_dim).transpose(1, 2)


def vision_attention_rows(attn: torch.nn.Module, hidden: torch.Tensor, rows: slice | torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention probabilities of the query tokens ``rows`` over all tokens, per head: ``[n, H, r, N]``.

    hidden: ``[n, N, D]`` the attention module's input (after the layer norm); no mask (every token of a CLIP or
    SigLIP image attends to every other). Logits in ``dtype``, softmax in fp32 as eager attention does. (The
    projections computed again; ``vision_attention_probs`` takes the ones the tower computed.)"""
    return vision_attention_probs(attn, attn.q_proj(hidden[:, rows]), attn.k_proj(hidden), slice(None), dtype)


def vision_attention_probs(attn: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor,
                           rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, H, r, N]``: softmax attention probabilities of the query tokens ``rows`` over all tokens, per head, from
    a CLIP/SigLIP attention module's own query and key projections ``[n, N, H * d]`` (bias included, queries not
    yet scaled: the outputs of ``vision_projections``). Logits in ``dtype``, softmax in fp32 as eager attention
    does; only the ``r`` rows asked for are computed."""
    q = vision_heads(attn, queries[:, rows], "q").to(dtype)
    k = vision_heads(attn, keys, "k").to(dtype)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    return logits.softmax(-1, dtype=torch.float32).to(dtype)


def vision_head_mean_keys(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[n, N, d]``: the attention module's keys (with the projection bias), mean over heads."""
    return _vision_heads(attn, "k_proj", hidden).mean(1)


# The ``vision`` stage runs later CLIP/SigLIP layers on fewer tokens: the layer output returned by a forward hook
# becomes the next layer's input (``CLIPEncoder`` loops ``hidden_states = layer(hidden_states, attention_mask)``),
# crops of different lengths are right-padded and given an additive key mask as the layer's second argument, and
# the tower's ``BaseModelOutputWithPooling`` (``last_hidden_state``, ``hidden_states``) is rewritten at the tower.
def vision_projections(attn: torch.nn.Module) -> dict:
    """The attention module's query, key and value projections (``q``/``k``/``v``): their outputs ``[n, N, H * d]``
    (bias included, queries not yet scaled) are what the attention runs on. Qwen-VL: its fused ``qkv`` projection
    (``[S, 3 * H * d]``, see ``qwen_vision_heads``)."""
    if hasattr(attn, "qkv"):
        return {"qkv": attn.qkv}
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}


def vision_prune_limit(model: torch.nn.Module, method) -> int:
    """The first vision layer at which a ``vision`` stage step may no longer drop tokens: the feature layer (its
    output is what the projector reads), one more on Qwen-VL towers (the official code prunes after the last block,
    which the merger reads) and for a step between a layer's attention and its MLP (ToMe: the feature layer's MLP
    then runs on the kept tokens)."""
    feature = vision_feature_layer(model)
    return feature + 1 if is_qwen_tower(model) or method.vision_merge_point == "attention" else feature


def vision_attention_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a CLIP/SigLIP encoder layer applies to its input before self-attention (``layer_norm1``)."""
    return layer.layer_norm1


def vision_feed_forward_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm a CLIP/SigLIP encoder layer applies to its residual stream after self-attention, before its MLP
    (``layer_norm2``: its input is the post-attention residual stream)."""
    return layer.layer_norm2


def vision_feed_forward_block(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The second half of a CLIP/SigLIP encoder layer on its post-attention residual stream: ``h + mlp(norm2(h))``."""
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def vision_attention_bias(lengths: torch.Tensor, sizes: torch.Tensor | None, width: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """``[C, 1, width, width]`` additive attention mask of a CLIP/SigLIP layer (eager and SDPA add it to the
    logits): ``log(size)`` of each real key token (ToMe's proportional attention; 0 without ``sizes``) and the
    dtype's minimum for each crop's right padding. sizes: ``[C, width]`` or None."""
    valid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=lengths.device)
    if sizes is not None:
        bias = torch.where(valid, sizes.float().clamp(min=1).log(), bias)
    mask = torch.where(valid, bias, torch.finfo(dtype).min).to(dtype)
    return mask[:, None, None, :].expand(-1, 1, width, width)


def vision_attention_scale(attn: torch.nn.Module) -> float:
    """The factor the attention logits are scaled by (``head_dim ** -0.5``)."""
    return attn.scaling if hasattr(attn, "scaling") else attn.scale


def vision_heads(attn: torch.nn.Module, projected: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """``[n, N, H * d]`` -> ``[n, H, N, d]``; ``kind`` (``"q"`` / ``"k"``): the module's norm over the whole
    projection applied first where it has one (InternViT-6B's ``q_norm`` / ``k_norm``; an identity elsewhere)."""
    norm = getattr(attn, f"{kind}_norm", None) if kind is not None else None
    if norm is not None:
        projected = norm(projected)
    n, N, _ = projected.shape
    return projected.view(n, N, attn.num_heads, attn.head_dim).transpose(1, 2)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output holds the tower's ``hidden_states`` (``model.model.vision_tower``)."""
    return model.model.vision_tower


def vision_has_cls(model: torch.nn.Module) -> bool:
    """Whether token 0 of every vision-tower sequence is a [CLS] token (CLIP: yes; SigLIP, Qwen-VL: no)."""
    if is_qwen_tower(model):
        return False
    tower = vision_tower(model)
    tower = getattr(tower, "vision_model", tower)
    embeddings = getattr(tower, "embeddings", None)
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")  # CLIP, InternViT


def vision_attn_implementation(model: torch.nn.Module) -> str:
    return model.config.vision_config._attn_implementation


def vision_padding_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[C, 1, width, width]`` additive mask (0 or the dtype's minimum) hiding each crop's padding keys: what a
    CLIP/SigLIP layer adds to its attention logits (eager and SDPA)."""
    valid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    mask = torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)
    return mask[:, None, None, :].expand(-1, 1, width, width)


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal projector (LLaVA family: a per-token MLP on ``[n_crops, P, D_v]`` features)."""
    return model.model.multi_modal_projector


def project_visual(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The multimodal projector applied to vision features ``[..., D_v]`` -> ``[..., D]`` (per token)."""
    return model.model.multi_modal_projector(features)


# ------------------------------------------------------------------------------------------- CLIP text side
def load_clip(name: str):
    """(``CLIPModel``, its tokenizer) from a checkpoint name or path: the text tower and the projections into
    CLIP's joint image-text space."""
    from transformers import AutoTokenizer, CLIPModel
    return CLIPModel.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


def load_tokenizer(name: str):
    """The tokenizer of a checkpoint (the language model's, to read a prompt's text back from its ids)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


def checkpoint_name(model: torch.nn.Module) -> str:
    """The name or path ``model`` was loaded from ('' for a model built from a config)."""
    return getattr(model.config, "_name_or_path", "") or ""


def clip_text_embeddings(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[M, C]`` projected text embeddings (the EOS-pooled output of the text tower through ``text_projection``)
    of ``M`` token sequences of the text tower's context length."""
    out = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_context_length(clip) -> int:
    return clip.config.text_config.max_position_embeddings


def clip_image_embeddings(model: torch.nn.Module, clip, features: torch.Tensor) -> torch.Tensor:
    """``[n, C]``: vision-layer hidden states ``[n, D_v]`` through the tower's own post-layernorm and CLIP's
    ``visual_projection`` (in fp32), i.e. into CLIP's joint image-text space."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    normed = tower.post_layernorm(features)
    projection = clip.visual_projection
    return projection(normed.float().to(projection.weight.dtype)).float()


# ------------------------------------------------------------------------------------ Qwen-VL vision transformer
# ``model.model.visual.blocks[i].attn`` with ``qkv``/``num_heads``/``scaling``, called with ``cu_seqlens`` (packed
# images or windows) and ``position_embeddings``; ``apply_rotary_pos_emb_vision`` in the attention's own file;
# Qwen2.5-VL orders its merge units by window (``get_vision_window_index``).
def _qwen_rotated_qk(attn: torch.nn.Module, hidden: torch.Tensor, extra: dict, dtype: torch.dtype,
                     qkv: torch.Tensor | None = None):
    """A Qwen-VL vision block's queries and keys ``[H, S, d]`` for its attention input ``hidden`` ``[S, D]``, after
    the vision RoPE of the call's ``position_embeddings``; from the block's own fused projection output ``qkv``
    (``[S, 3 * H * d]``) when given, else projected again."""
    q, k, _ = qwen_vision_heads(attn, attn.qkv(hidden) if qkv is None else qkv, *extra["position_embeddings"])
    return q.to(dtype), k.to(dtype)


def qwen_vision_keys(attn: torch.nn.Module, hidden: torch.Tensor, extra: dict, dtype: torch.dtype,
                     qkv: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, d]``: a Qwen-VL vision block's keys of its attention input ``hidden`` ``[S, D]`` after the vision RoPE,
    mean over heads, in the tower's (window) order (the key VisionZip's Qwen2.5-VL port reads); from the block's
    own fused projection output ``qkv`` when given."""
    return _qwen_rotated_qk(attn, hidden, extra, dtype, qkv)[1].mean(0)


def qwen_received_attention(attn: torch.nn.Module, hidden: torch.Tensor, extra: dict, dtype: torch.dtype,
                            chunk: int = 1024, qkv: torch.Tensor | None = None) -> torch.Tensor:
    """``[S]``: the softmax attention each patch receives in one Qwen-VL vision block, mean over heads and summed
    over the queries of its attention segment (its image, or its window in window-attention blocks); queries are
    taken ``chunk`` at a time, so at most ``[H, chunk, segment]`` probabilities are held.

    hidden: ``[S, D]`` the block's attention input (after ``norm1``), in the tower's (window) order; extra: the
    attention call's ``cu_seqlens`` and ``position_embeddings``; qkv: the block's own fused projection of it."""
    q, k = _qwen_rotated_qk(attn, hidden, extra, dtype, qkv)  # [H, S, d]
    bounds = extra["cu_seqlens"].tolist()
    received = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keys = k[:, start:stop]
        for first in range(start, stop, chunk):
            logits = torch.matmul(q[:, first:min(first + chunk, stop)], keys.transpose(-1, -2)) * attn.scaling
            probs = logits.softmax(-1, dtype=torch.float32).to(dtype)
            received[start:stop] += probs.mean(0).sum(0).float()
    return received


def qwen_mean_query_attention(attn: torch.nn.Module, hidden: torch.Tensor, extra: dict, dtype: torch.dtype,
                              unit: int, qkv: torch.Tensor | None = None) -> torch.Tensor:
    """``[U]``: FastVID's Qwen2.5-VL salience from one vision block, per attention segment (a temporal slice in the
    full-attention blocks): the softmax over the segment's merge units of ``q_mean . k_unit * scale``, ``q_mean`` the
    mean of the segment's queries and ``k_unit`` the mean of each merge unit's ``unit`` keys (both after the vision
    RoPE), mean over heads; merge units in the tower's order.

    hidden: ``[S, D]`` the block's attention input (after ``norm1``); extra: its ``cu_seqlens`` and
    ``position_embeddings``; qkv: the block's own fused projection of it."""
    q, k = _qwen_rotated_qk(attn, hidden, extra, dtype, qkv)  # [H, S, d]
    bounds = extra["cu_seqlens"].tolist()
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        query = q[:, start:stop].mean(1, keepdim=True)  # [H, 1, d]
        keys = k[:, start:stop].reshape(k.shape[0], (stop - start) // unit, unit, -1).mean(2)  # [H, u, d]
        logits = torch.matmul(query, keys.transpose(-1, -2)) * attn.scaling
        out.append(logits.softmax(-1, dtype=torch.float32).to(dtype)[:, 0].mean(0).float())
    return torch.cat(out)


def qwen_unit_order(model: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """``[U]``: for each merge unit in the vision tower's order, its index in the merged-token (raster) order of
    all images of the call; the identity for towers without window attention (Qwen2-VL, Qwen3-VL)."""
    visual = model.model.visual
    units = int((grid_thw.prod(-1) // visual.spatial_merge_size ** 2).sum())
    if not hasattr(visual, "window_size"):
        return torch.arange(units)
    if hasattr(visual, "get_window_index"):  # older releases
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index
    return get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]


def qwen_merge_unit(model: torch.nn.Module) -> int:
    """Patches per merged token (4 for the 2x2 merger)."""
    return model.model.visual.spatial_merge_size ** 2


# The ``vision`` stage on Qwen-VL towers: the blocks run on one packed ``[S, D]`` sequence (images one after the
# other; Qwen2.5-VL: each image's merge units in window order), given ``cu_seqlens`` (per image frame, or per window
# in Qwen2.5-VL's window-attention blocks), ``max_seqlen`` and the rotary ``position_embeddings`` as keyword
# arguments; the merger (and Qwen3-VL's DeepStack mergers) concatenate 4 consecutive rows.
def is_qwen_tower(model: torch.nn.Module) -> bool:
    return getattr(model.model, "visual", None) is not None


def qwen_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.visual


def qwen_mergers(model: torch.nn.Module) -> list:
    """The modules that read the tower's rows 4 at a time: the patch merger, then Qwen3-VL's DeepStack mergers."""
    visual = model.model.visual
    return [visual.merger] + list(getattr(visual, "deepstack_merger_list", None) or [])


def qwen_window_blocks(model: torch.nn.Module) -> set:
    """Blocks that attend within windows (Qwen2.5-VL: those not in ``fullatt_block_indexes``); empty otherwise."""
    visual = model.model.visual
    if not hasattr(visual, "window_size"):
        return set()
    return set(range(len(visual.blocks))) - set(visual.fullatt_block_indexes)


def qwen_grid_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tower call's ``grid_thw`` (``[n, 3]``: frames, patch rows, patch columns of each image)."""
    return kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]


def qwen_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[F + 1]`` int32 boundaries of the full-attention segments (one per image frame), in tower rows."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


def qwen_window_seqlens(model: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """``[W + 1]`` int32 boundaries of Qwen2.5-VL's attention windows, in tower rows (window order)."""
    visual = model.model.visual
    if hasattr(visual, "get_window_index"):  # older releases
        return torch.as_tensor(visual.get_window_index(grid_thw)[1], dtype=torch.int32)
    from transformers.vision_utils import get_vision_window_index
    return get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)[1]


def qwen_vision_heads(attn: torch.nn.Module, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(q, k, v)``, each ``[H, n, d]``: a Qwen-VL vision attention's fused projection output ``[n, 3 * H * d]`` split
    into heads, queries and keys rotated by the rows' rotary ``cos``/``sin`` (``[n, d]``), as the block does."""
    n = qkv.shape[0]
    q, k, v = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
