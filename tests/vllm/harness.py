"""Shared inputs and the two sides of every vLLM test: Hugging Face ``generate`` with ``vtr.patch`` (the
reference), and vLLM with the plugin configured through ``hf_overrides``."""
from __future__ import annotations

import gc

import numpy as np
import torch
import transformers as T
from transformers.video_utils import VideoMetadata

import vtr
from vtr.testing import random_image

STEPS = 6
FPS = 2.0
IMAGE_PROMPT = ("<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> what is in this image ? <|im_end|> "
                "<|im_start|> assistant")
VIDEO_PROMPT = ("<|im_start|> system you are helpful . <|im_end|> <|im_start|> user "
                "<|vision_start|><|video_pad|><|vision_end|> describe this video ? <|im_end|> <|im_start|> assistant")


LOGPROBS = 5


def image():
    """64 x 48 pixels (taller than wide): 8 x 6 merged tokens."""
    return random_image(64, 48)


def video() -> np.ndarray:
    """4 frames of 64 x 64: a (2, 8, 8) grid of merged tokens (temporal patch 2), 128 tokens."""
    return np.random.default_rng(1).integers(0, 255, size=(4, 64, 64, 3), dtype=np.uint8)


def metadata(frames: np.ndarray) -> dict:
    n = len(frames)
    return {"total_num_frames": n, "fps": FPS, "duration": n / FPS, "frames_indices": list(range(n)),
            "video_backend": "opencv", "height": frames.shape[1], "width": frames.shape[2]}


def hf_inputs(processor, kind: str, prompt: str | None = None) -> dict:
    if kind == "image":
        return processor(text=[prompt or IMAGE_PROMPT], images=[image()], return_tensors="pt")
    frames = video()
    return processor(text=[prompt or VIDEO_PROMPT], videos=[frames],
                     video_metadata=[VideoMetadata(**metadata(frames))], do_sample_frames=False, return_tensors="pt")


_HF = {}


def hf_model(folder: str):
    """(model, processor) of a saved tiny model, loaded once per folder (``vtr.patch`` restores it exactly)."""
    if folder not in _HF:
        model = T.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        _HF[folder] = model, T.AutoProcessor.from_pretrained(folder)
    return _HF[folder]


def hf_generate(folder: str, kind: str, method: str | None = None, prompt: str | None = None,
                **budget) -> tuple[list[int], int, torch.Tensor]:
    """HF ``generate`` (patched with ``method`` if given): greedy tokens, visual tokens kept, and the log-probs
    ``[STEPS, V]`` of every step. prompt: instead of the kind's default prompt (one image or video)."""
    model, processor = hf_model(folder)
    inputs = hf_inputs(processor, kind, prompt)
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    n_visual = int((inputs["input_ids"] == token).sum())
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        if method is None:
            out, kept = model.generate(**inputs, **kwargs), n_visual
        else:
            with vtr.patch(model, method, **budget) as handle:
                out, kept = model.generate(**inputs, **kwargs), handle.last.n_kept[0]
    logprobs = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)
    return out.sequences[0, -STEPS:].tolist(), kept, logprobs


def vllm_requests(kind: str, prompt: str | None = None) -> list[dict]:
    if kind == "image":
        return [{"prompt": prompt or IMAGE_PROMPT, "multi_modal_data": {"image": image()}}]
    frames = video()
    return [{"prompt": prompt or VIDEO_PROMPT,
             "multi_modal_data": {"video": (frames, dict(metadata(frames), do_sample_frames=False))}}]


def engine_kwargs(folder: str, settings: dict | None) -> dict:
    kwargs = dict(model=folder, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 1}, max_num_seqs=4, max_num_batched_tokens=1024)
    if settings is not None:
        kwargs["hf_overrides"] = {"vtr": settings}
    return kwargs


def vllm_generate(folder: str, settings: dict | None, kinds=("image", "video")) -> dict:
    """kind -> (greedy tokens, placeholder tokens in the prompt vLLM ran, per step {token: log-prob} of the top
    ``LOGPROBS`` tokens) for one engine built with ``settings`` as ``hf_overrides={"vtr": settings}`` (None: the
    plugin unconfigured)."""
    from vllm import LLM, SamplingParams
    llm = LLM(**engine_kwargs(folder, settings))
    try:
        config = llm.llm_engine.model_config.hf_config
        params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=LOGPROBS, ignore_eos=True)
        out = {}
        for kind in kinds:
            result = llm.generate(vllm_requests(kind), params, use_tqdm=False)[0]
            token = config.image_token_id if kind == "image" else config.video_token_id
            completion = result.outputs[0]
            logprobs = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
            out[kind] = list(completion.token_ids), result.prompt_token_ids.count(token), logprobs
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def max_logprob_gap(hf_logprobs: torch.Tensor, vllm_logprobs: list[dict]) -> float:
    """Largest difference between vLLM's top log-probs and HF's log-probs of the same tokens, over all steps."""
    return max(abs(lp - float(hf_logprobs[step, token])) for step, top in enumerate(vllm_logprobs)
               for token, lp in top.items())


# Prompts that share prefixes, served one after the other with prefix caching on (vLLM's CPU block size is 32
# tokens): a repeat and a second chat turn resending the image or video (both cached past the visual run), and
# another question about the same input right after it (the cached prefix ends inside the visual run, whose last
# tokens and everything after it are computed again, with the vision pass).
LONG_QUESTION = ("what is in this {kind} ? describe the picture . is it a cat or a dog ? what is left ? what is "
                 "right ? is it big or small ? is it red , green or blue ?")


def prefix_prompts(kind: str) -> dict:
    media = "<|vision_start|><|image_pad|><|vision_end|>" if kind == "image" else \
        "<|vision_start|><|video_pad|><|vision_end|>"
    turn = "<|im_start|> system you are helpful . <|im_end|> <|im_start|> user " + media + " {question} <|im_end|> " \
           "<|im_start|> assistant"
    first = turn.format(question=LONG_QUESTION.format(kind=kind) + " " + LONG_QUESTION.format(kind=kind))
    return {"first": first, "repeat": first,
            "second turn": first + " a red cat . <|im_end|> <|im_start|> user is it big ? <|im_end|> "
                                   "<|im_start|> assistant",
            "other question": turn.format(question="what is left ? is it green ?")}


def vllm_prefix_runs(folder: str, settings: dict | None, kinds=("image", "video"), block_size: int = 32) -> dict:
    """(kind, name) -> (greedy tokens, prompt tokens served from the prefix cache, prompt ids, placeholder tokens,
    top log-probs per step) for the ``prefix_prompts`` of each kind, served in order by one engine with prefix
    caching on."""
    from vllm import LLM, SamplingParams
    kwargs = engine_kwargs(folder, settings)
    kwargs.update(enable_prefix_caching=True, block_size=block_size)
    llm = LLM(**kwargs)
    try:
        config = llm.llm_engine.model_config.hf_config
        params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=LOGPROBS)
        out = {}
        for kind in kinds:
            token = config.image_token_id if kind == "image" else config.video_token_id
            for name, prompt in prefix_prompts(kind).items():
                result = llm.generate(vllm_requests(kind, prompt), params, use_tqdm=False)[0]
                completion = result.outputs[0]
                logprobs = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
                out[kind, name] = (list(completion.token_ids), result.num_cached_tokens or 0,
                                   result.prompt_token_ids, result.prompt_token_ids.count(token), logprobs)
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
