"""attack.py: how robust is an eraser? A white-box attack that tries to make the erased model draw the
erased concept again, with every weight in hand.

    python attack.py --model toy --eraser erasers/red                   # about a minute on a CPU
    python attack.py --model toy --negative-prompt red --concept red    # the baseline: a negative prompt, no eraser
    python attack.py --model THUDM/CogVideoX-2b --eraser erasers/nudity --eval nudity

What it does, in the order it runs:
  1. Load the attacked pipeline: the erased one, or the original one for the negative-prompt baseline;
     freeze every weight
  2. Attack prompts that name the concept (--prompt, else drawn as unlearn.py draws them); in each,
     --tokens placeholders take the concept's place
  3. Targets: videos of the concept as the original model draws them (latents), made once
  4. Continuous attack: a vector per placeholder in each text encoder's input-embedding space, read
     where the placeholder stands, trained with the attacked model's own denoising loss on the targets
     (AdamW; the text encoders and the transformer stay frozen, the gradient goes through both)
  5. Discrete attack: each vector's nearest vocabulary token, never one of the concept's words nor a
     word unlearn.py erased with (its synonyms): a prompt anyone could type
  6. Videos on seeds the attack never used, for the plain prompts and both attacks, on the attacked
     model; the judge's reading (--eval toy or nudity); index.json, attack.json, the vectors
     (embeddings.safetensors), and as the last three lines, for plain, continuous and discrete, the
     videos of the --num-videos that show the concept: 'k/n share [95 % interval over videos]'.

A negative prompt acts only while sampling: the attack's loss reads the network's conditional
prediction (with its erasers, if any), and the videos are sampled with the negative prompt in place.

Replay a saved attack on a pipeline (its vectors, read where its placeholders stand):

    from attack import load_attack, placeholders
    vectors, meta = load_attack("outputs/attack_red")
    with placeholders(pipe, vectors):
        video = pipe(meta["continuous_prompts"][0]).frames[0]
"""

import argparse
import contextlib
import copy
import json
import os
import random
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import toy
from families import family_of
from prompts import concept_pattern, concept_templates, concept_words, fill, load_grammar, names_any, substitute
from runs import UserError, run_cli, write_atomic
from sample import load_eraser, load_pipeline, make_judge
from unlearn import (TRAIN_FRAMES, encode_prompts, model_folder, model_inputs, sample_latents, set_erasers, velocity,
                     video_shape, video_size, x_t_sampler)
from videos import Rate, generate, save_video, side_by_side

PLACEHOLDER = "<attack-{}>"  # added to a copy of each tokenizer while an attack is read; never a real word


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to attack")
    g.add_argument("--model", default="THUDM/CogVideoX-2b", help="hub id, folder or 'toy' (default THUDM/CogVideoX-2b)")
    g.add_argument("--eraser", default=None, help="the eraser to attack: a folder made by unlearn.py, or the authors'")
    g.add_argument("--concept", default=None, help="the concept to bring back (default: the eraser's)")
    g.add_argument("--negative-prompt", default=None,
                   help="sample every video with this negative prompt (the baseline: --negative-prompt C --concept C)")
    g = p.add_argument_group("the attack")
    g.add_argument("--prompt", action="append", default=None,
                   help="an attack prompt naming the concept (repeatable; default --num-prompts drawn as unlearn.py "
                        "draws its prompts)")
    g.add_argument("--num-prompts", type=int, default=4, help="attack prompts drawn when no --prompt (default 4)")
    g.add_argument("--tokens", type=int, default=1, help="learned tokens in the concept's place (default 1)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps of the continuous attack (default 200)")
    g.add_argument("--lr", type=float, default=0.1,
                   help="AdamW learning rate, a fraction of the embedding table's RMS (default 0.1)")
    g.add_argument("--batch-size", type=int, default=4, help="targets per step, and videos per batch (default 4)")
    g.add_argument("--targets", type=int, default=2, help="target videos per attack prompt (default 2)")
    g = p.add_argument_group("videos")
    g.add_argument("--num-videos", type=int, default=24, help="videos per attack and for the plain prompts (default 24)")
    g.add_argument("--sample-steps", type=int, default=50, help="sampling steps of targets and videos (default 50)")
    g.add_argument("--eval", default=None,
                   help="'toy' (the toy judge; the default for --model toy) or 'nudity' (NudeNet, as the paper)")
    g.add_argument("--out", default=None, help="folder for this run alone (default outputs/attack_<concept>)")
    g.add_argument("--seed", type=int, default=0,
                   help="the attack's seed (targets and training); the videos use seed+1, seed+2, ... (default 0)")
    g.add_argument("--num-frames", type=int, default=None,
                   help=f"video frames (default {TRAIN_FRAMES}, or fewer if the model makes fewer: unlearn.py's)")
    g.add_argument("--height", type=int, default=None, help="video height in px (default: the model's own)")
    g.add_argument("--width", type=int, default=None, help="video width in px (default: the model's own)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default the pipeline's)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="the model's dtype (default bfloat16 on a GPU, float32 on a CPU); the vectors train in float32")
    g.add_argument("--vae-tiling", action="store_true",
                   help="decode videos tile by tile: less GPU memory at 480x720 and up")
    return p


def parse_args(argv=None):
    """The settings, every one checked before the model loads; the concept from the eraser's json if not given."""
    args = build_parser().parse_args(argv)
    for name in ("tokens", "steps", "batch_size", "num_prompts", "targets", "num_videos", "sample_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be > 0")
    if not args.eraser and not args.negative_prompt:
        raise UserError("attack.py needs --eraser DIR, the erased model to attack (or, for the negative-prompt "
                        "baseline, --negative-prompt C --concept C)")
    meta = load_eraser(args.eraser)[1] if args.eraser else {}  # a missing or damaged eraser: one line
    if not args.concept and len(meta.get("concepts") or []) > 1:
        raise UserError(f"the eraser erases {meta['concept']}: pass --concept, the one to attack")
    args.concept = (args.concept or meta.get("concept") or "").strip()
    if not args.concept:
        raise UserError("no concept to attack: the eraser names none; pass --concept")
    if args.eval is None and args.model == "toy":
        args.eval = "toy"
    if args.eval not in (None, "toy", "nudity"):
        raise UserError(f"--eval {args.eval}: unknown; use --eval toy or --eval nudity")
    if args.eval == "toy" and not toy.colours_named(args.concept):
        raise UserError(f"--eval toy reads colours; '{args.concept}' names none of {', '.join(toy.PALETTE)}")
    for prompt in args.prompt or []:
        if not concept_pattern(args.concept).search(prompt):
            raise UserError(f"--prompt {prompt!r} does not name '{args.concept}': the attack's tokens take its place")
    args.out = args.out or os.path.join("outputs", "attack_" + re.sub(r"\W+", "_", args.concept.lower()))
    if os.path.exists(args.out) and os.listdir(args.out):
        raise UserError(f"--out {args.out} already holds files; choose another (a run writes only its own videos)")
    return args


# -----------------------------------------------------------------------------
# 1. The attacked pipeline, every weight frozen

def freeze(pipe):
    """Nothing of the pipeline trains (nor gets a .grad): the attack's vectors are its only parameters."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


def tokenizer_of(encoder_name):
    return encoder_name.replace("text_encoder", "tokenizer")  # text_encoder_2 reads tokenizer_2


# -----------------------------------------------------------------------------
# 2. Attack prompts, and the placeholders in the concept's place

def attack_prompts(args, rng):
    """The plain prompts, each naming the concept: --prompt, else drawn from the model's prompt grammar."""
    if args.prompt:
        return list(args.prompt)
    grammar = load_grammar(model_folder(args.model))
    return [fill(t, args.concept) for t in concept_templates(grammar, rng, args.num_prompts, args.concept)]


def with_words(prompts, concept, words):
    """Each prompt with `words` in the concept's place."""
    return [substitute(p, concept, words) for p in prompts]


@contextlib.contextmanager
def placeholders(pipe, vectors):
    """While open, the pipeline reads placeholder i of a prompt ('<attack-i>', yielded joined by spaces) as
    vectors[name][i] in text encoder `name`'s input-embedding space, gradients flowing to the vectors.

    Each tokenizer is swapped for a copy that knows the placeholders as added tokens; each text encoder
    gets them as an ordinary id (0) and then, where they stand, the vector in place of that id's
    embedding (every embedding module that shares the input table: T5's are two). Everything else is the
    pipeline's own encoding: its prompt cleaning, chat template, cropping and pooling. Undone on exit.
    """
    k = len(next(iter(vectors.values())))
    words = [PLACEHOLDER.format(i) for i in range(k)]
    saved, hooks = {}, []
    try:
        for name in family_of(pipe).text_encoders:
            tokenizer = copy.deepcopy(getattr(pipe, tokenizer_of(name)))
            tokenizer.add_tokens(words)
            ids = tokenizer.convert_tokens_to_ids(words)
            saved[tokenizer_of(name)] = getattr(pipe, tokenizer_of(name))
            setattr(pipe, tokenizer_of(name), tokenizer)
            hooks += _inject(getattr(pipe, name), ids[0], vectors[name])
        yield " ".join(words)
    finally:
        for hook in hooks:
            hook.remove()
        for name, tokenizer in saved.items():
            setattr(pipe, name, tokenizer)


def _inject(encoder, first_id, vectors):
    """Hooks on `encoder` that read ids first_id ... first_id + len(vectors) - 1 as `vectors`."""
    where = {}
    table = encoder.get_input_embeddings().weight

    def take_ids(module, args, kwargs):  # the ids, as the encoder is called (positionally or by name)
        ids = args[0] if args else kwargs["input_ids"]
        found = (ids >= first_id) & (ids < first_id + len(vectors))
        where.update(found=found, index=(ids - first_id).clamp(0, len(vectors) - 1))
        ids = ids.masked_fill(found, 0)  # a real id (CLIP pools at its largest id: never a placeholder's)
        return ((ids, *args[1:]), kwargs) if args else (args, {**kwargs, "input_ids": ids})

    def put_vectors(module, args, out):
        if "found" not in where or out.shape[:2] != where["found"].shape:
            return out
        return torch.where(where["found"][..., None], vectors[where["index"]].to(out.dtype), out)

    hooks = [encoder.register_forward_pre_hook(take_ids, with_kwargs=True)]
    hooks += [m.register_forward_hook(put_vectors) for m in encoder.modules()
              if isinstance(m, torch.nn.Embedding) and m.weight is table]
    return hooks


# -----------------------------------------------------------------------------
# 3. Targets: the original model's videos of the concept, made once

@torch.no_grad()
def make_targets(pipe, prompts, per_prompt, shape, steps, guidance, gen, batch):
    """(N, *latent shape) float32 clean latents, the original model's (erasers off, no negative prompt)
    videos of each prompt, `per_prompt` each, sampled as the pipeline samples; and each one's prompt index."""
    transformer, device = pipe.transformer, pipe.transformer.device
    erased = pipe.eraser_meta is not None
    if erased:
        set_erasers(transformer, False)
    sampler, static = x_t_sampler(pipe, steps, device), model_inputs(pipe, shape, guidance)
    uncond = encode_prompts(pipe, [""]).to(device)
    rows = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    latents = []
    for chunk in tqdm(rows.split(batch), desc="targets"):
        cond = encode_prompts(pipe, [prompts[i] for i in chunk]).to(device)
        noise = torch.randn((len(chunk), *shape), generator=gen).to(device, family_of(pipe).latent_dtype(transformer))
        latents.append(sample_latents(transformer, sampler, noise, cond, uncond, static, guidance)[-1].float())
    if erased:
        set_erasers(transformer, True)
    return torch.cat(latents), rows


# -----------------------------------------------------------------------------
# 4. The continuous attack

def allowed_tokens(tokenizer, rows, banned):
    """Vocabulary ids a discrete prompt may use: ids the embedding table has a row for, no special token, none
    without a letter or digit, none that holds a banned word (in any case, inside a longer word too; each
    word of a banned phrase)."""
    words = {w.lower() for phrase in banned for w in (phrase.split() if " " in phrase else [phrase]) if len(w) > 2}
    special = set(tokenizer.all_special_ids)
    texts = [t.lower() for t in tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), rows))])]
    return torch.tensor([i for i, t in enumerate(texts)
                         if i not in special and re.search(r"\w", t) and not any(w in t for w in words)])


def initial_vectors(pipe, k, banned, gen):
    """Each encoder's k starting vectors: the input embeddings of k random allowed tokens (never the concept)."""
    vectors = {}
    for name in family_of(pipe).text_encoders:
        table = getattr(pipe, name).get_input_embeddings().weight
        allowed = allowed_tokens(getattr(pipe, tokenizer_of(name)), len(table), banned)
        pick = allowed[torch.randint(0, len(allowed), (k,), generator=gen)]
        vectors[name] = torch.nn.Parameter(table[pick.to(table.device)].detach().float().clone())
    return vectors


def continuous_attack(pipe, prompts, targets, rows, shape, args, gen, vectors):
    """Train `vectors` with the attacked model's denoising loss: per step, a batch of targets noised to random
    steps of the sampler, || v(x_t, prompt with the vectors) - v_true ||^2. Returns the loss per step."""
    family, transformer = family_of(pipe), pipe.transformer
    device = transformer.device
    sampler, static = x_t_sampler(pipe, args.sample_steps, device), model_inputs(pipe, shape, args.guidance)
    rms = {name: float(getattr(pipe, name).get_input_embeddings().weight.float().pow(2).mean().sqrt())
           for name in vectors}  # each table's scale: the same --lr moves any model's vectors alike
    opt = torch.optim.AdamW([{"params": [v], "lr": args.lr * rms[n]} for n, v in vectors.items()], weight_decay=0.0)
    transformer.enable_gradient_checkpointing()
    history = []
    try:
        with placeholders(pipe, vectors) as words:
            typed = with_words(prompts, args.concept, words)
            bar = tqdm(range(args.steps), desc="continuous attack")
            for step in bar:
                idx = torch.randint(0, len(targets), (args.batch_size,), generator=gen)
                k = torch.randint(0, len(sampler.timesteps), (len(idx),), generator=gen)
                x0 = targets[idx].to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                x_t, t, v_true = family.noised(sampler, x0, noise, k.to(device))
                text = family.encode(pipe, [typed[i] for i in rows[idx]], device)
                v = velocity(transformer, x_t.to(transformer.dtype), t, text, static)
                loss = F.mse_loss(v.float(), v_true)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(loss.item())  # a GPU-CPU sync, once a step
                if not np.isfinite(history[-1]):
                    raise UserError(f"the attack's loss is {history[-1]} at step {step}; lower --lr")
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        transformer.disable_gradient_checkpointing()
    return history


# -----------------------------------------------------------------------------
# 5. The discrete attack: the nearest words anyone could type

def nearest_tokens(vectors, table, allowed, tokenizer, prompts, concept, banned):
    """(ids, phrase): each vector's nearest allowed token by cosine similarity, decoded to text. Should the
    phrase, put in the concept's place, still make a prompt name a banned word (pieces that join into one),
    the position that loses least takes its next nearest token, until none does."""
    sims = F.normalize(vectors.detach().float(), dim=-1) @ F.normalize(table[allowed].detach().float(), dim=-1).T
    ranked, order = sims.sort(dim=1, descending=True)  # (K, allowed)
    pick = [0] * len(vectors)
    for _ in range(sims.shape[1] * len(vectors)):
        ids = [int(allowed[order[j, pick[j]]]) for j in range(len(vectors))]
        phrase = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if phrase and not any(names_any(p, banned) for p in with_words(prompts, concept, phrase)):
            return ids, phrase
        open_positions = [j for j in range(len(vectors)) if pick[j] + 1 < sims.shape[1]]
        if not open_positions:
            break
        j = max(open_positions, key=lambda j: float(ranked[j, pick[j] + 1]))
        pick[j] += 1
    raise UserError(f"no token of the vocabulary makes a prompt that leaves '{concept}' unnamed")


# -----------------------------------------------------------------------------
# 6. Videos on new seeds, judged

def save_attack(out, vectors, meta):
    from safetensors.torch import save_file
    weights = {name: v.detach().float().cpu().contiguous() for name, v in vectors.items()}
    write_atomic(os.path.join(out, "embeddings.safetensors"), lambda p: save_file(weights, p))
    with open(os.path.join(out, "attack.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def load_attack(folder):
    """(vectors, meta) of a saved attack: its learned vectors by text encoder, and its attack.json."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "attack.json")) as f:
        meta = json.load(f)
    return load_file(os.path.join(folder, "embeddings.safetensors")), meta


def main(argv=None):
    args = parse_args(argv)
    started, rng = time.time(), random.Random(args.seed)

    # 1. The attacked pipeline, every weight frozen; the judge first (a missing NudeNet is said before any work)
    judge = make_judge(args.eval, args.concept)
    pipe = load_pipeline(args.model, args.eraser, args.device, args.dtype, vae_tiling=args.vae_tiling)
    freeze(pipe)
    family = family_of(pipe)
    args.guidance = family.default_guidance if args.guidance is None else args.guidance
    frames, height, width = video_size(pipe, args.num_frames, args.height, args.width, TRAIN_FRAMES)
    shape = video_shape(pipe, frames, height, width)
    attacked = f"the eraser {args.eraser}" if args.eraser else "the original model"
    print(f"# 1. Attacking {attacked} on {args.model} for '{args.concept}'"
          + (f", every video with the negative prompt '{args.negative_prompt}'" if args.negative_prompt else ""))

    # 2. Attack prompts; what a discrete attack may never say
    prompts = attack_prompts(args, rng)
    banned = list(dict.fromkeys(concept_words(load_grammar(model_folder(args.model)), args.concept)))
    print(f"# 2. {len(prompts)} attack prompts, e.g. {prompts[0]!r}; never typed: {', '.join(banned)}")

    # 3. Targets, made once
    gen = torch.Generator().manual_seed(args.seed)  # every draw on the CPU, then moved: one run on any device
    torch.manual_seed(args.seed)
    targets, rows = make_targets(pipe, prompts, args.targets, shape, args.sample_steps, args.guidance, gen,
                                 args.batch_size)
    print(f"# 3. {len(targets)} target videos of '{args.concept}' by the original model")

    # 4. Continuous attack
    vectors = initial_vectors(pipe, args.tokens, banned, gen)
    history = continuous_attack(pipe, prompts, targets, rows, shape, args, gen, vectors)
    del targets
    print(f"# 4. Continuous attack: {args.tokens} vector{'s' * (args.tokens > 1)} per text encoder, "
          f"loss {history[0]:.4f} -> "
          f"{np.mean(history[-10:]):.4f} (mean of the last 10 steps)")

    # 5. Discrete attack
    first = family.text_encoders[0]
    table = getattr(pipe, first).get_input_embeddings().weight
    ids, phrase = nearest_tokens(vectors[first], table, allowed_tokens(pipe.tokenizer, len(table), banned),
                                 pipe.tokenizer, prompts, args.concept, banned)
    print(f"# 5. Discrete attack: '{phrase}' in the concept's place, e.g. "
          f"{with_words(prompts, args.concept, phrase)[0]!r}")

    # 6. Videos on seeds the attack never used, judged
    seeds = [args.seed + 1 + i for i in range(args.num_videos)]
    cycle = [i % len(prompts) for i in range(args.num_videos)]
    kinds = {"plain": prompts, "continuous": None, "discrete": with_words(prompts, args.concept, phrase)}
    call = dict(num_frames=frames, height=height, width=width, guidance_scale=args.guidance,
                **family.negative_prompt(args.negative_prompt))
    os.makedirs(args.out, exist_ok=True)
    n = min(4, args.num_videos)  # the first seeds' videos are kept for compare.gif; the rest leave memory when saved
    index, kept, rates = [], {}, {}
    for kind, typed in kinds.items():
        shows, b = [], args.batch_size
        with placeholders(pipe, vectors) if kind == "continuous" else contextlib.nullcontext() as words:
            typed = typed or with_words(prompts, args.concept, words)
            asked = [typed[i] for i in cycle]
            for start in tqdm(range(0, len(asked), b), desc=f"videos: {kind}"):
                made = generate(pipe, asked[start:start + b], steps=args.sample_steps, seeds=seeds[start:start + b],
                                batch=b, **call)
                for i, video in enumerate(made, start):
                    path = save_video(video, os.path.join(args.out, kind, f"{i:04d}.mp4"))
                    said = judge(prompts[cycle[i]], video) if judge else {"shows_concept": None}
                    index.append({"attack": kind, "video": os.path.relpath(path, args.out), "prompt": asked[i],
                                  "seed": seeds[i], "negative_prompt": args.negative_prompt,
                                  "embeddings": "embeddings.safetensors" if kind == "continuous" else None, **said})
                    shows.append(said["shows_concept"])
                kept.setdefault(kind, []).extend(made[:max(0, n - start)])
        rates[kind] = Rate(sum(shows), len(shows)) if judge else None
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    # the first seeds, plain | continuous | discrete, a row each
    save_video(np.concatenate([side_by_side([kept[k][i] for k in kinds], list(kinds)) for i in range(n)], axis=1),
               os.path.join(args.out, "compare.gif"))
    save_attack(args.out, vectors, dict(
        vars(args), banned=banned, prompts=prompts, attack_seed=args.seed, video_seeds=seeds,
        continuous_prompts=with_words(prompts, args.concept, " ".join(PLACEHOLDER.format(i) for i in range(args.tokens))),
        discrete_ids=ids, discrete_phrase=phrase, discrete_prompts=kinds["discrete"], targets=len(rows),
        loss_first=history[0], loss_last10=float(np.mean(history[-10:])),
        rates={k: None if r is None else r.as_dict() for k, r in rates.items()},
        seconds=round(time.time() - started, 1)))
    print(f"# 6. Wrote {len(index)} videos, index.json, attack.json, embeddings.safetensors and compare.gif "
          f"to {args.out} ({time.time() - started:.0f} s)")
    for kind in kinds:  # videos showing the concept: k/n, the share, its 95 % interval over videos
        print(f"{kind:<11} {'not judged (no --eval)' if rates[kind] is None else rates[kind]}")
    return rates


if __name__ == "__main__":
    run_cli(main)
