"""Tiny randomly initialised VLMs and offline processors for the test suite.

The models and processors are the package's own (``vtr.testing``: real model and processor classes, 4 decoder
layers of width 64, a locally built tokenizer, nothing downloaded); this module adds the prompts and input
batches the tests share.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import transformers as T
from PIL import Image

from vtr.testing import FAMILIES, VIDEO_FAMILIES, VOCAB_SIZE, make_tokenizer, random_image  # noqa: F401
from vtr.testing import tiny_model as build  # noqa: F401

MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "internvl": "InternVLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
                 "glm4v": "Glm4vForConditionalGeneration", "glm4v_moe": "Glm4vMoeForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


# Methods whose stage needs a kind of decoder layer the family's language model lacks where it needs it (the engine
# refuses them at patch time, naming the layer): the reason's start, as the error message words it.
LAYER_REFUSED = {
    ("prunevid", "gemma3"): "prunevid cuts the KV caches of the decoder layers before its stage",
    ("prunevid", "qwen3_5"): "prunevid cuts the KV caches of the decoder layers before its stage",
    ("prunevid", "qwen3_5_moe"): "prunevid cuts the KV caches of the decoder layers before its stage",
    ("dycoke", "qwen3_5"): r"dycoke's decoding stage \(layer=\d+\) cannot run on .*: it scores each new token's "
                           r"attention .* linear_attention layer.*No layer value avoids that on this model, or pass "
                           r"kv_ratio=0",
    ("dycoke", "qwen3_5_moe"): r"dycoke's decoding stage \(layer=\d+\) cannot run on .*: it scores each new token's "
                           r"attention .* linear_attention layer.*No layer value avoids that on this model, or pass "
                           r"kv_ratio=0",
    ("framefusion", "qwen3_5"): "framefusion scores with the attention of the layer before its stage at 1",
    ("framefusion", "qwen3_5_moe"): "framefusion scores with the attention of the layer before its stage at 1",
}
# Options the matrices pass where a method's default reads a layer that cannot give its signal (a sliding-window
# layer's cache holds only its window): what a user of that model passes.
OPTIONS = {
    ("dycoke", "gemma3"): {"layer": 2},  # layer 1 (L - 1) is global; the default L - 1 = 2 is a sliding layer
    # Qwen3.5: softmax attention in layers 1 and 3 only (0 and 2 are linear attention)
    ("pdrop", "qwen3_5"): {"layers": "1,3"}, ("pdrop", "qwen3_5_moe"): {"layers": "1,3"},
    ("sparsevlm", "qwen3_5"): {"layers": "2"}, ("sparsevlm", "qwen3_5_moe"): {"layers": "2"},
}


def supports(method: str, family: str) -> bool:
    """Whether a registered method supports a tiny family's model class (vtr.patch refuses the others) and the
    layer types of its language model (``LAYER_REFUSED``)."""
    from vtr.methods import REGISTRY
    if (method, family) in LAYER_REFUSED:
        return False
    return REGISTRY[method].model_classes is None or MODEL_CLASSES[family] in REGISTRY[method].model_classes


# The families added for the current models (Qwen3-VL-MoE, InternVL, Gemma 3, Qwen3.5, GLM-4.1V) run the shared
# matrices on a representative subset of the methods they support (CI time: every supported pair would add about
# 2,000 cases); ``VTR_TEST_FULL=1`` runs every supported pair. Each subset reaches the paths that are new on its
# family: pre-LLM drop, layer stages (from cached keys, from the stage layer's projections, from K-1's attention
# rows with added tokens), the decode-time KV stage, the vision tower's signals and merged tokens where the tower has
# a [CLS] token, videos; the MoE twins of a dense family run a pre-LLM method (routing is per token: nothing else
# differs from the dense model).
MATRIX_SUBSET = {
    "qwen3_vl_moe": ("divprune", "dart", "dycoke", "visionzip"),  # visionzip: merged DeepStack features
    "internvl": ("divprune", "fastervlm", "visionzip", "vispruner", "dart"),
    "gemma3": ("divprune", "fastv", "dart", "sparsevlm", "dycoke"),
    # SparseVLM: its one stage the tiny model allows (layer 2) reaches no less than 50% on average, under the
    # matrices' ratio 0.75 (refused as out of reach); its exactness on Qwen3.5 is checked at 0.5 in test_families
    "qwen3_5": ("divprune", "fastv", "pdrop", "vispruner"),
    "qwen3_5_moe": ("divprune",),
    "glm4v": ("divprune", "dart", "dycoke", "prunevid", "evs", "visionzip"),
    "glm4v_moe": ("divprune",),
}


def in_matrix(method: str, family: str) -> bool:
    """Whether the shared matrices run ``method`` on ``family``: a supported pair, in ``MATRIX_SUBSET`` for the
    families that have one (unless ``VTR_TEST_FULL=1``)."""
    return supports(method, family) and (full_matrices() or family not in MATRIX_SUBSET
                                         or method in MATRIX_SUBSET[family])


def options(method: str, family: str) -> dict:
    """The options the matrices pass to ``method`` on ``family`` (``OPTIONS``; usually none)."""
    return dict(OPTIONS.get((method, family), {}))


def family_for(method: str, preferred: str) -> str:
    """``preferred`` if the method supports it, else the first family it supports (for single-family tests)."""
    return preferred if supports(method, preferred) else next(f for f in FAMILIES if supports(method, f))


def matrix_methods() -> list[str]:
    """The methods the test matrices run: every registered one, or the comma-separated ``VTR_TEST_METHODS``
    (``.ci/run`` uses a subset that reaches every engine path for its second, older-transformers pass)."""
    from vtr.methods import REGISTRY
    chosen = [m for m in os.environ.get("VTR_TEST_METHODS", "").split(",") if m]
    unknown = sorted(set(chosen) - set(REGISTRY))
    if unknown:
        raise ValueError(f"VTR_TEST_METHODS names unregistered methods: {unknown}")
    return chosen or sorted(REGISTRY)


# Methods that between them reach every engine path (pre-LLM drop and merge, vision-tower signals, layer stages from
# cached keys, from the stage layer's projections and from attention rows, tokens added inside the language model,
# pruning and merging inside the vision tower, the KV-cache stage, merged states after a layer's attention, stages
# that cut earlier layers' caches): .ci/run's older-transformers pass runs the matrices on these, and the compile
# test runs on these unless VTR_TEST_FULL=1 (each compiles a model: 15-55 s).
ENGINE_PATH_METHODS = ("divprune", "visionzip", "hiprune", "cdpruner", "dart", "pdrop", "sparsevlm", "flowcut",
                       "dycoke", "framefusion", "prunevid", "vflowopt", "tome", "mustdrop")


# Methods whose budget is a layer average of the visual tokens: on the 4-layer tiny models the layer before their
# first pruning step (layer 0) runs on every token, so a retention below 1/4 is out of reach and refused.
LAYER_AVERAGED = ("pdrop", "sparsevlm", "framefusion")


def reachable_ratio(method: str, ratio: float) -> float:
    """``ratio``, or the largest one a layer-averaged method reaches on the 4-layer tiny models (0.75)."""
    return min(ratio, 0.75) if method in LAYER_AVERAGED else ratio


def out_of_reach(method: str, n: int, ratio=None, keep=None) -> bool:
    """Whether a budget is out of a layer-averaged method's reach on the 4-layer tiny models (refused)."""
    fraction = 1 - ratio if ratio is not None else min(1.0, keep / n)
    return method in LAYER_AVERAGED and fraction < 0.25


def full_matrices() -> bool:
    """``VTR_TEST_FULL=1`` runs every matrix as the full product of its axes. By default the matrices keep every
    method x model pair and every input kind, but cover SDPA, the non-default position policy and the padding
    sides on a representative subset of the cases (CI time: the full product takes about twice as long)."""
    return os.environ.get("VTR_TEST_FULL", "") == "1"


def method_family(methods, families) -> list:
    """pytest params (method, family) of the supported pairs; unsupported pairs are tested to be refused instead
    (test_errors.py)."""
    import pytest
    return [pytest.param(m, f, id=f"{m}-{f}") for m in methods for f in families if in_matrix(m, f)]


@functools.lru_cache(maxsize=None)
def tiny_clip(name: str):
    """Stand-in for ``vtr.compat.load_clip`` (no downloads in the tests): a tiny random ``CLIPModel`` whose vision
    width matches the tiny LLaVA towers (its ``visual_projection`` reads their features), with a text context of 6
    tokens so that instructions are split into segments, and the word-level tokenizer. Built once (read only)."""
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tok = make_tokenizer("llava")
    config = T.CLIPConfig(text_config=dict(clip, vocab_size=VOCAB_SIZE, max_position_embeddings=6,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                           bos_token_id=tok.bos_token_id),
                          vision_config=dict(clip, patch_size=8, image_size=32), projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return T.CLIPModel(config).eval(), tok


def tokenizer_for(name: str):
    """Stand-in for ``vtr.compat.load_tokenizer``: the tiny LLaVA models' tokenizer."""
    return make_tokenizer("llava")


def _prompt(family: str, n_images: int, long: bool, video: bool = False) -> str:
    if family.startswith("llava"):
        vis = "<video>" if video else "<image>"
    elif family == "internvl":
        vis = "<video>" if video else "<IMG_CONTEXT>"
    elif family == "gemma3":
        vis = "<start_of_image>"
    elif family.startswith("glm4v"):
        vis = "<|begin_of_video|><|video|><|end_of_video|>" if video else "<|begin_of_image|><|image|><|end_of_image|>"
    else:
        vis = f"<|vision_start|>{'<|video_pad|>' if video else '<|image_pad|>'}<|vision_end|>"
    images = " ".join([vis] * n_images)
    if family in ("llava", "llava_next"):
        prefix = "system you are helpful . USER :" if long else "USER :"
        question = "what is in this big red image ?" if long else "what is in this image ?"
        return f"{prefix} {images} {question} ASSISTANT :".replace("  ", " ")
    prefix = "<|im_start|> system you are helpful . <|im_end|> <|im_start|> user" if long else "<|im_start|> user"
    question = "what is in this big red image ?" if long else "what is in this image ?"
    return f"{prefix} {images} {question} <|im_end|> <|im_start|> assistant".replace("  ", " ")


VARIANTS = ("single", "multi", "mixed")
IMAGE_SIZES = [(64, 64), (48, 80), (64, 48)]


def image_inputs(family: str, proc, batch: int = 1, variant: str = "single", padding_side: str = "left",
                 rows: list[int] | None = None):
    """A batch of prompts with images, padded on ``padding_side``. Rows differ in prompt length and, except for
    LLaVA-1.5, in image size and hence visual token count. ``multi``: row 0 holds two images, row 1 one;
    ``mixed``: row 1 has no image. ``rows``: only these rows of the batch (``rows=[1]``: row 1 as a prompt alone)."""
    images_per_row = {"single": [1] * batch, "multi": [2, 1], "mixed": [1, 0]}[variant]
    texts = [_prompt(family, n, long=bool(b % 2)) for b, n in enumerate(images_per_row)]
    first = [sum(images_per_row[:b]) for b in range(len(images_per_row))]
    row_images = [[random_image(*IMAGE_SIZES[i % 3], seed=i) for i in range(f, f + n)]
                  for f, n in zip(first, images_per_row)]
    rows = range(len(texts)) if rows is None else rows
    images = [image for b in rows for image in row_images[b]]
    if family == "gemma3" and images:  # its processor takes the images of each prompt as a list
        images = [row_images[b] for b in rows]
    return proc(text=[texts[b] for b in rows], images=images or None, return_tensors="pt", padding=True,
                padding_side=padding_side)


def visual_inputs(method: str, family: str, proc, batch: int = 1):
    """What a method prunes, for the tests that run every method on one kind of input: ``image_inputs`` (one image
    per row), or ``video_inputs`` for a method that prunes videos only (EVS, VidCom2 leave images whole)."""
    from vtr.methods import REGISTRY
    if "image" in REGISTRY[method].visual_kinds:
        return image_inputs(family, proc, batch)
    return video_inputs(family, proc, batch)


def random_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(frames, height, width, 3), dtype=np.uint8)


def video_inputs(family: str, proc, batch: int = 1, videos: list | None = None):
    """Prompts with one video each (rows differ in prompt length; Qwen rows also in frame count); ``videos``:
    ``[T, H, W, 3]`` uint8 frame arrays to use instead of random ones. Uses the real video processor when
    torchvision is available, else builds the same tensors by hand."""
    if videos is None:
        frames = [4, 2] if family.startswith(("qwen", "glm")) else [4, 4]
        videos = [random_video(frames[b], 32 if family == "llava_onevision" else 64,
                               32 if family == "llava_onevision" else 48, seed=b) for b in range(batch)]
    texts = [_prompt(family, 1, long=bool(b % 2), video=True) for b in range(len(videos))]
    if proc.video_processor is not None:
        return proc(text=texts, videos=videos, return_tensors="pt", padding=True, do_sample_frames=False)
    if family == "llava_onevision":
        return _onevision_video_by_hand(proc, texts, videos)
    return _qwen_video_by_hand(family, proc, texts, videos)  # Qwen-VL, Qwen3.5, GLM-4.1V


def _onevision_video_by_hand(proc, texts, videos):
    """What LlavaOnevisionVideoProcessor outputs: frames normalised with the CLIP mean/std, and
    ``frames * ceil(side / 2) ** 2 + 1`` placeholder tokens per video."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    videos = [v if v.shape[1:3] == (32, 32) else
              np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC)) for f in v]) for v in videos]
    pixels = torch.stack([torch.tensor(((v / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
                          for v in videos])
    pooled = math.ceil(math.isqrt(proc.num_image_tokens) / 2)
    texts = [t.replace("<video>", "<video>" * (len(v) * pooled * pooled + 1)) for t, v in zip(texts, videos)]
    enc = proc.tokenizer(texts, return_tensors="pt", padding=True)
    enc["pixel_values_videos"] = pixels
    return enc


def _qwen_video_by_hand(family, proc, texts, videos):
    """What the Qwen video processors output for frames that need no resizing: each pair of frames patchified
    like one image (temporal patch 2), ``video_grid_thw``, and ``mm_token_type_ids`` (2 = video)."""
    ip = proc.image_processor
    patches, grids = [], []
    for video in videos:
        pairs = [_frames_to_patches(ip, video[i:i + ip.temporal_patch_size])
                 for i in range(0, len(video), ip.temporal_patch_size)]
        patches += [p for p, _ in pairs]
        grids.append([len(pairs), pairs[0][1][0], pairs[0][1][1]])
    glm = family.startswith("glm4v")
    vis = "<|begin_of_video|><|video|><|end_of_video|>" if glm else "<|vision_start|><|video_pad|><|vision_end|>"
    for b, (t, h, w) in enumerate(grids):
        per_slice = h * w // ip.merge_size ** 2
        if glm:  # each slice an image run, then its timestamp, inside the video's delimiters
            body = "".join(f"<|begin_of_image|>{'<|image|>' * per_slice}<|end_of_image|> {i} " for i in range(t))
            body = f"<|begin_of_video|>{body}<|end_of_video|>"
        elif family.startswith(("qwen3_vl", "qwen3_5")):  # one <|vision_start|> ... <|vision_end|> run per slice
            body = "".join(f"<|vision_start|>{'<|video_pad|>' * per_slice}<|vision_end|>" for _ in range(t))
        else:
            body = f"<|vision_start|>{'<|video_pad|>' * (t * per_slice)}<|vision_end|>"
        texts[b] = texts[b].replace(vis, body)
    enc = proc.tokenizer(texts, return_tensors="pt", padding=True)
    enc["pixel_values_videos"] = torch.cat(patches)
    enc["video_grid_thw"] = torch.tensor(grids)
    mm = torch.zeros_like(enc["input_ids"])
    mm[enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image|>" if glm else "<|video_pad|>")] = 2
    enc["mm_token_type_ids"] = mm
    return enc


def _frames_to_patches(ip, frames):
    tps, p, m = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    x = torch.tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    _, c, height, width = x.shape
    gh, gw = height // p, width // p
    x = x.view(1, tps, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * tps * p * p), (gh, gw)


def text_inputs(proc, batch: int = 1):
    texts = ["USER : what is a cat ? ASSISTANT :", "system you are helpful . USER : describe a red dog ? ASSISTANT :"]
    return proc.tokenizer(texts[:batch], return_tensors="pt", padding=True)
