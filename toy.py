"""toy.py: a tiny CogVideoX that draws coloured squares, trained on a CPU.

    python toy.py            # rebuild toy/ from nothing (about 25 minutes on 2 CPU cores)
    python toy.py --check    # load the committed toy/ and print its quality table

The toy world lets anyone watch concept erasure work without a GPU. A video is 9 frames
of 64x64 px on a black background with one or two solid 16x16 squares, each in one colour
of a fixed palette and moving 16 px in one of four directions. The model is a complete
diffusers `CogVideoXPipeline` (real T5 encoder, tokenizer, CogVideoX VAE, transformer and
the CogVideoX-2B scheduler), only tiny. `describe(video)` is the judge: it reads a video's
pixels and says which squares it shows.
"""

import argparse
import json
import math
import os
import random
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prompts import GRAMMAR_FILE
from unlearn import TOY as TOY_DIR, load_base_pipeline
from videos import Rate, generate

# -----------------------------------------------------------------------------
# 1. The world: squares of six colours moving in four directions

FRAMES, SIZE, SQUARE, TRAVEL = 9, 64, 16, 16  # frames, frame side (px), square side (px), distance moved (px)
PALETTE = {  # exact RGB of each colour
    "red": (255, 0, 0), "orange": (255, 128, 0), "yellow": (255, 255, 0),
    "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255),
}
SYNONYMS = {  # every word the model draws as each colour
    "red": ("red", "crimson", "scarlet"), "orange": ("orange", "amber"), "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"), "blue": ("blue", "azure", "navy"), "white": ("white", "ivory"),
}
WORD_TO_COLOUR = {w: c for c, words in SYNONYMS.items() for w in words}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SQUARES_PER_SCENE = (1, 1, 1, 2, 2)  # a random scene draws its number of squares from these: two in five have two


def colours_named(text):
    """The palette colours that words of `text` name, in any case: 'Crimson, or navy' -> {'red', 'blue'}."""
    return {WORD_TO_COLOUR[w] for w in re.findall(r"[a-z]+", text.lower()) if w in WORD_TO_COLOUR}


def random_scene(rng, num_squares=None, colours=None, directions=None):
    """A scene: a list of {colour, direction, x, y} (top-left corner at frame 0), squares never overlapping.

    Colours and directions are random unless given (one per square).
    """
    n = len(colours) if colours else num_squares or rng.choice(SQUARES_PER_SCENE)
    colours = colours or rng.sample(sorted(PALETTE), n)
    while True:
        squares = []
        for i, colour in enumerate(colours):
            direction = directions[i] if directions else rng.choice(sorted(DIRECTIONS))
            dx, dy = DIRECTIONS[direction]
            lo_x, hi_x = max(0, -dx * TRAVEL), SIZE - SQUARE - max(0, dx * TRAVEL)
            lo_y, hi_y = max(0, -dy * TRAVEL), SIZE - SQUARE - max(0, dy * TRAVEL)
            squares.append(dict(colour=colour, direction=direction,
                                x=rng.randint(lo_x, hi_x), y=rng.randint(lo_y, hi_y)))
        if n == 1 or not _overlap(*squares):
            return squares


def _path(sq):
    dx, dy = DIRECTIONS[sq["direction"]]
    return [(sq["x"] + round(dx * TRAVEL * f / (FRAMES - 1)), sq["y"] + round(dy * TRAVEL * f / (FRAMES - 1)))
            for f in range(FRAMES)]


def _overlap(a, b, margin=2):
    return any(abs(xa - xb) < SQUARE + margin and abs(ya - yb) < SQUARE + margin
               for (xa, ya), (xb, yb) in zip(_path(a), _path(b)))


def render(scene):
    """Draw a scene as a video: float32 array (F, H, W, 3) in [0, 1]."""
    video = np.zeros((FRAMES, SIZE, SIZE, 3), dtype=np.float32)
    for sq in scene:
        rgb = np.array(PALETTE[sq["colour"]], dtype=np.float32) / 255
        for f, (x, y) in enumerate(_path(sq)):
            video[f, y:y + SQUARE, x:x + SQUARE] = rgb
    return video


# -----------------------------------------------------------------------------
# 2. The language: many phrasings of one scene; some kept out of training

OBJECTS = ("square", "box", "block", "tile")
VERBS = ("moving", "moves", "sliding", "slides", "drifting", "drifts", "gliding", "glides", "going")
ADVERBS = ("slowly", "quickly")
ADJECTIVES = ("small", "bright")
PREFIXES = ("a video of", "the video of", "a clip of", "the clip of", "video of", "clip of", "one video of")
FUNCTION_WORDS = ("a", "an", "the", "and", "of", "one", "to", "toward", "towards", "video", "clip")
VOCABULARY = sorted(set(WORD_TO_COLOUR) | set(OBJECTS) | set(DIRECTIONS) | set(VERBS) | set(ADVERBS)
                    | set(ADJECTIVES) | set(FUNCTION_WORDS))
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def make_tokenizer(words=VOCABULARY):
    """A word-level T5 tokenizer: one piece per word, so that a word it does not know is <unk>."""
    from transformers import T5Tokenizer
    pieces = [(t, 0.0) for t in SPECIAL_TOKENS] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def speaks_toy(tokenizer):
    """Whether a tokenizer knows the toy's words and no others: then its pipeline is a toy (any `--out`)."""
    return {w.lstrip("\u2581") for w in tokenizer.get_vocab()} - set(SPECIAL_TOKENS) == set(VOCABULARY)


def direction_phrases(d):
    """The ways a prompt says a direction, as often as a random choice among them should say each."""
    return [d] if d in ("up", "down") else [d, d, f"to the {d}", f"toward the {d}", f"towards the {d}"]


def _direction_phrase(rng, d):
    return d if d in ("up", "down") else rng.choice(direction_phrases(d))  # no draw for one way: the build's stream


def _article(rng, next_word):
    art = rng.choice(["a", "the", "one"])
    return "an" if art == "a" and next_word[0] in "aeiou" else art


def clause(rng, word, direction, held_out=False):
    """Words for one square. `word` (a colour word) or `direction` may be None: left unsaid.

    Training phrasings put adjective and adverb before what they modify. Held-out phrasings,
    never seen in training or unlearning, put the adverb last, the adjective after the
    colour, or the verb first: the tests and the quality table use only those.
    """
    adj = rng.choice(ADJECTIVES)
    noun = " ".join(w for w in [word, rng.choice(OBJECTS)] if w)
    if held_out:
        form = rng.choice(["adverb_last", "adjective_after", "verb_first"] if direction else ["adjective_after"])
        if form == "adjective_after" and word:
            noun = f"{word} {adj} {noun.split()[-1]}"
        noun = f"{_article(rng, noun)} {noun}"
        if not direction:
            return noun
        motion = f"{rng.choice(VERBS)} {_direction_phrase(rng, direction)}"
        if form == "verb_first":
            return f"{rng.choice(ADVERBS)} {motion} {noun}"
        return f"{noun} {motion} {rng.choice(ADVERBS)}"
    noun = f"{adj} {noun}" if rng.random() < 0.3 else noun
    noun = f"{_article(rng, noun)} {noun}"
    if not direction:
        return noun
    adverb = f"{rng.choice(ADVERBS)} " if rng.random() < 0.3 else ""
    return f"{noun} {adverb}{rng.choice(VERBS)} {_direction_phrase(rng, direction)}"


def make_prompt(rng, scene, held_out=False, drop=0.0, words=None):
    """A prompt for a scene; each square's colour or direction is left unsaid with probability `drop`.

    `words` fixes the colour word of each square; by default a random synonym of its colour.
    """
    parts = []
    for i, sq in enumerate(scene):
        word = words[i] if words else rng.choice(SYNONYMS[sq["colour"]])
        word = None if rng.random() < drop else word
        direction = None if rng.random() < drop else sq["direction"]
        parts.append(clause(rng, word, direction, held_out))
    prompt = " and ".join(parts)
    if rng.random() < 0.3:
        prompt = f"{rng.choice(PREFIXES)} {prompt}"
    return prompt


def prompt_grammar():
    """The toy's language as unlearn.py's prompt grammar (prompts.py), saved beside the model as prompts.json.

    Training-style phrasings of one or two squares with the concept in one square's colour. The
    other square's colour word never names the concept's colour (a synonym group): in "a red square
    and a crimson box" the anchor and the preservation prompt would still ask for red. What is kept
    in the concept's place: every word of the other colours.
    """
    clause = "{article} {adjective} %s {object} {adverb} {verb} {direction}"
    return {
        "about": "written by toy.py (prompt_grammar): the toy's prompts for unlearn.py's step 2",
        "sentences": ["{square}"] * 3 + ["{square} and {other}", "{other} and {square}"],  # as SQUARES_PER_SCENE
        "slots": {
            "square": [clause % "{concept}"], "other": [clause % "{colour}"],
            "colour": [list(words) for words in SYNONYMS.values()],  # a colour, then one of its words
            "article": ["a", "the", "one"], "object": list(OBJECTS), "verb": list(VERBS),
            "adjective": [""] * 7 + [list(ADJECTIVES)] * 3, "adverb": [""] * 7 + [list(ADVERBS)] * 3,  # 3 in 10
            "direction": [direction_phrases(d) for d in sorted(DIRECTIONS)]},
        "synonyms": [list(words) for words in SYNONYMS.values()],
        "preserve": {"": [w for words in SYNONYMS.values() for w in words]},
    }


def save_prompt_grammar(folder):
    text = json.dumps(prompt_grammar(), indent=1)  # then each list of words on one line
    item = r'(?:"[^"]*"|\[[^][]*\])'  # a string, or a list of them once it is on one line
    for pattern in (r'\[\s+("[^"]*"(?:,\s+"[^"]*")*)\s+\]', rf'\[\s+({item}(?:,\s+{item})*)\s+\]'):
        text = re.sub(pattern, lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    with open(os.path.join(folder, GRAMMAR_FILE), "w", encoding="utf-8") as f:
        f.write(text + "\n")


# -----------------------------------------------------------------------------
# 3. The judge: which squares a video shows

def _to_frames(video):
    """Accept (F, H, W, 3) arrays in [0, 1] or uint8, (F, 3, H, W) tensors, or a list of PIL images."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(im) for im in video])
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().numpy()
        if video.shape[1] == 3 and video.shape[-1] != 3:
            video = video.transpose(0, 2, 3, 1)
    video = np.asarray(video, dtype=np.float32)
    return video / 255 if video.max() > 1.5 else video


def pixel_colours(video):
    """(F, H, W) int: each pixel's palette colour (its index in PALETTE), -1 where none is within 0.3."""
    frames = _to_frames(video)  # (F, H, W, 3)
    palette = np.array(list(PALETTE.values()), dtype=np.float32) / 255  # (6, 3)
    dist = np.linalg.norm(frames[..., None, :] - palette, axis=-1)  # (F, H, W, 6)
    return np.where(dist.min(-1) < 0.3, dist.argmin(-1), -1)


def describe(video, min_area=48, min_move=5):
    """The squares a video shows: [{'colour', 'direction', 'area'}], largest first.

    A pixel counts for the palette colour nearest to it, if within 0.3 (RGB in [0, 1]). A
    colour is shown if it covers at least `min_area` px per frame on average (a square is
    256). Its direction is that of its centroid from the first two frames to the last two,
    or 'still' if it moved less than `min_move` px.
    """
    labels, found = pixel_colours(video), []
    for i, colour in enumerate(PALETTE):
        mask = labels == i  # (F, H, W)
        area = mask.sum(axis=(1, 2))
        if area.mean() < min_area:
            continue
        ys, xs = np.mgrid[:mask.shape[1], :mask.shape[2]]
        cx = (mask * xs).sum(axis=(1, 2)) / np.maximum(area, 1)
        cy = (mask * ys).sum(axis=(1, 2)) / np.maximum(area, 1)
        seen = area > 0
        first, last = np.flatnonzero(seen)[:2], np.flatnonzero(seen)[-2:]
        dx, dy = cx[last].mean() - cx[first].mean(), cy[last].mean() - cy[first].mean()
        if max(abs(dx), abs(dy)) < min_move:
            direction = "still"
        elif abs(dx) > abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        found.append(dict(colour=colour, direction=direction, area=float(area.mean())))
    return sorted(found, key=lambda s: -s["area"])


# -----------------------------------------------------------------------------
# 4. The pipeline's parts: the real diffusers and transformers classes, tiny

TEXT_DIM, LATENT_CHANNELS = 64, 16
TRAIN_TIMESTEPS = 1000  # the scheduler's noise levels, as CogVideoX-2B's


def build_parts():
    """Untrained tokenizer, text encoder, VAE, transformer and scheduler of the toy pipeline."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0))
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(16, 16, 32, 32), latent_channels=LATENT_CHANNELS, layers_per_block=1,
        norm_num_groups=8, temporal_compression_ratio=4, sample_height=SIZE, sample_width=SIZE)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        time_embed_dim=64, text_embed_dim=TEXT_DIM, num_layers=4, sample_width=SIZE // 8,
        sample_height=SIZE // 8, sample_frames=FRAMES, patch_size=2, max_text_seq_length=226)
    scheduler = CogVideoXDDIMScheduler(  # configured like CogVideoX-2B's
        num_train_timesteps=TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=3.0, steps_offset=0)
    return tokenizer, text_encoder, vae, transformer, scheduler


def _clips(rng, batch, frames=FRAMES):
    """A batch of rendered scenes as VAE input: (B, C, F, H, W) in [-1, 1]."""
    video = np.stack([render(random_scene(rng))[:frames] for _ in range(batch)])  # (B, F, H, W, 3)
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3) * 2 - 1


def train_vae(vae, rng, steps=(300, 450), lr=1e-3):
    """Train the VAE as an autoencoder on the posterior's mode, squares weighted ten times."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    plan = [(1, 16)] * steps[0] + [(FRAMES, 4)] * steps[1]  # single frames first, then whole clips
    bar = tqdm(plan, desc="VAE")
    for i, (frames, batch) in enumerate(bar):
        for g in opt.param_groups:  # cosine decay over each stage
            stage_i, stage_n = (i, steps[0]) if i < steps[0] else (i - steps[0], steps[1])
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * stage_i / stage_n)))
        x = _clips(rng, batch, frames)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        weight = 1 + 9 * (x.amax(dim=1, keepdim=True) > -1).float()  # squares count ten times
        loss = (weight * (recon - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def check_vae(vae, rng, n=32):
    """Share of held-out clips whose reconstruction the judge reads as the original."""
    colour_ok = direction_ok = 0
    for _ in range(n):
        scene = random_scene(rng, 1)
        x = torch.from_numpy(render(scene)).permute(3, 0, 1, 2)[None] * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]  # (C, F, H, W)
        seen = describe(((recon.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).numpy())
        colour_ok += bool(seen) and seen[0]["colour"] == scene[0]["colour"]
        direction_ok += bool(seen) and seen[0]["direction"] == scene[0]["direction"]
    return colour_ok / n, direction_ok / n


@torch.no_grad()
def encode_dataset(vae, rng, n, batch=32):
    """n random scenes and their VAE latents, scaled to unit variance: (N, F', C, H', W')."""
    scenes, latents = [random_scene(rng) for _ in range(n)], []
    for i in tqdm(range(0, n, batch), desc="encode"):
        x = torch.from_numpy(np.stack([render(s) for s in scenes[i:i + batch]])).permute(0, 4, 1, 2, 3) * 2 - 1
        latents.append(vae.encode(x.to(vae.device)).latent_dist.mode())
    latents = torch.cat(latents)  # (N, C, F', H', W')
    # Scale so that the channels' spread (not their offsets) is about 1: squares stay visible under noise.
    vae.register_to_config(scaling_factor=float(1 / latents.std(dim=(0, 2, 3, 4)).mean()))
    return scenes, (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def _token_ids(tokenizer, prompts):
    """(N, 226) token ids, padded as the pipeline pads its prompts."""
    return tokenizer(prompts, padding="max_length", max_length=226, truncation=True, return_tensors="pt").input_ids


def _training_batch(rng, scenes, latents, tokenizer, text_encoder, scheduler, gen, batch):
    """A batch to train on: text (B, 226, D), latents x0, noise, timesteps and the prompts; one in ten empty."""
    idx = [rng.randrange(len(scenes)) for _ in range(batch)]
    prompts = ["" if rng.random() < 0.1 else make_prompt(rng, scenes[i], drop=0.1) for i in idx]
    device = latents.device
    text = text_encoder(_token_ids(tokenizer, prompts).to(device))[0]
    x0 = latents[idx]  # (B, F', C, H', W')
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
    return text, x0, noise, t, prompts


def _update(opt, params, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_transformer(transformer, text_encoder, tokenizer, scheduler, scenes, latents, rng, steps=4500, batch=32,
                      lr=1e-3, gen=None, probe=0.0, probe_until=None):
    """Train transformer and text encoder together on v-prediction; one prompt in ten is empty.

    The lr warms up over 200 steps, then decays (cosine). `probe` > 0 adds, at that weight, a
    linear probe's loss that asks every text token, padding included, which direction words the
    prompt says (the video reads the text mostly through the padding: docs/experiments.md,
    section 2). With `probe_until` set, the probe stops once the model reads the direction
    words: once swapping each for its opposite raises the loss by that much (`direction_gap`,
    every 50 steps); what it taught outlives it. The probe is dropped after training.
    """
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    if probe:
        head = torch.nn.Linear(TEXT_DIM, len(DIRECTIONS)).to(latents.device)
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    transformer.train(), text_encoder.train()
    if gen is None:
        gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    probing, gap = bool(probe), None
    if probing and probe_until is not None:
        check = direction_check(scenes, latents, tokenizer, random.Random(rng.random()))
    bar = tqdm(range(steps), desc="transformer")
    for step in bar:
        if probing and probe_until is not None and step % 50 == 0 and step >= 200:
            gap = direction_gap(transformer, text_encoder, scheduler, check)
            probing = gap < probe_until
            if not probing:
                print(f"\nThe model reads the direction words at step {step} (gap {gap:.3f}): probe off")
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        text, x0, noise, t, prompts = _training_batch(rng, scenes, latents, tokenizer, text_encoder, scheduler, gen,
                                                      batch)
        v = transformer(hidden_states=scheduler.add_noise(x0, noise, t), encoder_hidden_states=text, timestep=t,
                        return_dict=False)[0]
        loss = F.mse_loss(v, scheduler.get_velocity(x0, noise, t))
        objective = loss
        if probing:  # every token (B, 226, 4) says which direction words its prompt has
            logits = head(text)
            says = torch.tensor([[float(d in p.split()) for d in sorted(DIRECTIONS)] for p in prompts], device=v.device)
            objective = objective + probe * F.binary_cross_entropy_with_logits(logits, says[:, None].expand_as(logits))
        _update(opt, params, objective)
        bar.set_postfix(loss=f"{loss.item():.4f}", **({} if gap is None else {"gap": f"{gap:.3f}"}))
    transformer.eval(), text_encoder.eval()


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def direction_check(scenes, latents, tokenizer, rng, n=32, t=700):
    """A fixed batch for `direction_gap`: n one-square clips, their prompts, and the prompts with
    each direction word swapped for its opposite, as token ids; fixed noise at timestep t."""
    idx = [i for i, s in enumerate(scenes) if len(s) == 1][:n]
    prompts = [make_prompt(rng, scenes[i]) for i in idx]
    swapped = [" ".join(OPPOSITE.get(w, w) for w in p.split()) for p in prompts]
    ids = _token_ids(tokenizer, prompts + swapped).to(latents.device)
    noise = torch.randn(latents[idx].shape, generator=torch.Generator().manual_seed(rng.randint(0, 2**31)))
    return latents[idx], noise.to(latents.device), torch.full((len(idx),), t, device=latents.device), ids


@torch.no_grad()
def direction_gap(transformer, text_encoder, scheduler, check):
    """How much the v-prediction loss rises when every direction word says the opposite (0: words unread)."""
    x0, noise, t, ids = check
    text = text_encoder(ids)[0]
    x_t, target = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    losses = [((transformer(hidden_states=x_t, encoder_hidden_states=half, timestep=t, return_dict=False)[0] - target)
               ** 2).mean() for half in text.chunk(2)]
    return float(losses[1] - losses[0])


# -----------------------------------------------------------------------------
# 5. How good the toy model is: judged on held-out phrasings

def evaluation_set(n, seed=0, num_squares=1):
    """(prompt, scene) pairs in held-out phrasings, cycling through every colour word and direction."""
    rng = random.Random(seed)
    words = [w for c in PALETTE for w in SYNONYMS[c]]
    pairs = []
    for i in range(n):
        word = [words[i % len(words)]] if num_squares == 1 else None
        if num_squares == 1:  # cover every word and direction evenly: all 15 x 4 pairs in 60 prompts
            scene = random_scene(rng, colours=[WORD_TO_COLOUR[word[0]]], directions=[sorted(DIRECTIONS)[i % 4]])
        else:
            scene = random_scene(rng, num_squares)
        pairs.append((make_prompt(rng, scene, held_out=True, words=word), scene))
    return pairs


def quality(pipe, n_single=48, n_double=24, seed=0):
    """The toy model's quality table: the shares that issue #2 asks for, on held-out phrasings."""
    single = evaluation_set(n_single, seed, 1)
    double = evaluation_set(n_double, seed + 1, 2)
    seen = [describe(v) for v in generate(pipe, [p for p, _ in single + double], seed)]
    s_seen, d_seen = seen[:n_single], seen[n_single:]
    colour = np.mean([bool(s) and s[0]["colour"] == sc[0]["colour"] for s, (_, sc) in zip(s_seen, single)])
    direction = np.mean([bool(s) and s[0]["direction"] == sc[0]["direction"] for s, (_, sc) in zip(s_seen, single)])
    both = np.mean([{q["colour"] for q in sc} <= {q["colour"] for q in s} for s, (_, sc) in zip(d_seen, double)])
    return {"one square: prompted colour is the main colour": colour,
            "one square: moves in the prompted direction": direction,
            "two squares: both prompted colours shown": both}


def reading(prompt, video, concept):
    """The judge's reading of one video made for `prompt`, with the colours `concept` names erased: its squares;
    whether the prompt names the concept, and the video shows it; whether every other colour the prompt asks
    for is among the video's largest squares (as many as the prompt names colours); whether a square moves
    as the prompt says. The one measure of an erasure on the toy: `erasure_report` and sample.py's
    --eval toy both count these."""
    seen = describe(video)
    asked, erased = colours_named(prompt), colours_named(concept)
    largest = {s["colour"] for s in seen[:len(asked)]}
    directions = {w for w in re.findall(r"[a-z]+", prompt.lower()) if w in DIRECTIONS}
    return {"squares": [(s["colour"], s["direction"]) for s in seen], "names_concept": bool(erased & asked),
            "shows_concept": bool(erased & {s["colour"] for s in seen}), "others_kept": asked - erased <= largest,
            "moves_as_asked": bool(directions & {s["direction"] for s in seen})}


def summary(readings):
    """sample.py --eval toy on a prompts file: of the prompts naming the concept, the videos showing it; of the
    other prompts, the videos keeping what was asked."""
    named = [r for r in readings if r["names_concept"]]
    other = [r for r in readings if not r["names_concept"]]
    return {"concept shown": Rate(sum(r["shows_concept"] for r in named), len(named)),
            "others kept": Rate(sum(r["others_kept"] for r in other), len(other))}


def erasure_cases(concept, n=24, seed=0):
    """The toy's test set for erasing the colours `concept` names ('red', or 'red, blue'), as (group, prompt) in
    held-out phrasings: for each erased colour `n` prompts naming it ("word") and `n` naming a synonym
    ("synonyms"), n / 2 for each other colour, and `n` two-square prompts 'a <erased> ... and a <other> ...'
    ("two"). With several colours, a group's name ends in its colour: "word red"."""
    rng = random.Random(seed)
    erased = sorted(colours_named(concept))
    others = [c for c in PALETTE if c not in erased]
    tag = lambda group, colour: group if len(erased) == 1 else f"{group} {colour}"  # noqa: E731
    cases = []  # (group, scene, words)
    for colour in erased:
        synonyms = SYNONYMS[colour][1:] or SYNONYMS[colour]
        for group, words in (("word", [colour]), ("synonyms", synonyms)):
            cases += [(tag(group, colour), random_scene(rng, colours=[colour]), [words[i % len(words)]])
                      for i in range(n)]
    cases += [(c, random_scene(rng, colours=[c]), None) for c in others for _ in range(n // 2)]
    cases += [(tag("two", colour), random_scene(rng, colours=[colour, rng.choice(others)]), None)
              for colour in erased for _ in range(n)]
    return [(group, make_prompt(rng, scene, held_out=True, words=words)) for group, scene, words in cases]


def erasure_table(groups, readings, concept):
    """What erasing the colours `concept` names did, from each test video's group and reading (`reading`), as
    Rates of videos:

    word gone / synonyms gone: prompts naming the colour (or a synonym) show no square of it;
    motion kept: those videos still show a square moving as prompted; <other colour>: prompts
    naming it show it as the main colour; two: the erased colour gone, the other among the two
    largest squares. With several colours erased, a row of one colour ends in its name: "word gone (red)"."""
    by = {}
    for group, r in zip(groups, readings):
        by.setdefault(group, []).append(r)
    erased = sorted(colours_named(concept))
    count = lambda gs, key, want=True: Rate(sum(r[key] == want for g in gs for r in by[g]),  # noqa: E731
                                           sum(len(by[g]) for g in gs))
    tags = [("", "")] if len(erased) == 1 else [(f" {c}", f" ({c})") for c in erased]  # (group's, row's)
    report = {f"{g} gone{row}": count([g + group], "shows_concept", False)
              for group, row in tags for g in ("word", "synonyms")}
    report["motion kept"] = count([g + group for group, _ in tags for g in ("word", "synonyms")], "moves_as_asked")
    report.update({c: count([c], "others_kept") for c in PALETTE if c not in erased})
    for group, row in tags:
        report[f"two: erased gone{row}"] = count(["two" + group], "shows_concept", False)
        report[f"two: other kept{row}"] = count(["two" + group], "others_kept")
    return report


def erasure_report(pipe, concept, n=24, seed=0, **kwargs):
    """`erasure_table` of the test set (`erasure_cases`) drawn by `pipe`, video i seeded seed + i, one at a time
    as sample.py --eval toy draws them. `kwargs` go to the pipeline, e.g. negative_prompt="red"."""
    groups, prompts = zip(*erasure_cases(concept, n, seed))
    videos = generate(pipe, list(prompts), seeds=[seed + i for i in range(len(prompts))], batch=1, **kwargs)
    return erasure_table(groups, [reading(p, v, concept) for p, v in zip(prompts, videos)], concept)


def format_table(rows):
    """{model: {measure: Rate}} as plain text, a line per measure and a column per model: each cell
    'k/n rate [95 % interval]'."""
    names, measures = list(rows), list(next(iter(rows.values())))
    cell = lambda v: str(v) if isinstance(v, Rate) else f"{100 * v:.0f} %"  # noqa: E731
    first = max(map(len, measures)) + 2
    widths = [max(len(n), *(len(cell(rows[n][m])) for m in measures)) + 3 for n in names]
    lines = [" " * first + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    lines += [f"{m:<{first}}" + "".join(f"{cell(rows[n][m]):>{w}}" for n, w in zip(names, widths)) for m in measures]
    return "\n".join(lines + ["(k/n videos, the share, and its 95 % interval over videos)"])


def print_quality(table, n_single, n_double):
    print(f"\nToy model quality (held-out phrasings, 20 steps; {n_single} one-square, {n_double} two-square videos)")
    for name, value in table.items():
        print(f"  {name:<48} {100 * value:5.1f} %")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only load the committed toy/ and print its quality")
    parser.add_argument("--out", default=TOY_DIR, help="where to save the pipeline (default: toy/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole build (default 0)")
    parser.add_argument("--vae-steps", type=int, nargs=2, default=[300, 450], help="VAE steps: frames, then clips")
    parser.add_argument("--steps", type=int, default=4500, help="transformer training steps (default 4500)")
    parser.add_argument("--scenes", type=int, default=4000, help="training scenes encoded once (default 4000)")
    parser.add_argument("--direction-probe", type=float, default=0.05, metavar="WEIGHT",
                        help="weight of a probe loss that makes every text token carry the direction words "
                             "(default 0.05; 0: off; docs/experiments.md, section 2)")
    parser.add_argument("--probe-until", type=float, default=0.05, metavar="GAP",
                        help="stop the probe once swapping each direction word for its opposite raises the loss "
                             "by GAP (default 0.05; inf: the probe stays on)")
    parser.add_argument("--reuse-vae", action="store_true",
                        help="keep the VAE of --out, train the rest anew (as a build from nothing that made it)")
    parser.add_argument("--n-eval", type=int, default=96, help="one-square videos in the quality table")
    args = parser.parse_args(argv)
    if args.direction_probe < 0:
        parser.error(f"--direction-probe {args.direction_probe}: a loss weight, at least 0")
    if not args.probe_until > 0:  # nan as well
        parser.error(f"--probe-until {args.probe_until}: a rise of the loss, above 0 (inf: the probe stays on)")
    if not args.check:
        from diffusers import CogVideoXPipeline
        start = time.time()
        rng = random.Random(args.seed)
        torch.manual_seed(args.seed)
        tokenizer, text_encoder, vae, transformer, scheduler = build_parts()
        if args.reuse_vae:
            from diffusers import AutoencoderKLCogVideoX
            vae = AutoencoderKLCogVideoX.from_pretrained(args.out, subfolder="vae")
        else:  # on a copy of the seed's stream, so that --reuse-vae on this VAE repeats the build exactly
            train_vae(vae, random.Random(args.seed), tuple(args.vae_steps))
        colour_ok, direction_ok = check_vae(vae, rng)
        print(f"VAE reconstructions read by the judge: colour {100 * colour_ok:.0f} %, "
              f"direction {100 * direction_ok:.0f} %")
        scenes, latents = encode_dataset(vae, rng, args.scenes)
        train_transformer(transformer, text_encoder, tokenizer, scheduler, scenes, latents, rng, args.steps,
                          probe=args.direction_probe, probe_until=args.probe_until)
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                 transformer=transformer, scheduler=scheduler)
        pipe.save_pretrained(args.out)
        save_prompt_grammar(args.out)  # the prompts unlearn.py draws on this model
        print(f"Saved the toy pipeline to {args.out} after {(time.time() - start) / 60:.1f} min")
    pipe = load_base_pipeline(args.out)
    n_double = args.n_eval // 2
    print_quality(quality(pipe, args.n_eval, n_double), args.n_eval, n_double)


if __name__ == "__main__":
    main()
