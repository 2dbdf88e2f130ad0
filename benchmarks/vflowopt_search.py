"""Search VFlowOpt's hyper-parameters by Bayesian optimisation, as the official ``llava_ov_opt_all.py`` does.

    python benchmarks/vflowopt_search.py --model llava-hf/llava-onevision-qwen2-7b-ov-hf \\
        --prompts calibration.jsonl --target 0.25 --calls 300 --out vflowopt_25.json
    python benchmarks/vflowopt_search.py --tiny --calls 4          # smoke run on the tiny random model

Needs scikit-optimize (``pip install scikit-optimize``). An offline tool: vtr never searches at run time; the
result's ``options`` are passed to ``vtr.patch(model, "vflowopt", **options)``.

Search space (official bounds, written there for a 25 % target, generalised to ``--target T``): the vision keep
ratio in ``[T, min(1, 1.5 T)]``, the first LLM stage's keep ratio in ``[0.8 T / min(1, 1.5 T), 1]``, the
global-token threshold ``t`` in ``[0, 50]``, the bucket side ``m`` in ``[3, 24]`` (scaled by ``side / 27`` on
towers whose grid is not SigLIP-384's 27 x 27), the patch-entropy weight ``alpha_v`` in ``[-1, 1]``. The last
LLM ratio is solved so that the layer-averaged retention is ``T`` (official: ``min(1, ...)``; here also at least
1e-6). Optimiser: ``skopt.Optimizer`` with 27 random
initial points (fewer when ``--calls`` is smaller) and seed 42, ask / tell, points clipped to the bounds, as the
official loop.

Objective (maximised): the sum over the calibration prompts of the cosine similarity between the last decoder
layer's hidden state of the prompt's last token (after the final norm: ``hidden_states[-1]`` of the prefill) with
and without pruning; a NaN similarity counts 0 (official).

Calibration prompts (``--prompts``): a JSON-lines file of ``{"image": path, "text": question}``; the official
search used LLaVA-OneVision training data (its ``opt_data`` task). ``--tiny``: random images on the tiny test
model.

Differences from the official search: one prefill per prompt (official: a ``generate`` call whose first step's
hidden state it reads, the same state); the bounds generalised to other targets as above.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import vtr
from vtr import compat
from vtr.methods import vflowopt as V
from vtr.methods.base import scale_layers

BOUNDS_M = (3.0, 24.0)
BOUNDS_T = (0.0, 50.0)
BOUNDS_ALPHA = (-1.0, 1.0)


def bounds(target: float) -> list[tuple[float, float]]:
    """(vision ratio, first LLM ratio, t, m, alpha_v) bounds for a layer-averaged retention ``target``."""
    vit_high = min(1.0, 1.5 * target)
    return [(target, vit_high), (min(1.0, 0.8 * target / vit_high), 1.0), BOUNDS_T, BOUNDS_M, BOUNDS_ALPHA]


def last_ratio(target: float, vit: float, first: float, layers: tuple[int, ...], n_layers: int) -> float:
    """The last LLM stage's keep ratio whose layer average is ``target`` (in [1e-6, 1])."""
    low = V.layer_average(vit, (first, 0.0), layers, n_layers)
    high = V.layer_average(vit, (first, 1.0), layers, n_layers)
    return min(1.0, max(1e-6, (target - low) / (high - low)))


def last_token_state(model, inputs) -> torch.Tensor:
    """``[D]`` the last decoder layer's output (final norm applied) at the prompt's last token; one prompt, no
    padding, so the last slot of the (pruned or whole) sequence."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float()


def objective(model, batches, references, options: dict) -> float:
    total = 0.0
    with vtr.patch(model, "vflowopt", **options):
        for inputs, reference in zip(batches, references):
            pruned = last_token_state(model, inputs)
            similarity = torch.nn.functional.cosine_similarity(reference, pruned, dim=0)
            total += float(torch.nan_to_num(similarity, nan=0.0).sum())
    return total


def load(args):
    """(model, list of processor outputs, one per calibration prompt)."""
    if args.tiny:
        from vtr.testing import random_image, tiny_model
        model, proc = tiny_model("llava_onevision", attn="eager")
        text = "<|im_start|> user <image> what is in this image ? <|im_end|> <|im_start|> assistant"
        sizes = [(64, 64), (48, 80), (64, 48), (40, 40)]
        batches = [proc(text=[text], images=[random_image(*sizes[i % 4], seed=i)], return_tensors="pt")
                   for i in range(args.tiny_prompts)]
        return model, batches
    if not args.model or not args.prompts:
        raise SystemExit("give --model and --prompts (or --tiny)")
    from PIL import Image
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype),
                                                                   device_map=args.device)
    proc = AutoProcessor.from_pretrained(args.model)
    batches = []
    for line in Path(args.prompts).read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["text"]}]}]
        text = proc.apply_chat_template(chat, add_generation_prompt=True)
        image = Image.open(item["image"]).convert("RGB")
        batches.append(proc(text=[text], images=[image], return_tensors="pt").to(model.device))
    return model, batches


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a LLaVA-OneVision checkpoint (Hugging Face -hf format)")
    p.add_argument("--prompts", help="JSON lines of {\"image\": path, \"text\": question}")
    p.add_argument("--tiny", action="store_true", help="the tiny random model and random images (smoke run)")
    p.add_argument("--tiny-prompts", type=int, default=2, help="calibration prompts with --tiny (default: 2)")
    p.add_argument("--target", type=float, default=0.25,
                   help="layer-averaged visual-token retention to search for (default: 0.25)")
    p.add_argument("--calls", type=int, default=300, help="objective evaluations (official: 300)")
    p.add_argument("--seed", type=int, default=42, help="optimiser seed (official: 42)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default: bfloat16)")
    p.add_argument("--device", default="auto", help="device_map for from_pretrained (default: auto)")
    p.add_argument("--out", help="write the best options and the history as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.target < 1:
        raise SystemExit(f"--target must be in (0, 1), got {args.target}")
    try:
        from skopt import Optimizer
        from skopt.space import Real
    except ImportError:
        raise SystemExit("the search needs scikit-optimize: pip install scikit-optimize") from None

    model, batches = load(args)
    references = [last_token_state(model, inputs) for inputs in batches]
    n_layers = len(compat.decoder_layers(compat.text_model(model)))
    layers = scale_layers(V.OFFICIAL_LAYERS, n_layers, V.OFFICIAL_DEPTH)
    scale = compat.vision_grid_side(model) / V.OFFICIAL_SIDE
    space = bounds(args.target)
    space[3] = (space[3][0] * scale, space[3][1] * scale)
    names = ["vit_keep", "llm_keep_1", "t", "m", "alpha_v"]
    optimizer = Optimizer([Real(lo, hi, name=n) for (lo, hi), n in zip(space, names)], random_state=args.seed,
                          n_initial_points=min(27, args.calls))
    history, best = [], None
    for call in range(args.calls):
        point = [min(max(float(x), lo), hi) for x, (lo, hi) in zip(optimizer.ask(), space)]
        vit, first, t, m, alpha_v = point
        options = dict(ratio=1 - args.target, vit_keep=vit, t=t, m=m, alpha_v=alpha_v,
                       llm_keep=f"{first!r},{last_ratio(args.target, vit, first, layers, n_layers)!r}")
        score = objective(model, batches, references, options)
        if not math.isfinite(score):
            score = 0.0
        optimizer.tell(point, -score)
        history.append({"options": options, "similarity_sum": score})
        if best is None or score > best["similarity_sum"]:
            best = history[-1]
        print(f"{call + 1}/{args.calls} similarity {score:.6f} best {best['similarity_sum']:.6f}", file=sys.stderr)
    result = {"target": args.target, "layers": list(layers), "best": best, "history": history}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(best["options"]))
    return result


if __name__ == "__main__":
    main()
