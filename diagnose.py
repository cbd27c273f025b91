"""diagnose.py: where an erasure's collateral damage comes from, measured on the toy.

    python diagnose.py target --concept red --words red crimson scarlet   # what the erasing loss asks for
    python diagnose.py masks --concept red                                # where the concept masks fall

`target`: the erasers are trained towards Eq. 1's target v_neg; at best the erased model
follows it. This samples the frozen model with v_neg in place of v(x_t, c) at every step
(classifier-free guidance on top, as the pipeline does) and measures the videos with
`toy.erasure_report`, as an erased model is measured: what the loss asks for, before any
training. If the target itself loses a second square, no eraser that meets it keeps it.

`masks`: the localization loss keeps each eraser's output at zero outside its concept mask,
so it can spare a second square only where the masks leave that square out. This samples
the frozen model on scenes of a square of the concept's colour beside one of another colour,
and prints, for each block and sampling step, the mean mask on the video tokens that hold
only the concept's square, only the other one, and neither.
"""

import argparse
import functools
import random
import types

import numpy as np
import torch

import toy
from families import Text
from prompts import substitute
from runs import UserError, run_cli
from unlearn import (attach_erasers, concept_mask, concept_tokens, encode_prompts, load_base_pipeline, model_inputs,
                     negative_guidance_target, processors, sample_latents, text_length, token_grid, velocity,
                     video_shape, video_size, x_t_sampler)
from videos import decode_video


def native_shape(pipe):
    """Latent shape (F', C, H', W') of a video of the size the model was made for."""
    return video_shape(pipe, *video_size(pipe))


class TargetPreview:
    """Called like a CogVideoXPipeline; samples the frozen model with Eq. 1's target for v(x_t, c).

    The anchor is the prompt with `words` removed (unlearn.py's default anchor) or, with
    `anchor="empty"`, the empty prompt; prompts that name none of the words keep v(x_t, c), as
    the erasers are trained on concept prompts only. With no words it is the stock pipeline
    (sampled by DDIM on the pipeline's schedule, as unlearn.py samples x_t).
    """

    def __init__(self, pipe, words, eta, anchor="removed"):
        self.pipe, self.words, self.eta, self.anchor = pipe, list(words), eta, anchor

    def __getattr__(self, name):  # the pipeline's parts and sizes, as videos.generate reads them
        return getattr(self.pipe, name)

    def _anchor(self, prompt):
        removed = functools.reduce(lambda p, w: substitute(p, w, ""), self.words, prompt)
        # a prompt that names none of the words is not a concept prompt: its target is v(x_t, c) itself
        return "" if self.anchor == "empty" and removed != prompt else removed

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=50, generator=None, output_type="np", guidance_scale=6.0,
                 num_frames=None, height=None, width=None, max_sequence_length=None):
        pipe, prompts = self.pipe, [prompt] if isinstance(prompt, str) else list(prompt)
        cond, anchor = encode_prompts(pipe, prompts), encode_prompts(pipe, [self._anchor(p) for p in prompts])
        rows = Text.cat([encode_prompts(pipe, [""]).expand(len(prompts)), cond, anchor])
        shape = video_shape(pipe, *video_size(pipe, num_frames, height, width))
        if isinstance(generator, list):  # a generator a video, as diffusers' pipelines take them
            x = torch.cat([torch.randn((1, *shape), generator=g) for g in generator])
        else:
            x = torch.randn((len(prompts), *shape), generator=generator)
        x = x.to(cond.device, pipe.transformer.dtype)
        sampler, static = x_t_sampler(pipe, num_inference_steps, cond.device), model_inputs(pipe, shape, guidance_scale)
        for t in sampler.timesteps:  # the pipeline's guidance, with v(x_t, c) replaced by Eq. 1's target
            v = velocity(pipe.transformer, torch.cat([x, x, x]), t.expand(3 * len(x)), rows, static)
            v_uncond, v_cond, v_anchor = v.float().chunk(3)
            v_neg = negative_guidance_target(v_cond, v_anchor, self.eta)
            x = sampler.step(v_uncond + guidance_scale * (v_neg - v_uncond), t, x, return_dict=False)[0].to(x.dtype)
        return types.SimpleNamespace(frames=decode_video(pipe, x, output_type))


def token_cover(video, colour, grid, temporal, patch):
    """(N_video,) bool: the video tokens (frames, h, w as `grid`) whose pixels hold at least a tenth of `colour`."""
    pixels = toy.pixel_colours(video) == list(toy.PALETTE).index(colour)  # (F, H, W)
    frames, h, w = grid
    groups = [pixels[:1]] + [pixels[1 + temporal * i:1 + temporal * (i + 1)] for i in range(frames - 1)]
    share = np.stack([g.mean(0).reshape(h, patch, w, patch).mean((1, 3)) for g in groups])
    return share.reshape(-1) > 0.1


@torch.no_grad()
def mask_coverage(pipe, concept, threshold=0.1, n=16, steps=20, seed=5):
    """{(sampling step, block): mean mask on [concept-only tokens, other-only tokens, neither]}, and
    how many of the n videos it counts.

    Two-square scenes: a square of `concept` (a toy colour) beside one of each other colour in
    turn; a video counts only where the frozen model drew both. Zero erasers are attached to
    `pipe`'s transformer (switched off) to record the concept attention.
    """
    rng, others = random.Random(seed), [c for c in toy.PALETTE if c != concept]
    scenes = [toy.random_scene(rng, colours=[concept, others[i % len(others)]]) for i in range(n)]
    prompts = [toy.make_prompt(rng, s, words=[concept, s[1]["colour"]]) for s in scenes]
    cfg, transformer, shape = pipe.transformer.config, pipe.transformer, native_shape(pipe)
    static, grid = model_inputs(pipe, shape, 6.0), token_grid(transformer, shape)
    cond, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])
    tokens = concept_tokens(pipe.tokenizer, prompts, concept, text_length(pipe)).to(cond.device)
    scheduler = x_t_sampler(pipe, steps, cond.device)
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(cond.device, transformer.dtype)
    _, state = attach_erasers(transformer, 1)  # zero erasers: they only record the concept attention
    state.enabled = False
    xs = sample_latents(transformer, scheduler, noise, cond, uncond, static, 6.0)
    videos = decode_video(pipe, xs[-1])
    size = pipe.vae_scale_factor_spatial * cfg.patch_size
    regions = []
    for video, scene in zip(videos, scenes):
        mine = token_cover(video, concept, grid, pipe.vae_scale_factor_temporal, size)
        other = token_cover(video, scene[1]["colour"], grid, pipe.vae_scale_factor_temporal, size)
        drawn = {s["colour"] for s in toy.describe(video)} >= {concept, scene[1]["colour"]}
        regions.append((mine & ~other, other & ~mine, ~mine & ~other) if drawn else None)
    if not any(regions):
        raise UserError(f"the model drew both squares in none of the {n} videos: no mask to measure")
    table = {}
    for k in range(0, steps, max(1, steps // 5)):
        state.tokens = tokens
        velocity(transformer, xs[k], scheduler.timesteps[k].expand(n), cond, static)
        state.tokens = None
        for block, proc in enumerate(processors(transformer)):
            masks = concept_mask(proc.attention, grid, threshold, torch.ones(n, dtype=torch.bool, device=cond.device))
            masks = masks.cpu().numpy()
            table[k, block] = [float(np.mean(np.concatenate([m[r[j]] for m, r in zip(masks, regions) if r])))
                               for j in range(3)]
    return table, sum(r is not None for r in regions)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["target", "masks"])
    p.add_argument("--model", default="toy", help="a toy pipeline: 'toy' or a folder toy.py built")
    p.add_argument("--concept", default="red", help="a toy colour")
    p.add_argument("--words", nargs="+", default=None, help="target: words the anchor removes (default: the concept)")
    p.add_argument("--eta", type=float, default=3.0, help="target: Eq. 1's eta (default 3)")
    p.add_argument("--anchor", choices=["removed", "empty"], default="removed", help="target: Eq. 1's anchor")
    p.add_argument("--threshold", type=float, default=0.1, help="masks: the concept mask threshold (default 0.1)")
    p.add_argument("--seed", type=int, default=11, help="target: toy.erasure_report's seed (default 11)")
    args = p.parse_args()
    if args.concept not in toy.PALETTE:
        raise UserError(f"--concept {args.concept}: not a toy colour; use one of {', '.join(toy.PALETTE)}")
    if not (args.eta >= 0 and 0 <= args.threshold < 1):
        raise UserError("--eta must be >= 0 and --threshold in [0, 1)")
    pipe = load_base_pipeline(args.model)
    if not toy.speaks_toy(pipe.tokenizer):
        raise UserError(f"--model {args.model}: not a toy pipeline; diagnose.py measures with the toy's judge")
    if args.what == "target":
        preview = TargetPreview(pipe, args.words or [args.concept], args.eta, args.anchor)
        report = toy.erasure_report(preview, args.concept, seed=args.seed)
        print(toy.format_table({f"target, eta {args.eta:g}": report}))
    else:
        table, used = mask_coverage(pipe, args.concept, args.threshold)
        print(f"{used} of 16 videos show both squares; the mean mask on their tokens:")
        print("step block   concept-only  other-only  neither")
        for (k, block), means in table.items():
            print(f"{k:4d} {block:5d}   " + "  ".join(f"{m:10.2f}" for m in means))


if __name__ == "__main__":
    run_cli(main)
