"""Loading models for benchmarks (a real checkpoint, a shipped config with random weights, or a tiny random model
with its offline processor), estimating their memory before building them, and building synthetic prompts that
need no processor."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .. import compat
from .cli import CONFIG_DIR, SHIPPED, TINY_PREFIX, kind_of  # noqa: F401  (CONFIG_DIR, SHIPPED: public names)

# Models laid out as Qwen-VL's grids of merged tokens between a start and an end token, 3-D RoPE.
QWEN_GRID_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")
# Share of the weights' size added for activations, the KV cache and the loader's buffers in the memory estimate.
WORKSPACE = 0.15


class NotEnoughMemory(RuntimeError):
    """The model would not fit in the device's available memory; raised before anything is built."""


def load_config(name: str, layers: int | None = None, vision_layers: int | None = None, width_divisor: int = 1,
                vision_width_divisor: int = 1):
    """Config of a shipped model name (``llava-1.5-7b``...), a config.json path, or a hub id / checkpoint dir;
    optionally with fewer text and vision layers (same widths). Vision-layer indexes past the kept depth (Qwen2.5-VL's
    full-attention blocks, Qwen3-VL's DeepStack taps) are dropped. ``width_divisor`` narrows the language model
    (see ``narrow``), ``vision_width_divisor`` the vision tower (``narrow_vision``)."""
    if name in SHIPPED or name.endswith(".json"):
        data = json.loads(Path(SHIPPED.get(name, name)).read_text())
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        config = transformers.AutoConfig.for_model(**data)
    else:
        config = transformers.AutoConfig.from_pretrained(name)
    text = config.get_text_config()
    if layers is not None:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            types = list(text.layer_types[:layers])
            if "linear_attention" in types and all(t == "linear_attention" for t in types):
                # a hybrid model cut above its first attention layer (Qwen3.5: 3 linear, then 1 full) keeps one,
                # last: a cache needs an attention layer to have a length
                types[-1] = "full_attention"
            text.layer_types = types
    if vision_layers is not None:
        vision = config.vision_config
        for key in ("num_hidden_layers", "depth"):
            if hasattr(vision, key):
                setattr(vision, key, vision_layers)
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if hasattr(vision, key):
                setattr(vision, key, [i for i in getattr(vision, key) if i < vision_layers])
    if width_divisor != 1:
        narrow(config, width_divisor)
    if vision_width_divisor != 1:
        narrow_vision(config, vision_width_divisor)
    return config


# The vision towers' width fields: CLIP / SigLIP, Qwen2-VL (embed_dim; its hidden_size is the merger's output),
# Qwen2.5-VL / Qwen3-VL (hidden_size; the merger's output is out_hidden_size).
_VISION_WIDTHS = {"qwen2_vl": ("embed_dim", None, "num_heads"),
                  "qwen2_5_vl": ("hidden_size", "intermediate_size", "num_heads"),
                  "qwen3_vl": ("hidden_size", "intermediate_size", "num_heads")}


def narrow_vision(config, divisor: int) -> None:
    """Divide the vision tower's width by ``divisor`` in place: hidden size, MLP size (Qwen2-VL: its MLP ratio
    follows) and heads, keeping the head dimension (so the tower's rotary embedding and attention per head are the
    real model's) and its depth. With ``narrow`` by the same divisor, the tower's share of a prefill is close to
    the real model's (its attention's share grows as the language model's does), which is what lets a benchmark
    weigh vision-side signal work as the real model would. Raises ValueError when the widths do not divide."""
    vision = config.vision_config
    hidden, mlp, heads = _VISION_WIDTHS.get(config.model_type, ("hidden_size", "intermediate_size",
                                                                 "num_attention_heads"))
    for key in (hidden, mlp, heads):
        if key is not None and getattr(vision, key) % divisor:
            raise ValueError(f"the vision tower's {key} ({getattr(vision, key)}) does not divide by {divisor}")
    for key in (hidden, mlp, heads):
        if key is not None:
            setattr(vision, key, getattr(vision, key) // divisor)


def narrow(config, divisor: int) -> None:
    """Divide the language model's width by ``divisor`` in place: hidden size, MLP size, query and key/value heads
    (at least one), keeping the head dimension (so rotary sections and attention per head are the real model's).
    The vision tower keeps its width; its projector's output follows the new hidden size. A full-depth model this
    narrow costs about depth / divisor**2 full-width layers, which is how the ``full-depth`` preset keeps the real
    ratio of pruned to unpruned layers (DART after layer 2 of 32) within a CPU's minutes. Attention's share of a
    layer's FLOPs grows by ``divisor`` (at 640 tokens and hidden 1024, about 10% instead of 3%).
    Raises ValueError when the widths do not divide."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(text, key, None) is not None and getattr(text, key) % divisor:
            raise ValueError(f"--width-divisor {divisor} does not divide the language model's {key} "
                             f"({getattr(text, key)})")
    text.hidden_size //= divisor
    if getattr(text, "intermediate_size", None) is not None:  # (Qwen3.5-MoE has none: experts only)
        text.intermediate_size //= divisor
    for key in ("shared_expert_intermediate_size",):
        if getattr(text, key, None):
            setattr(text, key, max(1, getattr(text, key) // divisor))
    if getattr(text, "moe_intermediate_size", None):  # mixture-of-experts models: each expert's width too
        text.moe_intermediate_size = max(1, text.moe_intermediate_size // divisor)
    text.num_attention_heads //= divisor
    text.num_key_value_heads = max(1, text.num_key_value_heads // divisor)
    if hasattr(text, "head_dim"):
        text.head_dim = head_dim
    vision = getattr(config, "vision_config", None)
    # the projector's output width: Qwen2.5/3-VL name it out_hidden_size, Qwen2-VL's vision hidden_size is it
    if hasattr(vision, "out_hidden_size"):
        vision.out_hidden_size = text.hidden_size
    elif config.model_type == "qwen2_vl":
        vision.hidden_size = text.hidden_size


def _depths(config) -> tuple[int, int | None]:
    vision = getattr(config, "vision_config", None)
    vision_depth = next((getattr(vision, k) for k in ("num_hidden_layers", "depth") if hasattr(vision, k)), None)
    return config.get_text_config().num_hidden_layers, vision_depth


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are ~6x slower than fp32 on CPUs without AVX-512-BF16/AMX
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def weight_bytes(config, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes) of the model ``config`` describes, counted on the meta device (nothing allocated)."""
    with compat.skip_weight_init(), torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype)
        model.tie_weights()  # skipping the initialisation skips the tying too (Gemma 3 ties its embeddings)
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(p.numel() for p in model.parameters()), sum(t.numel() * t.element_size() for t in tensors)


def available_memory(device: torch.device) -> int | None:
    """Bytes the process can still allocate on ``device``: free GPU memory, or on the CPU the kernel's
    MemAvailable capped by the cgroup's limit. None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


@dataclass
class Plan:
    """What ``build`` will make, known before anything is allocated."""

    name: str
    kind: str  # see cli.kind_of
    random_weights: bool
    config: object | None  # None for tiny models (vtr.testing builds their config)
    dtype: torch.dtype
    device: torch.device
    layers: int | None = None
    total_layers: int | None = None
    vision_layers: int | None = None
    total_vision_layers: int | None = None
    parameters: int | None = None
    bytes: int | None = None  # weights in `dtype`
    needed: int | None = None  # weights plus WORKSPACE
    available: int | None = None
    width_divisor: int = 1  # the language model's width divided by this (``narrow``)
    vision_width_divisor: int = 1  # the vision tower's width divided by this (``narrow_vision``)

    def describe(self) -> str:
        """One line, e.g. ``llava-1.5-7b: random weights, 3 of 32 decoder layers, 2 of 24 vision layers, 0.74 B
        parameters in float32 on cpu (about 3.4 GB)``."""
        parts = ["random weights" if self.random_weights else "weights from the checkpoint"]
        if self.layers is not None:
            parts.append(f"{self.layers} of {self.total_layers} decoder layers")
        if self.width_divisor != 1:
            parts.append(f"language model at 1/{self.width_divisor} of its width")
        if self.vision_layers is not None:
            parts.append(f"{self.vision_layers} of {self.total_vision_layers} vision layers")
        if self.vision_width_divisor != 1:
            parts.append(f"vision tower at 1/{self.vision_width_divisor} of its width")
        where = f"{str(self.dtype).removeprefix('torch.')} on {self.device}"
        if self.parameters is not None:
            where = f"{self.parameters / 1e9:.2f} B parameters in {where} (about {self.needed / 1e9:.1f} GB)"
        return f"{self.name}: {', '.join(parts)}, {where}"


def plan(name: str, random_init: bool = False, layers: int | None = None, vision_layers: int | None = None,
         dtype: str = "auto", device: str = "auto", check_memory: bool = True, width_divisor: int = 1,
         vision_width_divisor: int = 1) -> Plan:
    """Resolve what ``name`` means and estimate its memory. Raises ``NotEnoughMemory`` (with the estimate and what
    is available) when the weights plus ``WORKSPACE`` exceed the device's available memory; ``ValueError`` for an
    unknown tiny family, --layers/--vision-layers on a checkpoint with real weights or --vision-layers on a tiny
    model; ``OSError`` when a checkpoint's config cannot be found or downloaded."""
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    kind = kind_of(name)
    if kind == "tiny":
        from ..testing import FAMILIES
        if width_divisor != 1 or vision_width_divisor != 1:
            raise ValueError("tiny models are already narrow; --width-divisor and --vision-width-divisor apply to "
                             "shipped configs, config files and --random-init")
        if name[len(TINY_PREFIX):] not in FAMILIES:
            raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_PREFIX + f for f in FAMILIES)}")
        if vision_layers is not None:
            raise ValueError("tiny models have 2 vision layers; --vision-layers does not apply")
        return Plan(name, kind, True, None, dtype_, device_, layers=layers or 4, total_layers=layers or 4)
    random_weights = random_init or kind in ("shipped", "config")
    if not random_weights and (layers is not None or vision_layers is not None or width_divisor != 1
                               or vision_width_divisor != 1):
        raise ValueError("--layers/--vision-layers/--width-divisor/--vision-width-divisor apply to random weights "
                         "only (shipped configs, config.json files, or --random-init)")
    total_layers, total_vision = _depths(load_config(name))
    config = load_config(name, layers, vision_layers, width_divisor, vision_width_divisor)
    kept_layers, kept_vision = _depths(config)
    parameters, size = weight_bytes(config, dtype_)
    result = Plan(name, kind, random_weights, config, dtype_, device_, kept_layers, total_layers, kept_vision,
                  total_vision, parameters, size, int(size * (1 + WORKSPACE)), available_memory(device_),
                  width_divisor, vision_width_divisor)
    if check_memory and result.available is not None and result.needed > result.available:
        raise NotEnoughMemory(
            f"{name} with {kept_layers} of {total_layers} decoder layers in {str(dtype_).removeprefix('torch.')} "
            f"needs about {result.needed / 1e9:.1f} GB ({parameters / 1e9:.2f} B parameters = "
            f"{size / 1e9:.1f} GB of weights, plus {WORKSPACE:.0%} for activations), but only "
            f"{result.available / 1e9:.1f} GB is available on {device_}. Nothing was built. Use fewer layers "
            f"(--layers; random weights only), a smaller dtype (--dtype bfloat16), or a machine with more memory.")
    return result


def build(plan: Plan, attn: str = "sdpa"):
    """Returns (model, processor or None) for a ``Plan``: random weights for shipped configs, config files and
    --random-init; the checkpoint's weights and processor otherwise; a tiny model with its offline processor."""
    if plan.kind == "tiny":
        from ..testing import tiny_model
        model, processor = tiny_model(plan.name[len(TINY_PREFIX):], attn=attn, layers=plan.layers)
        return model.to(device=plan.device, dtype=plan.dtype), processor
    if plan.random_weights:
        return random_model(plan.config, plan.dtype, plan.device, attn), None
    model = transformers.AutoModelForImageTextToText.from_pretrained(plan.name, dtype=plan.dtype,
                                                                     attn_implementation=attn)
    return model.to(plan.device).eval(), transformers.AutoProcessor.from_pretrained(plan.name)


def random_model(config, dtype: torch.dtype, device: torch.device, attn: str, seed: int = 0):
    """A model with random weights, built directly on ``device``: norms at 1, biases at 0, other weights from a
    tiled block of N(0, 0.02) values (a prime-length block, so rows differ; filling 7B-wide layers element by
    element would take longer than the benchmark)."""
    with compat.skip_weight_init(), torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation=attn,
                                                                     dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    block = (torch.randn(1_000_003, generator=generator) * 0.02).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name or "ln" in name.split(".")[-2] else 0.0)
                continue
            flat = param.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start:start + block.numel()]
                chunk.copy_(block[:chunk.numel()])
    return model.eval()


def load(name: str, random_init: bool = False, layers: int | None = None, vision_layers: int | None = None,
         dtype: str = "auto", attn: str = "sdpa", device: str = "auto"):
    """``build(plan(...))``: returns (model, processor or None). Shipped names and config paths always use random
    weights and have no processor. Raises ``NotEnoughMemory`` before building a model that would not fit."""
    return build(plan(name, random_init, layers, vision_layers, dtype, device), attn)


def parse_video(text: str) -> tuple[int, int]:
    """``"FRAMESxTOKENS"`` (e.g. ``"16x256"``): frames and visual tokens per frame, both >= 1. Raises
    ``ValueError`` naming the expected form."""
    frames, sep, tokens = text.lower().partition("x")
    try:
        frames, tokens = int(frames), int(tokens)
    except ValueError:
        frames = tokens = 0
    if not sep or frames < 1 or tokens < 1:
        raise ValueError(f"a video is given as FRAMESxTOKENS (frames x visual tokens per frame, e.g. 16x256), "
                         f"got {text!r}")
    return frames, tokens


def synthetic_inputs(model, batch: int = 1, prompt_tokens: int = 64, image_size: int | None = None,
                     seed: int = 0, video: tuple[int, int] | None = None) -> dict:
    """A batch of identical-length prompts, one image each (or one video: ``video=(frames, tokens per frame)``),
    built from the config alone: ``prompt_tokens`` text tokens around the placeholder tokens, random pixels.
    Returns model inputs on the model's device.

    Videos (Qwen2-VL / 2.5-VL / 3-VL): ``frames`` temporal slices of the language model's input (each stands for
    ``temporal_patch_size`` = 2 video frames, as the Qwen video processors pair them) of ``tokens`` merged tokens
    each (a square number: a ``sqrt(tokens)``-a-side grid); Qwen3-VL gets one vision-start/end run per slice, as its
    processor writes it (without the timestamp text). LLaVA-OneVision: ``frames`` frames of the tower's pooled
    tokens per frame (196 at 384 px), which ``tokens`` must equal, plus the trailing newline token. Raises
    ``ValueError`` for a count the model cannot produce, ``NotImplementedError`` for other families."""
    if video is not None:
        return _synthetic_video(model, batch, prompt_tokens, video, seed)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")} | {getattr(text, "bos_token_id", None),
                                                                          getattr(text, "eos_token_id", None)}
    def words(n):
        ids = torch.randint(100, min(text.vocab_size, 30000), (batch, n), generator=generator)
        ids[torch.isin(ids, torch.tensor([s for s in special if s is not None]))] = 100
        return ids

    before, after = prompt_tokens // 4, prompt_tokens - prompt_tokens // 4
    kind = config.model_type
    if kind == "llava":
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        image = torch.full((batch, n), config.image_token_id)
        ids = torch.cat([words(before), image, words(after)], 1)
        size = image_size or vision.image_size
        inputs = {"input_ids": ids, "pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    elif kind in ("llava_next", "llava_onevision"):
        # One anyres image of image_size x image_size pixels (default: two tiles a side); the placeholder count
        # is whatever the model's own feature packing yields for it.
        vision = config.vision_config
        size = image_size or 2 * vision.image_size
        tiles = compat.anyres_patch_count(config, (size, size))
        pixels = torch.randn(batch, tiles, 3, vision.image_size, vision.image_size, generator=generator)
        sizes = torch.tensor([[size, size]] * batch)
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels[:1].to(model.device, dtype),
                                                      image_sizes=sizes[:1], return_dict=True).pooler_output
        image = torch.full((batch, len(features[0])), config.image_token_id)
        ids = torch.cat([words(before), image, words(after)], 1)
        inputs = {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes}
    elif kind == "internvl":
        # One image of image_size x image_size pixels (default: 2 x 2 tiles), its tiles then the thumbnail, as the
        # processor cuts a square image; image_seq_length tokens per tile between <img> and </img> (here: text).
        side = compat.vision_grid_side(model) * compat.vision_patch_size(model)
        tiles = max(1, round((image_size or 2 * side) / side)) ** 2
        crops = tiles + (tiles > 1)
        image = torch.full((batch, crops * compat.tokens_per_tile(model)), config.image_token_id)
        ids = torch.cat([words(before), image, words(after)], 1)
        inputs = {"input_ids": ids, "pixel_values": torch.randn(batch * crops, 3, side, side, generator=generator)}
    elif kind == "gemma3":
        # One image: mm_tokens_per_image placeholders between <start_of_image> and <end_of_image>, token types 1
        vision = config.vision_config
        image = torch.cat([torch.full((batch, 1), config.boi_token_index),
                           torch.full((batch, config.mm_tokens_per_image), config.image_token_id),
                           torch.full((batch, 1), config.eoi_token_index)], 1)
        ids = torch.cat([words(before), image, words(after)], 1)
        inputs = {"input_ids": ids, "token_type_ids": (ids == config.image_token_id).long(),
                  "pixel_values": torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)}
    elif kind in QWEN_GRID_KINDS:
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        side = (image_size or 672) // unit * unit
        grid = side // vision.patch_size  # patches per side
        n = (grid // vision.spatial_merge_size) ** 2
        start, end = ((config.image_start_token_id, config.image_end_token_id) if kind.startswith("glm4v") else
                      (config.vision_start_token_id, config.vision_end_token_id))
        image = torch.cat([torch.full((batch, 1), start), torch.full((batch, n), config.image_token_id),
                           torch.full((batch, 1), end)], 1)
        ids = torch.cat([words(before), image, words(after)], 1)
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        inputs = {"input_ids": ids,
                  "pixel_values": torch.randn(batch * grid * grid, patch_dim, generator=generator),
                  "image_grid_thw": torch.tensor([[1, grid, grid]] * batch),
                  "mm_token_type_ids": (ids == config.image_token_id).long()}
    else:
        raise NotImplementedError(f"synthetic inputs for {kind} are not implemented; pass a real checkpoint "
                                  "with --model and its processor builds the inputs")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    dtype = next(model.parameters()).dtype
    return {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) for k, v in inputs.items()}


def _synthetic_video(model, batch: int, prompt_tokens: int, video: tuple[int, int], seed: int) -> dict:
    config = model.config
    frames, tokens = video
    generator = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    video_id = getattr(config, "video_token_id", None) or getattr(config, "video_token_index", None)
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id", "image_token_index",
                                                   "video_token_index")} | {text.bos_token_id, text.eos_token_id}

    def words(n):
        ids = torch.randint(100, min(text.vocab_size, 30000), (batch, n), generator=generator)
        ids[torch.isin(ids, torch.tensor([s for s in special if s is not None]))] = 100
        return ids

    before, after = prompt_tokens // 4, prompt_tokens - prompt_tokens // 4
    kind = config.model_type
    if kind in QWEN_GRID_KINDS:
        vision = config.vision_config
        side = int(tokens ** 0.5)
        if side * side != tokens:
            raise ValueError(f"Qwen-VL frames are square grids of merged tokens: tokens per frame must be a square "
                             f"number (e.g. 256 = 16 x 16), got {tokens}")
        grid = side * vision.spatial_merge_size  # patches per side
        glm = kind.startswith("glm4v")  # frames are images between <|begin_of_video|> ... <|end_of_video|>
        start = torch.full((batch, 1), config.image_start_token_id if glm else config.vision_start_token_id)
        end = torch.full((batch, 1), config.image_end_token_id if glm else config.vision_end_token_id)
        run = torch.full((batch, tokens), config.image_token_id if glm else video_id)
        if kind.startswith(("qwen3_vl", "qwen3_5", "glm4v")):  # one start ... end run per temporal slice
            body = torch.cat([torch.cat([start, run, end], 1) for _ in range(frames)], 1)
        else:
            body = torch.cat([start, run.repeat(1, frames), end], 1)
        if glm:
            body = torch.cat([torch.full((batch, 1), config.video_start_token_id), body,
                              torch.full((batch, 1), config.video_end_token_id)], 1)
        ids = torch.cat([words(before), body, words(after)], 1)
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        inputs = {"input_ids": ids,
                  "pixel_values_videos": torch.randn(batch * frames * grid * grid, patch_dim, generator=generator),
                  "video_grid_thw": torch.tensor([[frames, grid, grid]] * batch),
                  "mm_token_type_ids": (ids == (config.image_token_id if glm else video_id)).long() * 2}
    elif kind == "llava_onevision":
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        pooled = (-(-side // 2)) ** 2  # 2x2 pooling, rounded up (27 -> 14 a side at 384 px)
        if tokens != pooled:
            raise ValueError(f"LLaVA-OneVision pools each frame to {pooled} tokens; give FRAMESx{pooled}")
        ids = torch.cat([words(before), torch.full((batch, frames * tokens + 1), video_id), words(after)], 1)
        inputs = {"input_ids": ids, "pixel_values_videos": torch.randn(batch, frames, 3, vision.image_size,
                                                                       vision.image_size, generator=generator)}
    else:
        raise NotImplementedError(f"synthetic videos for {kind} are not implemented (Qwen2/2.5/3-VL and "
                                  "LLaVA-OneVision are)")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    dtype = next(model.parameters()).dtype
    return {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) for k, v in inputs.items()}


def environment() -> dict:
    """Hardware and library versions, recorded with every result."""
    import platform

    import vtr
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vtr": vtr.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "cuda": None, "gpu": None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
