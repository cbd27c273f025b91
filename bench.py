"""bench.py: what one unlearning step costs, against its floor.

    python bench.py             # CPU: a mid-size random CogVideoX, a few minutes
    python bench.py --gpu       # one GPU: a CogVideoX-2B-shaped random model, 17 and 49 frames, 480x720, bf16
    python bench.py --tiny      # the smallest size, to keep this script working (the tests run it)

The floor (a) is the student's forward and backward over exactly the latents and prompts
one unlearning step trains on (concept and preservation rows), with the same gradient
checkpointing. The step (b) is one full `unlearn.unlearning_step`: drawing x_t, the
teacher pass with the concept masks, the student's forward and backward, the optimizer.
They are timed interleaved in one process, so that the machine's noise hits both alike.
No weights are needed: the model and the text embeddings are random.

The last line printed is
    step_cost_ratio=<(b)/(a)> x_t_share=<share of (b) making x_t> memory_ratio=<peak unlearning / peak sampling>
Memory on a GPU is torch.cuda.max_memory_allocated; on a CPU it is the growth of the
process's peak resident memory over what it held before the model was built (after the
imports), each phase in a fresh process whose allocator returns freed tensors at once.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

import unlearn

SIZES = {  # name: transformer config, frames, height, width
    "tiny": (dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=32),
             9, 64, 64),
    "cpu": (dict(num_attention_heads=8, attention_head_dim=64, num_layers=8, text_embed_dim=512, time_embed_dim=256),
            9, 128, 128),
    "2b": (dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, text_embed_dim=4096,
                time_embed_dim=512), None, 480, 720),
}


def random_pipeline(size, frames, height, width, device, dtype):
    """A CogVideoX pipeline of random weights, with no text encoder and no VAE (not needed to train)."""
    torch.manual_seed(0)
    with torch.device(device):
        transformer = CogVideoXTransformer3DModel(**SIZES[size][0], sample_frames=frames, sample_height=height // 8,
                                                  sample_width=width // 8).to(dtype)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", clip_sample=False, snr_shift_scale=3.0)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=scheduler)


def random_embeds(pipe, prompts=2):
    g = torch.Generator().manual_seed(0)
    dim, dev, dtype = pipe.transformer.config.text_embed_dim, pipe.transformer.device, pipe.transformer.dtype
    make = lambda n: torch.randn(n, 226, dim, generator=g).to(dev, dtype)  # noqa: E731
    tokens = torch.zeros(prompts, 226)
    tokens[:, 4:6] = 1  # the concept's two tokens
    return dict(concept=make(prompts), anchor=make(prompts), preserve=make(prompts), empty=make(1)), tokens


def settings(frames, height, width, extra):
    return unlearn.parse_args(["--concept", "bench", "--model", "random", "--num-frames", str(frames),
                               "--height", str(height), "--width", str(width), "--xt-steps", "2", *extra])


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device, base_rss):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(size, frames, height, width, device, phase, repeats, extra):
    """One phase in this process: 'time' (interleaved floor and step) or 'sample' (memory of sampling)."""
    base = current_rss()
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    pipe = random_pipeline(size, frames, height, width, device, dtype)
    embeds, tokens = random_embeds(pipe)
    args = settings(frames, height, width, extra)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if phase == "sample":  # one guided denoising step, as the pipeline does it
        unlearn.resolve_size(pipe, args)
        shape = unlearn.video_shape(pipe, args.num_frames, args.height, args.width)
        pipe.scheduler.set_timesteps(2, device=device)
        noise = torch.randn(1, *shape, device=device, dtype=dtype)
        unlearn.sample_latents(pipe.transformer, pipe.scheduler, noise, embeds["concept"][:1], embeds["empty"],
                               unlearn.rotary_embeddings(pipe, shape), 6.0, steps=1)
        sync(device)
        return {"peak": peak_memory(device, base)}

    r = unlearn.setup_training(args, pipe, embeds, tokens, log=lambda *_: None)
    times, parts = {"floor": [], "step": []}, {}

    @contextlib.contextmanager
    def timer(name):
        sync(device)
        start = time.perf_counter()
        yield
        sync(device)
        parts.setdefault(name, []).append(time.perf_counter() - start)

    idx = torch.arange(args.batch_size, device=device)
    x_t, t = r.xt.draw(idx)  # latents like those a step trains on, made outside the floor's timing

    def floor():  # backpropagated as the step does: the concept's rows, then the preservation rows
        for embeds in (r.cond[idx], r.pre[idx]):
            unlearn.student_pass(r.transformer, r.state, x_t, t, embeds, r.rotary).float().pow(2).mean().backward()
        r.opt.zero_grad(set_to_none=True)

    for i in range(repeats + 1):  # the first round warms up and is not counted
        for name, work in (("floor", floor), ("step", lambda: unlearn.unlearning_step(r, timer))):
            sync(device)
            start = time.perf_counter()
            work()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - start)
        if i == 0:
            parts.clear()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"floor": median(times["floor"]), "step": median(times["step"]),
            "parts": {k: median(v) for k, v in parts.items()}, "peak": peak_memory(device, base)}


def in_child(*argv):
    """Run one phase in a fresh process, so that its peak memory is its own."""
    # glibc hands freed blocks of 64 KiB and more back at once: the resident set then follows the
    # tensors alive, as torch.cuda.max_memory_allocated does on a GPU, not what the allocator kept.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--phase", *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"the phase {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label, timing, sampling):
    print(f"\n{label}")
    print(f"  (a) floor: student forward + backward  {timing['floor']:8.3f} s")
    print(f"  (b) one unlearning step                {timing['step']:8.3f} s")
    for name, seconds in timing["parts"].items():
        print(f"        {name:<32} {seconds:8.3f} s  {100 * seconds / timing['step']:5.1f} %")
    print(f"  peak memory: unlearning {timing['peak'] / 2**30:.2f} GiB, sampling {sampling['peak'] / 2**30:.2f} GiB")
    return (f"step_cost_ratio={timing['step'] / timing['floor']:.2f} "
            f"x_t_share={timing['parts'].get('x_t', 0) / timing['step']:.3f} "
            f"memory_ratio={timing['peak'] / sampling['peak']:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CogVideoX-2B shape on cuda, 17 and 49 frames")
    p.add_argument("--tiny", action="store_true", help="the smallest size (seconds)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of (a) and (b) (default 5)")
    p.add_argument("--phase", nargs=6, metavar=("SIZE", "FRAMES", "H", "W", "DEVICE", "PHASE"),
                   help=argparse.SUPPRESS)
    args, extra = p.parse_known_args()  # anything else goes to unlearn.py's settings, e.g. --xt sample
    if args.phase:
        size, frames, h, w, device, phase = args.phase
        print(json.dumps(measure(size, int(frames), int(h), int(w), device, phase, args.repeats, extra)))
        return
    if args.gpu:
        if not torch.cuda.is_available():
            print("error: --gpu needs a CUDA GPU; run python bench.py for the CPU benchmark", file=sys.stderr)
            sys.exit(2)
        runs = [("2b", 17, 480, 720), ("2b", 49, 480, 720)]
    else:
        runs = [("tiny", 9, 64, 64)] if args.tiny else [("cpu", 9, 128, 128)]
    device = "cuda" if args.gpu else "cpu"
    line = ""
    for size, frames, h, w in runs:
        timing = in_child(size, str(frames), str(h), str(w), device, "time", "--repeats", str(args.repeats), *extra)
        sampling = in_child(size, str(frames), str(h), str(w), device, "sample", *extra)
        line = report(f"{size} model, {frames} frames at {h}x{w} on {device} {' '.join(extra)}", timing, sampling)
        print(f"  {line}")
    print(line)


if __name__ == "__main__":
    main()
