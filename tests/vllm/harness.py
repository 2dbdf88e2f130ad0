"""Shared inputs and the two sides of every vLLM test: Hugging Face ``generate`` with ``vtr.patch`` (the
reference), and vLLM with the plugin, configured through ``hf_overrides`` (the server's settings) and each
request's ``mm_processor_kwargs={"vtr": ...}``."""
from __future__ import annotations

import gc
import json

import numpy as np
import torch
import transformers as T
from transformers.video_utils import VideoMetadata

import vtr
from vtr.testing import random_image

STEPS = 6
FPS = 2.0
LOGPROBS = 5
QWEN_MEDIA = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
              "video": "<|vision_start|><|video_pad|><|vision_end|>"}
LLAVA_MEDIA = {"image": "<image>", "video": "<video>"}
QUESTION = {"image": "what is in this image ?", "video": "describe this video ?"}


SYSTEM = "you are helpful ."
# a longer system prompt, so that the visual run straddles a 32-token block boundary (prefix-cache tests)
LONG_SYSTEM = "you are helpful . you are a big red cat . describe what is left and what is right ."


def prompt(family: str, kind: str, question: str | None = None, long_system: bool = False,
           answer: str | None = None, follow_up: str | None = None) -> str:
    """A one-turn chat about one image or video in the family's format (a second turn with ``answer`` and
    ``follow_up``)."""
    question = question or QUESTION[kind]
    system = LONG_SYSTEM if long_system else SYSTEM
    if family.startswith("llava"):
        text = f"system {system} USER : {LLAVA_MEDIA[kind]} {question} ASSISTANT :"
        if answer is not None:
            text += f" {answer} </s> USER : {follow_up} ASSISTANT :"
        return text
    text = f"<|im_start|> system {system} <|im_end|> " \
        f"<|im_start|> user {QWEN_MEDIA[kind]} {question} <|im_end|> <|im_start|> assistant"
    if answer is not None:
        text += f" {answer} <|im_end|> <|im_start|> user {follow_up} <|im_end|> <|im_start|> assistant"
    return text


def image():
    """64 x 48 pixels (taller than wide): 8 x 6 merged tokens on Qwen-VL; tiles and newline rows on LLaVA-NeXT."""
    return random_image(64, 48)


def video(family: str) -> np.ndarray:
    """Qwen-VL: 4 frames of 64 x 64, a (2, 8, 8) grid (temporal patch 2), 128 tokens. LLaVA-OneVision: 8 frames,
    each 2 x 2 pooled tokens, then one newline: 33 tokens."""
    frames = 8 if family.startswith("llava") else 4
    return np.random.default_rng(1).integers(0, 255, size=(frames, 64, 64, 3), dtype=np.uint8)


def metadata(frames: np.ndarray) -> dict:
    n = len(frames)
    return {"total_num_frames": n, "fps": FPS, "duration": n / FPS, "frames_indices": list(range(n)),
            "video_backend": "opencv", "height": frames.shape[1], "width": frames.shape[2]}


# ------------------------------------------------------------------------------------------------ Hugging Face
_HF = {}


def hf_model(folder: str, dtype: torch.dtype = torch.float32):
    """(model, processor) of a saved tiny model, loaded once per folder and dtype (``vtr.patch`` restores it
    exactly)."""
    if (folder, dtype) not in _HF:
        model = T.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        _HF[folder, dtype] = model, T.AutoProcessor.from_pretrained(folder)
    return _HF[folder, dtype]


def hf_inputs(processor, family: str, kind: str, text: str) -> dict:
    if kind == "image":
        return processor(text=[text], images=[image()], return_tensors="pt")
    frames = video(family)
    if family.startswith("llava"):
        return processor(text=[text], videos=[frames], return_tensors="pt")
    return processor(text=[text], videos=[frames], video_metadata=[VideoMetadata(**metadata(frames))],
                     do_sample_frames=False, return_tensors="pt")


_REFERENCES: dict = {}


def hf_reference(folder: str, family: str, kind: str, text: str, settings: dict | None = None
                 ) -> tuple[list[int], int, torch.Tensor]:
    """HF ``generate`` (patched with ``settings`` = ``{"method": ..., budget, options}`` if given): greedy tokens,
    visual tokens kept, and the log-probs ``[STEPS, V]`` of every step. Computed once per arguments (a test compares
    several vLLM runs of one prompt with it)."""
    key = (folder, family, kind, text, json.dumps(settings, sort_keys=True))
    if key not in _REFERENCES:
        _REFERENCES[key] = _hf_reference(folder, family, kind, text, settings)
    tokens, kept, logprobs = _REFERENCES[key]
    return list(tokens), kept, logprobs.clone()


def _hf_reference(folder: str, family: str, kind: str, text: str, settings: dict | None):
    model, processor = hf_model(folder)
    inputs = hf_inputs(processor, family, kind, text)
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    n_visual = int((inputs["input_ids"] == token).sum())
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        if settings is None:
            out, kept = model.generate(**inputs, **kwargs), n_visual
        else:
            options = dict(settings)
            with vtr.patch(model, options.pop("method"), **options) as handle:
                out, kept = model.generate(**inputs, **kwargs), handle.last.n_kept[0]
    logprobs = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)
    return out.sequences[0, -STEPS:].tolist(), kept, logprobs


def hf_prefill(folder: str, family: str, kind: str, text: str, settings: dict) -> tuple[int, int, torch.Tensor]:
    """HF's patched forward of the prompt (no ``generate``): the greedy first token, visual tokens kept, and its
    log-probs ``[V]``."""
    model, processor = hf_model(folder)
    options = dict(settings)
    with vtr.patch(model, options.pop("method"), **options) as handle, torch.no_grad():
        logits = model(**hf_inputs(processor, family, kind, text)).logits[0, -1]
        kept = handle.last.n_kept[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return int(logprobs.argmax()), kept, logprobs


def hf_language_model_inputs(folder: str, family: str, kind: str, text: str, settings: dict,
                             tower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's patched forward of the prompt in bfloat16, its vision tower's output (the merged features,
    ``[visual tokens, D]``) replaced by ``tower``: what its language model receives, the input embeddings
    ``[L, D]`` and the M-RoPE positions ``[3, L]``."""
    model, processor = hf_model(folder, torch.bfloat16)
    inputs = hf_inputs(processor, family, kind, text)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(torch.bfloat16)
    seen = []

    def swap(module, args, output):
        output.pooler_output = tower.to(output.pooler_output.device, output.pooler_output.dtype)
        return output

    def record(module, args, kwargs, output):
        seen.append((kwargs["inputs_embeds"][0].clone(), kwargs["position_ids"][-3:, 0].clone()))

    hooks = [model.model.visual.register_forward_hook(swap),
             model.model.language_model.register_forward_hook(record, with_kwargs=True)]
    options = dict(settings)
    try:
        with vtr.patch(model, options.pop("method"), **options), torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen[0]


class Recorder:
    """In this process's engine (single-process), Qwen3.5's vision tower outputs (``[visual tokens, D]``, one per
    call) and its language model's inputs (embeddings ``[tokens, D]``, M-RoPE positions ``[3, tokens]``, one per
    step), in order; ``clear()`` before a request."""

    def __init__(self, monkeypatch):
        from vllm.model_executor.models import qwen3_5, qwen3_vl
        self.towers, self.inputs = [], []
        tower = qwen3_vl.Qwen3_VisionTransformer.forward
        language_model = qwen3_5.Qwen3_5ForConditionalGeneration.forward

        def tower_forward(module, *args, **kwargs):
            out = tower(module, *args, **kwargs)
            self.towers.append(out.detach().clone())
            return out

        def forward(module, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            self.inputs.append((inputs_embeds.detach().clone(), positions.detach().clone()))
            return language_model(module, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

        monkeypatch.setattr(qwen3_vl.Qwen3_VisionTransformer, "forward", tower_forward)
        monkeypatch.setattr(qwen3_5.Qwen3_5ForConditionalGeneration, "forward", forward)

    def clear(self):
        self.towers.clear()
        self.inputs.clear()


def family_of(folder: str) -> str:
    arch = hf_model(folder)[0].config.architectures[0]
    return {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next",
            "LlavaOnevisionForConditionalGeneration": "llava_onevision", "Qwen2VLForConditionalGeneration": "qwen2_vl",
            "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen3VLForConditionalGeneration": "qwen3_vl",
            "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe", "Qwen3_5ForConditionalGeneration": "qwen3_5",
            "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe"}[arch]


def hf_generate(folder: str, kind: str, method: str | None = None, **budget):
    """``hf_reference`` of the kind's default prompt, with ``method`` and its budget and options (the form
    ../shared/cases/vllm_prefix_cache.py uses)."""
    family = family_of(folder)
    settings = None if method is None else {"method": method, **budget}
    return hf_reference(folder, family, kind, prompt(family, kind), settings)


def vllm_requests(kind: str, folder: str | None = None) -> list[dict]:
    """The kind's default request (a Qwen-VL prompt unless ``folder`` says otherwise), as a list of one."""
    family = family_of(folder) if folder else "qwen2_5_vl"
    return [request(family, kind, prompt(family, kind))]


# -------------------------------------------------------------------------------------------------------- vLLM
def request(family: str, kind: str, text: str, settings: dict | None = None) -> dict:
    """A vLLM request for ``text`` with the kind's input; ``settings`` as ``mm_processor_kwargs={"vtr": ...}``."""
    if kind == "image":
        data = {"image": image()}
    else:
        frames = video(family)
        data = {"video": (frames, dict(metadata(frames), do_sample_frames=False))}
    out = {"prompt": text, "multi_modal_data": data}
    if settings is not None:
        out["mm_processor_kwargs"] = {"vtr": settings}
    return out


def engine_kwargs(folder: str, settings: dict | None, **extra) -> dict:
    kwargs = dict(model=folder, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 1}, max_num_seqs=4, max_num_batched_tokens=1024,
                  block_size=32)
    if settings is not None:
        kwargs["hf_overrides"] = {"vtr": settings}
    kwargs.update(extra)
    return {k: v for k, v in kwargs.items() if v is not None}


class Engine:
    """One vLLM engine (``LLM``) for a block: ``with Engine(folder, settings) as e: e.run(requests)``."""

    def __init__(self, folder: str, settings: dict | None, **extra):
        from vllm import LLM
        self.llm = LLM(**engine_kwargs(folder, settings, **extra))
        self.config = self.llm.llm_engine.model_config.hf_config

    def run(self, requests: list[dict]) -> list[tuple]:
        """Per request: (greedy tokens, placeholder tokens in the prompt vLLM ran, per step {token: log-prob} of
        the top ``LOGPROBS`` tokens, prompt tokens served from the prefix cache, prompt ids)."""
        from vllm import SamplingParams
        params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=LOGPROBS, ignore_eos=True)
        out = []
        for result in self.llm.generate(requests, params, use_tqdm=False):
            kind = "image" if "image" in requests[len(out)]["multi_modal_data"] else "video"
            token = self.config.image_token_id if kind == "image" else self.config.video_token_id
            completion = result.outputs[0]
            logprobs = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
            out.append((list(completion.token_ids), result.prompt_token_ids.count(token), logprobs,
                        result.num_cached_tokens or 0, list(result.prompt_token_ids)))
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def max_logprob_gap(hf_logprobs: torch.Tensor, vllm_logprobs: list[dict]) -> float:
    """Largest difference between vLLM's top log-probs and HF's log-probs of the same tokens, over all steps."""
    return max(abs(lp - float(hf_logprobs[step, token])) for step, top in enumerate(vllm_logprobs)
               for token, lp in top.items())
