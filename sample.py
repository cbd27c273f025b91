"""sample.py: generate videos with and without an eraser, side by side.

    python sample.py --model toy --eraser erasers/red --prompt "a red square moving left"
    python sample.py --model toy --eraser erasers/red --prompt "a red square moving left" --compare

In Python, a pipeline with an eraser is used exactly like the stock one:

    from sample import load_pipeline
    pipe = load_pipeline("toy", eraser="erasers/red")
    frames = pipe("a crimson box sliding up").frames[0]
"""

import argparse
import os
import re
import sys
import warnings

import numpy as np
import torch

from unlearn import UserError, apply_eraser, load_base_pipeline, set_erasers


def load_pipeline(model, eraser=None, device=None):
    """A CogVideoXPipeline ('toy', a hub id or a folder), with the eraser from `eraser` attached."""
    pipe = load_base_pipeline(model, device)
    if eraser:
        meta = apply_eraser(pipe, eraser)
        if not meta.get("final", True):
            warnings.warn(f"the eraser in {eraser} is partial: {meta.get('steps_done')} of {meta.get('steps')} steps")
    return pipe


def generate(pipe, prompt, seed, steps, guidance, negative_prompt=None):
    """One video, (F, H, W, 3) floats in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                generator=gen, output_type="np").frames[0]


def side_by_side(videos, labels):
    """Videos (F, H, W, 3) next to each other, each under a label: (F, H + 14, W * n, 3)."""
    from PIL import Image, ImageDraw
    frames, h, w, _ = videos[0].shape
    strip = np.zeros((14, w * len(videos), 3), dtype=np.float32)
    im = Image.fromarray((strip * 255).astype(np.uint8))
    for i, label in enumerate(labels):
        ImageDraw.Draw(im).text((i * w + 2, 1), label, fill=(255, 255, 255))
    strip = np.asarray(im, dtype=np.float32) / 255
    return np.stack([np.concatenate([strip, np.concatenate([v[f] for v in videos], axis=1)]) for f in range(frames)])


def save_video(frames, path, fps=8):
    """Write an mp4 (or a GIF where no mp4 writer is installed, or the path ends in .gif)."""
    from diffusers.utils import export_to_gif, export_to_video
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = [(f * 255).round().astype(np.uint8) for f in frames]
    if path.endswith(".mp4"):
        try:
            export_to_video([im / 255 for im in images], path, fps=fps)
            return path
        except (ImportError, RuntimeError, OSError):
            path = path[:-4] + ".gif"
    from PIL import Image
    export_to_gif([Image.fromarray(im) for im in images], path, fps=fps)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="THUDM/CogVideoX-2b", help="hub id, folder or 'toy'")
    p.add_argument("--eraser", default=None, help="folder of an eraser made by unlearn.py")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--compare", action="store_true", help="original and erased model side by side, same seed")
    p.add_argument("--out", default=None, help="video file to write (default outputs/<prompt>.mp4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6)")
    args = p.parse_args(argv)
    if args.compare and not args.eraser:
        raise UserError("--compare needs --eraser: the erased model is one of the two videos")
    out = args.out or os.path.join("outputs", re.sub(r"\W+", "_", args.prompt.strip())[:60] + ".mp4")
    pipe = load_pipeline(args.model, args.eraser)
    video = generate(pipe, args.prompt, args.seed, args.steps, args.guidance)
    if args.compare:
        set_erasers(pipe.transformer, False)
        original = generate(pipe, args.prompt, args.seed, args.steps, args.guidance)
        video = side_by_side([original, video], ["original", "erased"])
    print(f"wrote {save_video(video, out)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
