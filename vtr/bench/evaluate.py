"""Quick accuracy checks on a local JSONL set, without lmms-eval: dense and pruned answers from the same model in
the same run, scored against the references and against each other.

One record per line; paths are relative to the JSONL file:

    {"image": "cat.png", "question": "What animal is this?", "choices": ["cat", "dog"], "answer": "cat"}
    {"video": "clip.mp4", "question": "What happens?", "answer": "a ball falls"}

With ``choices`` the prompt lists them as lettered options and a prediction counts when it names the right letter
or option; without, when the normalised reference appears in the normalised prediction. Agreement is the fraction
of samples where the pruned answer equals the dense answer.

    python -m vtr.bench.evaluate --model llava-hf/llava-1.5-7b-hf --data set.jsonl --methods dart,fastv --ratios 0.778
    python -m vtr.bench.evaluate --model tiny-qwen2_vl --data set.jsonl    # a tiny random model: tries the tool

--model takes a checkpoint (hub id or directory: its weights and processor) or tiny-<family> (vtr.testing's tiny
random model and its offline processor). Shipped configs and config.json files are refused: they have no
processor. The model's memory is estimated before it is built; one that would not fit is refused with the number.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

from . import cli

LETTERS = string.ascii_uppercase


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for key in ("image", "video"):
                if key in record:
                    record[key] = str((path.parent / record[key]).resolve())
            records.append(record)
    return records


def question_text(record: dict) -> str:
    text = record["question"]
    if record.get("choices"):
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(record["choices"]))
        text = f"{text}\n{options}\nAnswer with the option's letter from the given choices directly."
    return text


def prompt(processor, record: dict) -> str:
    """The model's chat template when the processor has one, else the family's plain prompt format."""
    kind = "video" if "video" in record else "image"
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question_text(record)}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    token = getattr(processor, f"{kind}_token")
    if "Qwen" in type(processor).__name__:
        return (f"<|im_start|> user <|vision_start|>{token}<|vision_end|> {question_text(record)} <|im_end|> "
                f"<|im_start|> assistant")
    return f"USER : {token} {question_text(record)} ASSISTANT :"


def visual_inputs(record: dict) -> dict:
    from PIL import Image
    if "image" in record:
        return {"images": [Image.open(record["image"]).convert("RGB")]}
    return {"videos": [read_video(record["video"])]}


def read_video(path: str, frames: int = 8):
    """``frames`` frames evenly spaced over the file, as a ``[T, H, W, 3]`` uint8 array (PyAV)."""
    import av
    import numpy as np
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = np.linspace(0, len(decoded) - 1, min(frames, len(decoded))).round().astype(int)
    return np.stack([decoded[i] for i in picks])


def answer(model, processor, record: dict, max_new_tokens: int) -> str:
    import torch
    inputs = processor(text=[prompt(processor, record)], return_tensors="pt", **visual_inputs(record))
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device))
              for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def is_correct(prediction: str, record: dict) -> bool:
    reference = str(record["answer"])
    choices = record.get("choices")
    if choices:
        target = choices.index(reference) if reference in choices else LETTERS.index(reference.strip().upper())
        letter = re.match(r"\s*\(?([A-Z])[\.\):\s]|\s*\(?([A-Z])\)?$", prediction)
        picked = next((g for g in letter.groups() if g), None) if letter else None
        if picked is not None:
            return LETTERS.index(picked) == target
        return normalise(choices[target]) in normalise(prediction)
    return normalise(reference) in normalise(prediction)


def evaluate(model, processor, records: list[dict], configs: list[tuple[str, dict, dict]],
             max_new_tokens: int = 16, progress: bool = False) -> dict:
    """Dense run first, then each (method, budget, options): accuracy, agreement with dense, mean kept tokens and
    mean prefill time. Returns {"results": {"dense": {...}, "<method>[budget]": {...}}, "answers": {...}}.
    progress: a bar on stderr over every generated answer (needs tqdm)."""
    import vtr
    results, answers = {}, {}
    bar = cli.progress(len(records) * (1 + len(configs)), progress, "answering")
    try:
        dense = _run(model, processor, records, max_new_tokens, bar, "dense")
        for method, budget, options in configs:
            label = f"{method}[{','.join(f'{k}={v}' for k, v in budget.items())}]"
            with vtr.patch(model, method, **budget, **options):
                run = _run(model, processor, records, max_new_tokens, bar, label)
            results[label] = _summary(run, records, dense["answers"])
            answers[label] = run["answers"]
    finally:
        bar.close()
    results = {"dense": _summary(dense, records, None), **results}
    answers = {"dense": dense["answers"], **answers}
    return {"results": results, "answers": answers}


def _run(model, processor, records, max_new_tokens, bar, label) -> dict:
    from .recorder import PrefillRecorder
    answers, log = [], []
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(label)
    with PrefillRecorder(model) as recorder:
        for record in records:
            before = len(recorder.entries)
            answers.append(answer(model, processor, record, max_new_tokens))
            log.append(recorder.entries[before])  # the sample's prefill
            bar.update(1)
    return {"answers": answers, "log": log}


def _summary(run: dict, records: list[dict], dense_answers) -> dict:
    n = len(records)
    summary = {"n": n, "accuracy": sum(is_correct(a, r) for a, r in zip(run["answers"], records)) / n,
               "mean_prefill_s": sum(e["prefill_s"] for e in run["log"]) / n}
    if dense_answers is not None:
        summary["agreement_with_dense"] = sum(a == d for a, d in zip(run["answers"], dense_answers)) / n
        summary["mean_visual_tokens"] = sum(e.get("n_visual", 0) for e in run["log"]) / n
        summary["mean_kept_tokens"] = sum(e.get("n_kept", 0) for e in run["log"]) / n
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.evaluate", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True,
                   help="a hub id or checkpoint directory (its weights and processor), or tiny-<family> (a tiny "
                        "random model, e.g. tiny-qwen2_vl); shipped configs are refused (no processor); required")
    p.add_argument("--data", required=True, help="the JSONL file (format above); required")
    p.add_argument("--methods", default="dart", help="comma-separated method names (default: dart)")
    p.add_argument("--ratios", default="0.778",
                   help="comma-separated fractions of visual tokens to remove (default: 0.778)")
    p.add_argument("--keep", default="",
                   help="comma-separated visual tokens to keep per image, instead of --ratios (default: unset)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default: 16)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16 (default: auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attn", default="sdpa", help="attention backend: sdpa, eager, flash_attention_2 (default: sdpa)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto = cuda if available)")
    p.add_argument("--out", default=None, help="JSON file for the results and every answer (default: not written)")
    p.add_argument("--quiet", action="store_true", help="no progress messages or bar on stderr (default: show them)")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_without_processor(parser, args.model)
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    methods = [m for m in args.methods.split(",") if m]
    cli.check_names(parser, args.model, methods, files={"--data": args.data})
    records = load_records(args.data)
    missing = [r[k] for r in records for k in ("image", "video") if k in r and not Path(r[k]).is_file()]
    if missing:
        parser.error(f"{args.data}: {len(missing)} missing file(s), e.g. {missing[0]}")
    budgets = ([{"keep": int(k)} for k in args.keep.split(",") if k] or
               [{"ratio": float(r)} for r in args.ratios.split(",") if r])
    say("loading torch and transformers ...")
    from ..methods import lookup
    from . import models
    try:
        for method in methods:
            lookup(method)
        plan = models.plan(args.model, dtype=args.dtype, device=args.device)
    except (ValueError, OSError, models.NotEnoughMemory) as error:
        parser.error(str(error))
    say(f"building {plan.describe()} ...")
    model, processor = models.build(plan, args.attn)
    configs = [(m, b, {}) for m in methods for b in budgets]
    say(f"answering {len(records)} records, dense and {len(configs)} pruned configurations")
    report = evaluate(model, processor, records, configs, args.max_new_tokens, progress=not args.quiet)
    for label, summary in report["results"].items():
        print(f"{label:<28} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in summary.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
