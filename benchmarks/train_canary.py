"""Train the accuracy canary's tiny LLaVA (vtr/bench/canary_task.py) and write its weights next to the task.

    python benchmarks/train_canary.py                # the shipped weights (defaults below), seed 0
    python benchmarks/train_canary.py --out /tmp/w.safetensors --steps 200

Fresh samples every step (seeded), a curriculum on the square's size, AdamW, loss: cross-entropy of the last
position's logits over the answer tokens (the evaluator scores the same way). Prints the held-out accuracy (seed
10**6) every 50 steps. Not a CI step: CI loads the shipped weights (tests/test_canary.py). The shipped weights
took 1231 s on 2 shared cores of an AMD EPYC (load average 5-9).
"""
import argparse
import time

import torch
from safetensors.torch import save_file

from vtr.bench import canary_task as task


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: 800)")
    p.add_argument("--batch", type=int, default=32, help="samples per step (default: 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak AdamW learning rate (default: 5e-3)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default: 0)")
    p.add_argument("--out", default=str(task.WEIGHTS), help=f"safetensors file (default: {task.WEIGHTS})")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, processor = task.build(args.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    answers = task.answer_ids(processor)
    text = task.inputs(task.samples(1, 0)[0], processor)
    held_images, held_answers, _ = task.samples(256, 10**6)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        # Curriculum: the square shrinks from 40 to the task's 8 pixels over the first 40% of the steps, so the
        # colour words are learnt from a strong signal before attention has to find one patch in 64.
        square = max(task.SQUARE, round(40 - 32 * step / (0.4 * args.steps)))
        images, labels, _ = task.samples(args.batch, args.seed * 10**5 + step, square)
        logits = model(input_ids=text["input_ids"].expand(args.batch, -1),
                       attention_mask=text["attention_mask"].expand(args.batch, -1),
                       pixel_values=task.pixels(images, processor)).logits[:, -1, answers]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                held = model(input_ids=text["input_ids"].expand(len(held_images), -1),
                             attention_mask=text["attention_mask"].expand(len(held_images), -1),
                             pixel_values=task.pixels(held_images, processor)).logits[:, -1, answers]
            accuracy = (held.argmax(-1).numpy() == held_answers).mean()
            model.train()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}, square {square}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    save_file(state, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
