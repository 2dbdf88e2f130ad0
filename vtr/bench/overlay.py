"""Kept-token overlay: the image (or each video frame) with the pruned patches darkened, from ``handle.last``.

    python -m vtr.bench.overlay --model Qwen/Qwen2-VL-7B-Instruct --image cat.jpg --method dart --ratio 0.889
"""
from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtr.bench.overlay", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="Describe the image.")
    p.add_argument("--method", default="dart")
    p.add_argument("--ratio", type=float, default=0.889)
    p.add_argument("--out", default="kept.png")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    import torch

    import vtr
    from .evaluate import prompt
    from .models import load
    model, processor = load(args.model, device=args.device)
    picture = Image.open(args.image).convert("RGB")
    inputs = processor(text=[prompt(processor, {"image": args.image, "question": args.question})],
                       images=[picture], return_tensors="pt").to(model.device)
    with vtr.patch(model, args.method, ratio=args.ratio) as handle, torch.no_grad():
        model(**inputs)
    view = "crop" if type(model).__name__ == "LlavaForConditionalGeneration" else "resize"
    overlay(picture, handle.last, view=view).save(args.out)
    print(f"kept {handle.last.n_kept[0]} of {handle.last.n_visual[0]} visual tokens; wrote {args.out}")


if __name__ == "__main__":
    main()
