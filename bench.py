"""bench.py: what one unlearning step costs, against its floor, and what memory it needs.

    python bench.py                  # CPU: a random CogVideoX at a long video sequence, about 8 minutes on 2 cores
    python bench.py --family wan     # the same for Wan (or hunyuan): each family has its tiny and CPU size
    python bench.py --gpu            # one GPU: CogVideoX-2B, 5B, 1.5, Wan 2.1 1.3B and HunyuanVideo shapes,
                                     # random weights, bf16 (a shape takes a minute or more on an H200)
    python bench.py --tiny           # the smallest size, to keep this script working (the tests run it)
    python bench.py --gpu --toy --whole --budget 540   # what the next GPU at hand runs, most needed first:
        --toy    the toy's Quick start and its `sample.py --eval toy` on cuda (bf16 and fp32) and on the CPU,
                 their tables side by side: --seed is one run on every device
        --whole  CogVideoX-2B's real parts with random weights (its transformer and VAE, a T5 of its width
                 two blocks deep, a word tokenizer) saved in a temporary folder, then the real `unlearn.py`
                 and `sample.py --compare --offload --vae-tiling` command lines on it at 49 frames, each
                 one's time and peak GPU memory (with --tiny: the same at the smallest size, on a CPU)
        --budget SECONDS: stop starting work when it runs out, and print what was skipped

The floor (a) is the student's forward and backward over exactly the latents and prompts
one unlearning step trains on (concept and preservation rows), with the same gradient
checkpointing. The step (b) is one full `unlearn.Unlearning.step`: drawing x_t, the
teacher pass with the concept masks, the student's forward and backward, the optimizer.
They are timed interleaved in one process, so that the machine's noise hits both alike.
No weights are needed: the model and the text embeddings are random.

Memory is activation memory: the peak while working, less what the process held once the
model and the prompts' embeddings were made (the weights). It is measured for one unlearning
step and for one guided denoising step of the same model (what sampling needs), each phase in
a fresh process: on a GPU torch.cuda.max_memory_allocated; on a CPU the peak resident set
(reset once the weights are made), with an allocator that returns freed tensors at once, so
that it follows the tensors alive as the GPU's figure does. On a GPU the whole peak (weights
included) is printed too: what the GPU must hold. The last line printed is
    step_cost_ratio=<(b)/(a)> x_t_share=<share of (b) making x_t> memory_ratio=<unlearning / sampling>
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import diffusers
import torch

import unlearn
from videos import Rate

COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, text_embed_dim=4096,
                    time_embed_dim=512, use_rotary_positional_embeddings=True, sample_height=60, sample_width=90,
                    sample_frames=49)
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960, text_dim=4096,
                in_channels=16, out_channels=16)
SIZES = {  # name: (family, transformer config); CogVideoX's sample size is the video size it resolves to
    "tiny": ("cogvideox", dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32,
                               time_embed_dim=32, sample_height=8, sample_width=8, sample_frames=9)),
    # run at 33 frames of 256x256: a long video sequence (9 latent frames of 16x16 tokens, 2,304 video
    # tokens) through the 2B's 30 blocks at a narrow width, so that activations, not weights, fill the
    # memory, as on a GPU at 49 frames
    "cpu": ("cogvideox", dict(num_attention_heads=4, attention_head_dim=64, num_layers=30, text_embed_dim=256,
                              time_embed_dim=128, sample_height=32, sample_width=32, sample_frames=33)),
    "2b": ("cogvideox", dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, text_embed_dim=4096,
                             time_embed_dim=512, sample_height=60, sample_width=90, sample_frames=49)),
    "5b": ("cogvideox", COGVIDEOX_5B),
    # CogVideoX 1.5: the 5B's width with a temporal patch; its config's sample size is its RoPE grid's bound
    "1.5": ("cogvideox", dict(COGVIDEOX_5B, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300,
                              sample_frames=81)),
    "wan-tiny": ("wan", dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=32, text_dim=32,
                             freq_dim=16, in_channels=4, out_channels=4)),
    # Wan and HunyuanVideo at the CPU size: CogVideoX's long sequence (33 frames at 256x256, 2,304 video
    # tokens) at 4x64 heads; Wan's 30 blocks, HunyuanVideo's 20 + 40 blocks cut to 6 + 12
    "wan-cpu": ("wan", dict(num_attention_heads=4, attention_head_dim=64, num_layers=30, ffn_dim=512, text_dim=256,
                            freq_dim=64)),
    "wan-1.3b": ("wan", WAN_1_3B),
    "hunyuan-tiny": ("hunyuan", dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2,
                                     num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16,
                                     rope_axes_dim=(4, 6, 6), in_channels=4, out_channels=4)),
    "hunyuan-cpu": ("hunyuan", dict(num_attention_heads=4, attention_head_dim=64, num_layers=6, num_single_layers=12,
                                    num_refiner_layers=1, text_embed_dim=256, pooled_projection_dim=64,
                                    rope_axes_dim=(16, 24, 24))),
    "hunyuan": ("hunyuan", {}),  # diffusers' defaults are HunyuanVideo's: 20 + 40 blocks, 24 x 128 heads
}
FAMILIES = {  # family: pipeline, transformer, its scheduler as shipped, the config key of its text width
    "cogvideox": ("CogVideoXPipeline", "CogVideoXTransformer3DModel", lambda cfg: diffusers.CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
        snr_shift_scale=1.0 if cfg.use_rotary_positional_embeddings else 3.0), "text_embed_dim"),
    "wan": ("WanPipeline", "WanTransformer3DModel", lambda cfg: diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0), "text_dim"),
    "hunyuan": ("HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel",
                lambda cfg: diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), "text_embed_dim"),
}
CPU_RUNS = {"cogvideox": ("cpu", 33, None), "wan": ("wan-cpu", 33, "256x256"),
            "hunyuan": ("hunyuan-cpu", 33, "256x256")}
TINY_RUNS = {"cogvideox": ("tiny", 0, None), "wan": ("wan-tiny", 9, "64x64"), "hunyuan": ("hunyuan-tiny", 9, "64x64")}
GPU_RUNS = [  # most needed first: those never measured, then the rest (0 frames: the model's default)
    ("1.5", 0, None), ("5b", 17, None), ("wan-1.3b", 33, "480x832"), ("2b", 17, None), ("2b", 49, None),
    ("5b", 49, None), ("hunyuan", 33, "544x960"), ("wan-1.3b", 81, "480x832")]
FAILED = []  # what failed, said at the end (the exit status is then 1)
WHOLE = {  # --whole: (transformer config, VAE config, T5 config, frames); the 2B's VAE is diffusers' default
    "2b": (SIZES["2b"][1], {}, dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=2), 49),
    "tiny": (dict(SIZES["tiny"][1], in_channels=4, out_channels=4),
             dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
             dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1), 9),
}


def random_pipeline(size, device, dtype):
    """A pipeline of random weights, with no text encoder and no VAE (not needed to train)."""
    family, config = SIZES[size]
    pipeline, transformer_class, scheduler, _ = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device(device):
        transformer = getattr(diffusers, transformer_class)(**config).to(dtype)
    parts = dict(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                 scheduler=scheduler(transformer.config))
    if family == "hunyuan":
        parts.update(tokenizer_2=None, text_encoder_2=None)
    return getattr(diffusers, pipeline)(**parts)


def random_embeds(pipe, size, prompts=2):
    """Random text inputs of the family's shapes (HunyuanVideo's: 40 tokens of its 256 read, the rest padding)."""
    g = torch.Generator().manual_seed(0)
    family = SIZES[size][0]
    cfg, dev, dtype, length = pipe.transformer.config, pipe.transformer.device, pipe.transformer.dtype, \
        unlearn.text_length(pipe)

    def make(n):
        inputs = dict(encoder_hidden_states=torch.randn(n, length, cfg[FAMILIES[family][3]], generator=g))
        if family == "hunyuan":
            inputs.update(encoder_attention_mask=(torch.arange(length) < 40).long().expand(n, -1),
                          pooled_projections=torch.randn(n, cfg.pooled_projection_dim, generator=g))
        return unlearn.Text(**{k: v.to(dev, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()})
    tokens = torch.zeros(prompts, length, device=dev)
    tokens[:, 4:6] = 1  # the concept's two tokens
    return dict(concept=make(prompts), anchor=make(prompts), preserve=make(prompts), empty=make(1)), tokens


def settings(pipe, frames, pixels, extra):
    args = unlearn.parse_args(["--concept", "bench", "--model", "random", "--xt-steps", "2", *extra]
                              + (["--num-frames", str(frames)] if frames else [])
                              + (["--height", pixels.split("x")[0], "--width", pixels.split("x")[1]] if pixels else []))
    unlearn.resolve_defaults(pipe, args)
    return args


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def current_memory(device):
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the kernel's peak resident set (VmHWM) starts again from now


def peak_memory(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(size, frames, pixels, device, phase, repeats, extra):
    """One phase in this process: 'time' (interleaved floor and step) or 'sample' (one guided denoising step)."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    pipe = random_pipeline(size, device, dtype)
    embeds, tokens = random_embeds(pipe, size)
    args = settings(pipe, frames, pixels, extra)
    shape = unlearn.video_shape(pipe, args.num_frames, args.height, args.width)
    size_info = {"frames": args.num_frames, "height": args.height, "width": args.width,
                 "video_tokens": math.prod(unlearn.token_grid(pipe.transformer, shape))}
    sync(device)
    weights = current_memory(device)
    reset_peak(device)
    if phase == "sample":  # one guided denoising step, as the pipeline does it
        noise = torch.randn(1, *shape, device=device, dtype=unlearn.family_of(pipe).latent_dtype(pipe.transformer))
        static = unlearn.model_inputs(pipe, shape, args.guidance)
        unlearn.sample_latents(pipe.transformer, unlearn.x_t_sampler(pipe, 2, device), noise, embeds["concept"][:1],
                               embeds["empty"], static, args.guidance, steps=1)
        sync(device)
        return dict(size_info, peak=peak_memory(device), weights=weights)

    r = unlearn.Unlearning(args, pipe, embeds, tokens, log=lambda *_: None)
    times, parts = {"floor": [], "step": []}, {}

    @contextlib.contextmanager
    def timer(name):
        sync(device)
        start = time.perf_counter()
        yield
        sync(device)
        parts.setdefault(name, []).append(time.perf_counter() - start)

    idx = torch.arange(args.batch_size)
    x_t, t = r.xt.draw(idx, torch.zeros_like(idx))  # latents like those a step trains on, made outside the floor's
    idx = idx.to(device)  # timing

    def floor():  # backpropagated as the step does: the concept's rows, then the preservation rows
        for embeds in (r.cond[idx], r.pre[idx]):
            unlearn.student_pass(r.transformer, r.state, x_t, t, embeds, r.static).float().pow(2).mean().backward()
        r.opt.zero_grad(set_to_none=True)

    for i in range(repeats + 1):  # the first round warms up and is not counted
        for name, work in (("floor", floor), ("step", lambda: r.step(timer))):
            sync(device)
            start = time.perf_counter()
            work()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - start)
        if i == 0:
            parts.clear()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return dict(size_info, floor=median(times["floor"]), step=median(times["step"]),
                parts={k: median(v) for k, v in parts.items()}, peak=peak_memory(device), weights=weights)


def whole_pipeline(folder, size, device):
    """Save to `folder` a CogVideoX pipeline of `size`'s real parts with random weights, and a word-level
    tokenizer that knows every word of the built-in prompts (the concept 'nudity' among them)."""
    from transformers import T5Config, T5EncoderModel

    import prompts
    import toy
    transformer_config, vae_config, t5_config, _ = WHOLE[size]
    texts = prompts.BUILT_IN["sentences"] + [c for cs in prompts.BUILT_IN["slots"].values() for c in cs] + [
        w for ws in prompts.BUILT_IN["synonyms"] for w in ws] + [w for ws in prompts.BUILT_IN["preserve"].values()
                                                                  for w in ws]
    words = {w for t in texts for w in re.findall(r"[A-Za-z']+", t)}
    tokenizer = toy.make_tokenizer(sorted(words | {w.capitalize() for w in words}))
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()  # not its note on casting a model built in fp32 with .to()
    with torch.device(device):
        transformer = diffusers.CogVideoXTransformer3DModel(**transformer_config).to(dtype)
        vae = diffusers.AutoencoderKLCogVideoX(**vae_config).to(dtype)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                                               dropout_rate=0.0, **t5_config)).to(dtype)
    pipe = diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                       scheduler=FAMILIES["cogvideox"][2](transformer.config))
    pipe.save_pretrained(folder)
    del pipe, transformer, vae, text_encoder
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def command(module, argv):
    """--cli: one of the project's command lines in this process; its time and peak memory as the last line."""
    asked = argv[argv.index("--device") + 1] if "--device" in argv else None
    device = "cuda" if (asked or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    reset_peak(device)
    start = time.perf_counter()
    importlib.import_module(module).main(argv)
    sync(device)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak_memory(device), "device": device}))


def timed_command(module, argv, deadline):
    """Run `python <module>.py ARGV` in a fresh process (through --cli); its time and peak memory, or None when
    it failed or the budget ran out first."""
    left = deadline - time.time()
    if left < 20:
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--cli", module, *argv]
    print(f"\n$ python {module}.py {shlex.join(argv)}", flush=True)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=None if left == float("inf") else left)
    except subprocess.TimeoutExpired:
        print("  stopped: out of --budget", flush=True)
        return None
    print("\n".join(line for line in out.stdout.splitlines()[:-1] if line.startswith("#") or "%" in line))
    if out.returncode:  # said, and the rest goes on: on a GPU lent for minutes, one failure must not cost all
        print(f"  FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
        FAILED.append(f"python {module}.py")
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {result['seconds']:.1f} s, peak {'GPU ' if result['device'] == 'cuda' else ''}memory "
          f"{result['peak'] / 2**30:.2f} GiB", flush=True)
    return result


def whole(size, device, deadline, skipped):
    """--whole: the real command lines on a pipeline of the real parts, random weights."""
    frames = str(WHOLE[size][3])
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        whole_pipeline(folder, size, device)
        print(f"\n--whole: CogVideoX {size} parts with random weights saved in {time.perf_counter() - start:.0f} s")
        where = ["--device", device]
        runs = [("unlearn", ["--model", folder, "--concept", "nudity", "--num-prompts", "4", "--xt-steps", "6",
                             "--steps", "10", "--num-frames", frames, "--output-dir", f"{folder}/eraser", *where]),
                ("sample", ["--model", folder, "--eraser", f"{folder}/eraser", "--prompt", "nudity on a sunny beach",
                            "--compare", "--offload", "--vae-tiling", "--num-frames", frames, "--steps", "2",
                            "--out", f"{folder}/compare.mp4", *where])]
        for module, argv in runs:
            if timed_command(module, argv, deadline) is None:
                skipped.append(f"--whole: python {module}.py (failed or budget)")
                return


def toy_tables(device, deadline, skipped):
    """--toy: the Quick start and the README's `sample.py --eval toy` on `device` (its default dtype, and fp32)
    and on the CPU; the erased model's tables side by side."""
    from safetensors.torch import load_file
    columns, erasers = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for dev, dtype in [(device, None), (device, "float32"), ("cpu", None)][:3 if device != "cpu" else 1]:
            name = f"{dev} {dtype or 'default dtype'}"
            flags = ["--device", dev] + (["--dtype", dtype] if dtype else [])
            eraser, out = f"{folder}/red_{len(columns)}", f"{folder}/eval_{len(columns)}"
            if (timed_command("unlearn", ["--model", "toy", "--concept", "red", "--output-dir", eraser, *flags],
                              deadline) is None
                    or timed_command("sample", ["--model", "toy", "--eraser", eraser, "--eval", "toy", "--steps", "20",
                                                "--seed", "11", "--out", out, *flags], deadline) is None):
                skipped.append(f"--toy on {name} (failed or budget)")
                continue
            with open(f"{out}/eval_toy.json") as f:
                columns[name] = {m: Rate(r["count"], r["of"]) for m, r in json.load(f)["results"]["erased"].items()}
            erasers[name] = load_file(f"{eraser}/eraser.safetensors")
    if len(erasers) > 1:  # the same draws everywhere: the erasers differ by the devices' arithmetic alone
        cpu = erasers.get("cpu default dtype")
        for name, weights in erasers.items():
            if cpu is not None and weights is not cpu:
                diff = max(float((weights[k] - cpu[k]).norm() / cpu[k].norm().clamp_min(1e-12)) for k in cpu)
                print(f"\n--toy: eraser trained on {name} against the CPU's: largest relative difference of a "
                      f"weight tensor {diff:.2e}")
    if columns:
        import toy
        print("\n--toy: the erased model's table (python unlearn.py --model toy --concept red; python sample.py "
              "--model toy --eraser erasers/red --eval toy --steps 20 --seed 11), by device and dtype")
        print(toy.format_table(columns))


def in_child(*argv, deadline=float("inf")):
    """Run one phase in a fresh process, so that its peak memory is its own; None if it fails or `deadline` comes
    first."""
    # glibc hands freed blocks of 64 KiB and more back at once: the resident set then follows the
    # tensors alive, as torch.cuda.max_memory_allocated does on a GPU, not what the allocator kept.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        out = subprocess.run([sys.executable, __file__, "--phase", *argv], capture_output=True, text=True, env=env,
                             timeout=None if deadline == float("inf") else max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        return None
    if out.returncode:
        print(f"the phase {' '.join(argv)} failed:\n{out.stderr[-3000:]}", flush=True)
        FAILED.append(" ".join(argv))
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label, timing, sampling, gpu):
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"\n{label}: {timing['frames']} frames at {timing['height']}x{timing['width']}, "
          f"{timing['video_tokens']} video tokens")
    print(f"  (a) floor: student forward + backward  {timing['floor']:8.3f} s")
    print(f"  (b) one unlearning step                {timing['step']:8.3f} s")
    for name, seconds in timing["parts"].items():
        print(f"        {name:<32} {seconds:8.3f} s  {100 * seconds / timing['step']:5.1f} %")
    learn, sample = timing["peak"] - timing["weights"], sampling["peak"] - sampling["weights"]
    print(f"  activation memory: unlearning {gib(learn)}, one guided sampling step {gib(sample)} "
          f"(held before: {gib(timing['weights'])}, weights and embeddings{'' if gpu else ' and libraries'})")
    if gpu:
        print(f"  peak GPU memory, weights included: unlearning {gib(timing['peak'])}, "
              f"sampling {gib(sampling['peak'])}")
    return (f"step_cost_ratio={timing['step'] / timing['floor']:.2f} "
            f"x_t_share={timing['parts'].get('x_t', 0) / timing['step']:.3f} "
            f"memory_ratio={learn / max(sample, 1):.2f}")


def main():
    if sys.argv[1:2] == ["--cli"]:  # a child of --whole or --toy: python bench.py --cli MODULE ARGV...
        return command(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="on cuda: CogVideoX-2B (17, 49 frames), 5B (17, 49), 1.5, "
                                                      "Wan 2.1 1.3B (33, 81 frames at 480x832), HunyuanVideo "
                                                      "(33 frames at 544x960)")
    p.add_argument("--family", choices=list(FAMILIES), default="cogvideox", help="the family for the CPU and "
                                                                                  "tiny sizes (default cogvideox)")
    p.add_argument("--tiny", action="store_true", help="the smallest size (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of (a) and (b) (default 3; 1 on a GPU)")
    p.add_argument("--toy", action="store_true", help="the toy's Quick start and --eval toy on this device and the CPU")
    p.add_argument("--whole", action="store_true", help="unlearn.py and sample.py on CogVideoX-2B's real parts, "
                                                        "random weights (with --tiny: the smallest size)")
    p.add_argument("--budget", type=float, default=None, help="seconds: start no work after them (default none)")
    p.add_argument("--phase", nargs=5, metavar=("SIZE", "FRAMES", "PIXELS", "DEVICE", "PHASE"), help=argparse.SUPPRESS)
    args, extra = p.parse_known_args()  # anything else goes to unlearn.py's settings, e.g. --xt sample
    repeats = args.repeats or (1 if args.gpu else 3)
    if args.phase:
        size, frames, pixels, device, phase = args.phase
        print(json.dumps(measure(size, int(frames), None if pixels == "-" else pixels, device, phase, repeats, extra)))
        return
    if args.gpu:
        if not torch.cuda.is_available():
            print("error: --gpu needs a CUDA GPU; run python bench.py for the CPU benchmark", file=sys.stderr)
            sys.exit(2)
        runs = GPU_RUNS
    else:
        runs = [(TINY_RUNS if args.tiny else CPU_RUNS)[args.family]]
    device = "cuda" if args.gpu else "cpu"
    deadline, skipped = time.time() + (args.budget or float("inf")), []
    if args.toy:
        toy_tables(device, deadline, skipped)
    if args.whole:
        whole("tiny" if args.tiny else "2b", device, deadline, skipped)
    if args.toy or args.whole:
        runs = runs if args.gpu else []  # on a CPU, --toy and --whole are the whole job
    line = ""
    for size, frames, pixels in runs:
        where = (size, str(frames), pixels or "-")
        if deadline - time.time() < 60:
            skipped.append(f"{size} at {frames or 'default'} frames {pixels or ''} (budget)")
            continue
        timing = in_child(*where, device, "time", "--repeats", str(repeats), *extra, deadline=deadline)
        sampling = timing and in_child(*where, device, "sample", *extra, deadline=deadline)
        if sampling is None:
            skipped.append(f"{size} at {frames or 'default'} frames {pixels or ''} (failed or budget)")
            continue
        line = report(f"{size} model on {device} {' '.join(extra)}".strip(), timing, sampling, args.gpu)
        print(f"  {line}", flush=True)
    if skipped:
        print("\nnot measured: " + "; ".join(skipped))
    if line:
        print(line)
    if FAILED:
        sys.exit(f"failed: {'; '.join(FAILED)}")


if __name__ == "__main__":
    main()
