"""Loading models for benchmarks (a real checkpoint, or a shipped config with random weights) and building
synthetic prompts that need no processor."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers

from .. import compat

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def load_config(name: str, layers: int | None = None, vision_layers: int | None = None):
    """Config of a shipped model name (``llava-1.5-7b``...), a config.json path, or a hub id / checkpoint dir;
    optionally with fewer text and vision layers (same widths)."""
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
            text.layer_types = text.layer_types[:layers]
    if vision_layers is not None:
        vision = config.vision_config
        for key in ("num_hidden_layers", "depth"):
            if hasattr(vision, key):
                setattr(vision, key, vision_layers)
        if hasattr(vision, "fullatt_block_indexes"):
            vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < vision_layers]
    return config


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are ~6x slower than fp32 on CPUs without AVX-512-BF16/AMX
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


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
    """Returns (model, processor or None). Shipped names and config paths always use random weights."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if random_init or name in SHIPPED or name.endswith(".json"):
        config = load_config(name, layers, vision_layers)
        return random_model(config, torch_dtype, device, attn), None
    if layers is not None or vision_layers is not None:
        raise ValueError("--layers/--vision-layers apply to --random-init models only")
    model = transformers.AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype,
                                                                     attn_implementation=attn).to(device).eval()
    return model, transformers.AutoProcessor.from_pretrained(name)


def synthetic_inputs(model, batch: int = 1, prompt_tokens: int = 64, image_size: int | None = None,
                     seed: int = 0) -> dict:
    """A batch of identical-length prompts, one image each, built from the config alone: ``prompt_tokens`` text
    tokens around the image placeholder tokens, random pixels. Returns model inputs on the model's device."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")} | {text.bos_token_id, text.eos_token_id}
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
    elif kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        side = (image_size or 672) // unit * unit
        grid = side // vision.patch_size  # patches per side
        n = (grid // vision.spatial_merge_size) ** 2
        image = torch.cat([torch.full((batch, 1), config.vision_start_token_id),
                           torch.full((batch, n), config.image_token_id),
                           torch.full((batch, 1), config.vision_end_token_id)], 1)
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
