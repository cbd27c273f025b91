"""videos.py: making, showing and reading videos; used by sample.py, toy.py and diagnose.py, not the method.

- `generate`: videos from a pipeline (erased or not), at the model's own size unless asked.
- `decode_video`: CogVideoX latents to pixels, as the pipeline's last step (the toy's diagnostics).
- `side_by_side`, `save_video` (mp4, or GIF), `read_video`.
- `Rate`: a share of videos that keeps its count and its 95 % interval (`wilson`), as every table prints it.
"""

import math
import os

import numpy as np
import torch

from unlearn import text_length, video_size


def generate(pipe, prompts, seed=0, steps=20, batch=16, num_frames=None, height=None, width=None, seeds=None,
             **kwargs):
    """Videos for prompts, in batches, the batch from prompt i seeded seed + i (or, with `seeds`, each video
    its own seed): list of (F, H, W, 3) in [0, 1].

    At the size asked, else the model's own, at its own text length; `kwargs` go to the pipeline, e.g.
    guidance_scale=6 or negative_prompt="red".
    """
    frames, height, width = video_size(pipe, num_frames, height, width)
    kwargs = dict(num_frames=frames, height=height, width=width, max_sequence_length=text_length(pipe), **kwargs)
    videos = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i) if seeds is None else \
            [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, generator=gen, output_type="np", **kwargs)
        videos.extend(out.frames)
    return videos


def decode_video(pipe, latents, output_type="np"):
    """CogVideoX latents (B, F', C, H', W') -> videos, as its pipeline's last step: (B, F, H, W, 3) in [0, 1]
    for "np". (The toy's diagnostics read it; generate() decodes every family through its own pipeline.)"""
    with torch.no_grad():
        frames = pipe.decode_latents(latents.to(pipe.vae.device, pipe.vae.dtype))
    return pipe.video_processor.postprocess_video(frames, output_type=output_type)


def side_by_side(videos, labels):
    """Videos (F, H, W, 3) next to each other, each under a label: (F, H + 16, W * n, 3)."""
    from PIL import Image, ImageDraw
    frames, h, w, _ = videos[0].shape
    im = Image.new("RGB", (w * len(videos), 16))  # 16: video codecs want sizes in multiples of 16
    for i, label in enumerate(labels):
        ImageDraw.Draw(im).text((i * w + 2, 2), label, fill=(255, 255, 255))
    strip = np.asarray(im, dtype=np.float32) / 255
    return np.stack([np.concatenate([strip, np.concatenate([v[f] for v in videos], axis=1)]) for f in range(frames)])


def save_video(frames, path, fps=8):
    """Write an mp4 (or a GIF where no mp4 writer is installed, or the path ends in .gif)."""
    from diffusers.utils import export_to_gif, export_to_video
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".mp4"):
        try:
            export_to_video(list(np.clip(frames, 0, 1)), path, fps=fps)
            return path
        except Exception:  # no writer: imageio without its ffmpeg plugin raises AttributeError, others other errors
            path = path[:-4] + ".gif"
    export_to_gif([Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames], path, fps=fps)
    return path


def read_video(path):
    """(F, H, W, 3) floats in [0, 1] from an mp4 or GIF."""
    import imageio.v3 as iio
    return np.asarray(iio.imread(path), dtype=np.float32)[..., :3] / 255


def wilson(rate, n, z=1.96):
    """Wilson's 95 % interval (low, high) for a share `rate` of `n` videos drawn independently. A video is the
    unit: frames of one video are not independent draws."""
    if not n:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class Rate(float):
    """k of n: the float k / n, that keeps k, n and its 95 % interval (Wilson's) over `over` videos: n itself
    when it counts videos; when it counts frames, their videos (a frame rate is a mean of per-video shares in
    [0, 1], each of variance at most p(1 - p), so the interval over videos covers it)."""

    def __new__(cls, k, n, over=None):
        rate = super().__new__(cls, k / n if n else float("nan"))
        rate.k, rate.n, rate.over = int(k), int(n), int(n if over is None else over)
        return rate

    @property
    def interval(self):
        return wilson(float(self), self.over)

    def __str__(self):  # "20/24 83 % [64-93]"
        low, high = self.interval
        return f"{self.k}/{self.n} n/a" if not self.n else \
            f"{self.k}/{self.n} {100 * self:.0f} % [{100 * low:.0f}-{100 * high:.0f}]"

    def as_dict(self):
        return {"rate": None if not self.n else float(self), "count": self.k, "of": self.n, "videos": self.over,
                "interval_95": [round(x, 4) for x in self.interval]}
