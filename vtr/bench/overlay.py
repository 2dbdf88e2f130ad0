"""Kept-token overlay: the image (or each video frame) with the pruned patches darkened, from ``handle.last``.

    python -m vtr.bench.overlay --model Qwen/Qwen2-VL-7B-Instruct --image cat.jpg --method dart --ratio 0.889
    python -m vtr.bench.overlay --model tiny-qwen2_vl --image cat.jpg    # a tiny random model: tries the tool

--model takes a checkpoint (hub id or directory: its weights and processor) or tiny-<family> (vtr.testing's tiny
random model and its offline processor). Shipped configs and config.json files are refused: they have no
processor. The model's memory is estimated before it is built; one that would not fit is refused with the number.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from . import cli

if TYPE_CHECKING:
    from ..report import PrefillRecord


def overlay(image: Image.Image | list, record: PrefillRecord, row: int = 0, span: int = 0, view: str = "resize",
            cell: int = 24) -> Image.Image:
    """Draw which visual tokens of one image (or video) survived.

    image: the PIL image, or a list of frames (one per temporal slice of a video span).
    view: how the model saw the picture: ``"resize"`` (the whole image mapped onto the token grid, Qwen-VL) or
    ``"crop"`` (shortest side resized, centre square crop, LLaVA-1.5's CLIP processor).
    cell: pixels per token in the output. Pruned tokens are darkened, kept ones outlined."""
    visual = record.layout.rows[row].spans[span]
    frames, rows, cols = visual.grid
    kept = record.kept[row]
    kept_local = set((kept[(kept >= visual.offset) & (kept < visual.offset + visual.n)] - visual.offset).tolist())
    pictures = image if isinstance(image, list) else [image] * frames
    width, height = cols * cell, rows * cell
    canvas = Image.new("RGB", (width * frames, height))
    for t in range(frames):
        picture = pictures[min(t, len(pictures) - 1)].convert("RGB")
        if view == "crop":
            side = min(picture.size)
            left, top = (picture.width - side) // 2, (picture.height - side) // 2
            picture = picture.crop((left, top, left + side, top + side))
        canvas.paste(picture.resize((width, height)), (t * width, 0))
    shade = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for i in range(visual.n):
        if bool(visual.newline[i]):
            continue
        t, r, c = int(visual.frame[i]), int(visual.row[i]), int(visual.col[i])
        box = (t * width + c * cell, r * cell, t * width + (c + 1) * cell - 1, (r + 1) * cell - 1)
        if i in kept_local:
            draw.rectangle(box, outline=(255, 220, 0, 255))
        else:
            draw.rectangle(box, fill=(0, 0, 0, 180))
    return Image.alpha_composite(canvas.convert("RGBA"), shade).convert("RGB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vtr.bench.overlay", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", required=True,
                   help="a hub id or checkpoint directory (its weights and processor), or tiny-<family> (a tiny "
                        "random model, e.g. tiny-qwen2_vl); shipped configs are refused (no processor); required")
    p.add_argument("--image", required=True, help="the image file; required")
    p.add_argument("--question", default="Describe the image.", help="the prompt's question (default: %(default)r)")
    p.add_argument("--method", default="dart", help="a method name; vtr.methods() lists them (default: dart)")
    p.add_argument("--ratio", type=float, default=0.889,
                   help="fraction of the image's visual tokens to remove (default: 0.889)")
    p.add_argument("--out", default="kept.png", help="the PNG to write (default: kept.png)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16 (default: auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto = cuda if available)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_without_processor(parser, args.model)
    cli.check_names(parser, args.model, [args.method], files={"--image": args.image})
    print("loading torch and transformers ...", file=sys.stderr, flush=True)
    import torch

    import vtr

    from ..methods import lookup
    from . import models
    from .evaluate import prompt
    try:
        lookup(args.method)
        plan = models.plan(args.model, dtype=args.dtype, device=args.device)
    except (ValueError, OSError, models.NotEnoughMemory) as error:
        parser.error(str(error))
    print(f"building {plan.describe()} ...", file=sys.stderr, flush=True)
    model, processor = models.build(plan)
    picture = Image.open(args.image).convert("RGB")
    inputs = processor(text=[prompt(processor, {"image": args.image, "question": args.question})],
                       images=[picture], return_tensors="pt").to(model.device)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    with vtr.patch(model, args.method, ratio=args.ratio) as handle, torch.no_grad():
        model(**inputs)
    view = "crop" if type(model).__name__ == "LlavaForConditionalGeneration" else "resize"
    overlay(picture, handle.last, view=view).save(args.out)
    print(f"kept {handle.last.n_kept[0]} of {handle.last.n_visual[0]} visual tokens; wrote {args.out}")


if __name__ == "__main__":
    main()
