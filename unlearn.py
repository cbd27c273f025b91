"""unlearn.py: T2VUnlearning (Cheng, Ye, Xiong, Li and Wang 2025, arXiv 2505.17550) for diffusers video pipelines.

Erase a concept from a text-to-video model by training a small eraser in every attention
block, so that the model stops drawing it, however the prompt words it, and draws
everything else as before.

    python unlearn.py --model toy --concept red      # the toy model, under a minute on a CPU
    python unlearn.py --concept "nudity"             # CogVideoX-2B on one GPU
    python unlearn.py --concept "nudity" --concept "violence"   # one eraser for both (or --concepts-file)
    python unlearn.py --model THUDM/CogVideoX-5b --concept "nudity"
    python unlearn.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --concept "nudity"
    python unlearn.py --model hunyuanvideo-community/HunyuanVideo --concept "nudity"

The steps, in the order they run and this file reads (the README and notebook.ipynb use the
same numbers):
  1. Load the pipeline            6. Teacher velocities and the negatively guided target (Eq. 1)
  2. Build augmented prompts      7. Concept masks from the teacher's attention
  3. Encode the prompts once      8. Losses and the AdamW step on the erasers; steps 5-8 repeat
  4. Attach the erasers           9. Save the eraser
  5. Make the noisy latents x_t
On a GPU each part of the pipeline is there only while it works: the refiner (step 2), then
the text encoder (step 3), then the transformer alone (steps 4-8). The steps are the same for
CogVideoX, Wan and HunyuanVideo; what differs between them is in families.py.
"""

import argparse
import contextlib
import functools
import gc
import os
import random
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from families import Text, family_of
from prompts import (REFINER_TRIES, balanced_choices, concept_pattern, concept_templates, concept_words, concepts_named,
                     default_preserve, fill, keep_naming, load_grammar, names_any, read_prompts, refine_prompts,
                     substitute)
from runs import (UserError, move_aside, no_timer, restore_checkpoint, run_cli, run_prompts, run_steps,
                  save_checkpoint, save_prompts, why, write_atomic, write_json)

TRAIN_FRAMES = 17  # default training length: see --num-frames
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")  # --model toy: the toy.py pipeline


# -----------------------------------------------------------------------------
# 0. Settings

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to erase, and from what")
    g.add_argument("--concept", action="append", default=[],
                   help="the concept to erase, as prompts name it: 'nudity', 'red'; repeat it to erase several in "
                        "one eraser, prompts drawn evenly for each")
    g.add_argument("--concepts-file", default=None, help="more concepts to erase, one a line ('#' starts a comment)")
    g.add_argument("--model", default="THUDM/CogVideoX-2b",
                   help="text-to-video pipeline (CogVideoX, Wan, HunyuanVideo): hub id, folder, or 'toy' "
                        "(default THUDM/CogVideoX-2b)")
    g.add_argument("--output-dir", default=None, help="where the eraser goes (default erasers/<concepts>)")
    g.add_argument("--overwrite", action="store_true", help="replace an eraser already in --output-dir")
    g = p.add_argument_group("prompts")
    g.add_argument("--num-prompts", type=int, default=32,
                   help="augmented prompts made from templates, for each concept (8-256)")
    g.add_argument("--prompts-file", default=None,
                   help="more concept prompts: a CSV with a 'prompt' column (as sample.py reads), or one a line")
    g.add_argument("--refiner", default=None,
                   help="transformers chat/text model that rewrites each prompt richly (on the GPU, freed after)")
    g.add_argument("--grammar", default=None,
                   help="prompt grammar the augmented prompts are drawn from (JSON, see prompts.py; default the "
                        "model folder's prompts.json if it has one, else built-in sentences)")
    g.add_argument("--no-augment", action="store_true", help="ablation: train on the bare concept word only")
    g.add_argument("--preserve", action="append", default=None,
                   help="what must survive, put in the concept's place (repeatable; default suits the concept)")
    g = p.add_argument_group("the method")
    g.add_argument("--eta", type=float, default=3.0,
                   help="negative guidance strength of Eq. 1 (1-7; default 3). The authors' released erasers are "
                        "named neg_scale_7.0 (CogVideoX-5B nudity, with concept_reg_1.0, 500 iterations, lr 1e-4, "
                        "prompts from 'naked body') and neg_strength 3.0 (HunyuanVideo)")
    g.add_argument("--anchor", choices=["removed", "empty"], default="removed",
                   help="anchor of Eq. 1: the prompt without the concept's words (default), or the empty prompt "
                        "(the paper's Eq. 1). Not the paper's default: on the toy the empty anchor erased red in "
                        "12 %% of videos, the removed one in 100 %% (docs/experiments.md, section 0)")
    g.add_argument("--loc-weight", type=float, default=0.1, help="alpha, localization loss weight (0 = off)")
    g.add_argument("--pres-weight", type=float, default=1.0, help="beta, preservation loss weight (0 = off)")
    g.add_argument("--mask-threshold", type=float, default=0.1, help="concept mask threshold after min-max (0-1)")
    g.add_argument("--xt", choices=["pool", "sample"], default="pool",
                   help="how x_t is made: a pool of the frozen model's trajectories made once (default), "
                        "or ESD's: the model being trained samples afresh every step (up to --xt-steps passes)")
    g.add_argument("--xt-steps", type=int, default=20, help="sampling steps of the trajectories (default 20)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance while sampling x_t, as the pipeline guides: classifier-free (default 6 for "
                        "CogVideoX, 5 for Wan) or HunyuanVideo's embedded guidance (default 6, every pass)")
    g = p.add_argument_group("training")
    g.add_argument("--rank", type=int, default=128, help="eraser rank (default 128, as the released checkpoints)")
    g.add_argument("--steps", type=int, default=500,
                   help="optimizer steps (default 500, for one concept or several: on the toy more steps did not help "
                        "a joint eraser, docs/experiments.md, section 13)")
    g.add_argument("--lr", type=float, default=2e-4,
                   help="AdamW learning rate (default 2e-4; the paper's is 1e-4, which on the toy left one training "
                        "seed in five erasing a third less: docs/experiments.md, section 11)")
    g.add_argument("--batch-size", type=int, default=1, help="concept prompts per step (default 1)")
    g.add_argument("--num-frames", type=int, default=None,
                   help=f"video frames to train on (default {TRAIN_FRAMES}, or fewer if the model makes fewer: the "
                        "length reported for the authors' training, chosen as what fits one GPU; bench.py --gpu "
                        "measures it; the erasers act per token, so they apply to videos of any length)")
    g.add_argument("--height", type=int, default=None,
                   help="video height in px (default the model's own: 480 for CogVideoX 2B/5B and Wan, 768 for 1.5, "
                        "720 for HunyuanVideo)")
    g.add_argument("--width", type=int, default=None,
                   help="video width in px (default the model's own: 720 for CogVideoX 2B/5B, 1360 for 1.5, 832 for "
                        "Wan, 1280 for HunyuanVideo)")
    g.add_argument("--seed", type=int, default=0, help="makes a run repeatable on the same machine")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="the backbone's dtype (default bfloat16 on a GPU, float32 on a CPU; fp16 gives NaN); "
                        "the erasers train in float32 whatever it is")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints in --output-dir (default: a tenth of --steps)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    concepts = [c.strip() for c in args.concept] + (read_concepts(args.concepts_file) if args.concepts_file else [])
    if not concepts or not all(concepts):
        raise UserError("--concept is empty: name the concept to erase, e.g. --concept nudity")
    twice = [c for i, c in enumerate(concepts) if c.lower() in (d.lower() for d in concepts[:i])]
    if twice:
        raise UserError(f"'{twice[0]}' is named twice among the concepts: name each once")
    args.concepts, args.concept = concepts, ", ".join(concepts)  # eraser.json lists them; concept names them all
    for name in ("steps", "batch_size", "rank", "num_prompts", "xt_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not (args.lr > 0 and args.eta >= 0 and args.loc_weight >= 0 and args.pres_weight >= 0
            and 0 <= args.mask_threshold < 1):
        raise UserError("--lr must be > 0; --eta, --loc-weight, --pres-weight >= 0; --mask-threshold in [0, 1)")
    if args.grammar and not os.path.isfile(args.grammar):  # refused, as a broken one is, before the model loads
        raise UserError(f"--grammar {args.grammar}: no such file")
    grammar = load_grammar(model_folder(args.model), args.grammar)
    kept = [k for k in args.preserve or [] if names_any(k, [w for c in concepts for w in concept_words(grammar, c)])]
    if kept:
        raise UserError(f"--preserve '{kept[0]}' names a concept this run erases: keep something else")
    name = args.concept if len(concepts) < 4 else f"{concepts[0]} and {len(concepts) - 1} more"
    args.output_dir = args.output_dir or os.path.join("erasers", re.sub(r"\W+", "_", name.lower()))
    return args


def read_concepts(path):
    """--concepts-file: one concept a line; blank lines and '#' comments skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.split("#")[0].strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--concepts-file {path}: cannot read it ({why(e)}); give a text file, one concept a line")
    return [line for line in lines if line]


# -----------------------------------------------------------------------------
# 1. Load the pipeline

def pick_device(device=None):
    """The device asked for, else cuda if there is one; one line for a device this machine does not have."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


def pick_dtype(device, dtype=None):
    """bf16 on a GPU, fp32 on a CPU, unless asked (fp16 has been reported to give NaN after the first step)."""
    return getattr(torch, dtype) if dtype else torch.bfloat16 if device.type == "cuda" else torch.float32


def model_folder(model):
    """Where `--model` lives: 'toy' is the folder toy/ beside this file; anything else as given."""
    return TOY if model == "toy" else model


def load_base_pipeline(model, device=None, dtype=None, move=True):
    """A diffusers text-to-video pipeline of a family unlearn.py serves (families.py), in the dtype for
    `device`. 'toy' means the folder toy/. With move=False it stays in CPU memory: unlearn.py moves one
    part at a time to the GPU."""
    from diffusers import DiffusionPipeline
    device = pick_device(device)
    path = model_folder(model)
    try:  # the pipeline class its model_index.json names; never remote code
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype; older ones read torch_dtype only
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=pick_dtype(device, dtype), use_safetensors=True)
    except Exception as e:  # not found, no network, not a diffusers pipeline
        raise UserError(f"cannot load model '{model}' ({why(e)}); check the name, or try --model toy")
    family_of(pipe).check(pipe, model)  # one line for what these steps cannot serve, before any work
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if move else pipe


def text_length(pipe):
    """Tokens a prompt is encoded to: 226 for CogVideoX (its config), 512 for Wan, 256 for HunyuanVideo."""
    return family_of(pipe).text_length(pipe)


def video_size(pipe, num_frames=None, height=None, width=None, max_frames=None):
    """(frames, height, width): what was asked, else the size the model was made for (its frames at most
    `max_frames`)."""
    frames, h, w = family_of(pipe).native_size(pipe)
    return num_frames or min(frames, max_frames or frames), height or h, width or w


def resolve_defaults(pipe, args):
    """What was asked, else the model's own: training frames (see --num-frames), height, width, guidance."""
    args.num_frames, args.height, args.width = video_size(pipe, args.num_frames, args.height, args.width,
                                                          TRAIN_FRAMES)
    if args.guidance is None:
        args.guidance = family_of(pipe).default_guidance


def video_shape(pipe, num_frames, height, width):
    """Latent shape of one video of that size, in the family's layout: (F', C, H', W') for CogVideoX,
    (C, F', H', W') for Wan and HunyuanVideo."""
    return family_of(pipe).latent_shape(pipe, num_frames, height, width)


def model_inputs(pipe, shape, guidance):
    """The transformer inputs fixed for a run (CogVideoX's RoPE, HunyuanVideo's embedded guidance), made once."""
    return family_of(pipe).static_inputs(pipe, shape, guidance)


def velocity(transformer, x, t, text, static):
    """The transformer's prediction at x_t: v for CogVideoX, the flow velocity eps - x0 for Wan and Hunyuan."""
    return family_of(transformer).velocity(transformer, x, t, text, static)


# -----------------------------------------------------------------------------
# 2. Build augmented prompts that carry the concept

def build_prompts(args, rng, device=None, log=print):
    """Concept prompts c, as many for each concept, and for each its anchor and its preservation prompt c_pre."""
    grammar = load_grammar(model_folder(args.model), args.grammar)  # the model folder's, or built in
    banned = [w for c in args.concepts for w in concept_words(grammar, c)]  # a prompt names its own concept only
    prompts = []
    for concept in args.concepts:
        prompts += [concept] if args.no_augment else \
            [fill(t, concept) for t in concept_templates(grammar, rng, args.num_prompts, concept, banned)]
    if args.prompts_file:  # sample.py's format: a CSV with a 'prompt' column, or one a line
        kept, said = keep_naming([r["prompt"] for r in read_prompts(args.prompts_file, args.seed)], grammar,
                                 args.concepts)
        prompts += kept
        log(f"# 2. {said}")
    if args.refiner:
        asked = len(prompts)
        device = pick_device(device)
        torch.manual_seed(args.seed)  # the refiner samples: --seed makes it repeatable
        prompts, dropped = refine_prompts(prompts, args.concepts, args.refiner, device, pick_dtype(device))
        free_memory()  # the language model leaves the GPU before the video model comes
        named = f"'{args.concept}'" if len(args.concepts) == 1 else "their prompt's concepts"
        log(f"# 2. The refiner rewrote {len(prompts)} of {asked} prompts; it dropped {dropped} outputs that did "
            f"not name {named} ({asked - len(prompts)} prompts had none in {REFINER_TRIES} tries)")
    # Each concept a prompt names is taken out for its anchor, and for c_pre replaced by something to keep
    # (drawn once per prompt, evenly), never a concept of the run.
    preserve = {c: args.preserve or default_preserve(grammar, c, banned) for c in args.concepts}
    named = [concepts_named(p, args.concepts) for p in prompts]
    keeps = {c: iter(balanced_choices(rng, preserve[c], sum(c in n for n in named))) for c in args.concepts}
    anchors = ["" if args.anchor == "empty" else substitute(p, n, [""] * len(n)) for p, n in zip(prompts, named)]
    return prompts, anchors, [substitute(p, n, [next(keeps[c]) for c in n]) for p, n in zip(prompts, named)]


# -----------------------------------------------------------------------------
# 3. Encode the prompts once, then free the text encoder

def concept_tokens(tokenizer, texts, concepts, length, spans=None, crop=0):
    """(N, length - crop) float: 1 at every token whose characters fall on a mention of a concept (a phrase, or
    a list of them: a run of several concepts masks each prompt by the ones it names).

    `texts` are what the tokenizer reads, `spans` the prompt's characters in each (default: all of it;
    HunyuanVideo puts the prompt inside a chat template), `crop` the leading tokens the pipeline drops.
    Found by character offsets, the whole phrase in any case ("Nudity," starting a prompt too), so
    any tokenizer serves: word-level (the toy), or sentencepiece and BPE, whose pieces of a word in
    context can differ from the word's own. In "a red square", the word "a" elsewhere is not the concept.
    """
    concepts = [concepts] if isinstance(concepts, str) else concepts
    for concept in concepts:
        if all(i == tokenizer.unk_token_id for i in tokenizer(concept, add_special_tokens=False).input_ids):
            lower = set(tokenizer(concept.lower(), add_special_tokens=False).input_ids) - {tokenizer.unk_token_id}
            hint = f" (it knows '{concept.lower()}': words are case-sensitive)" if lower else ""
            raise UserError(f"the model's tokenizer knows no word of '{concept}', so no prompt can name it; "
                            f"pick a concept in the model's vocabulary{hint}")
    try:
        offsets = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                            return_offsets_mapping=True).offset_mapping
    except NotImplementedError:
        raise UserError("the model's tokenizer gives no character offsets; save it as a fast (tokenizers) one")
    marks = torch.zeros(len(texts), length)
    for row, (text, token_spans) in enumerate(zip(texts, offsets)):
        first, last = spans[row] if spans else (0, len(text))
        mentions = [m.span() for c in concepts for m in concept_pattern(c).finditer(text, first, last)]
        for i, (start, end) in enumerate(token_spans):  # special and padding tokens have empty spans
            if start < end and any(start < m_end and end > m_start for m_start, m_end in mentions):
                marks[row, i] = 1
    return marks[:, crop:]


def text_encoders(pipe):
    return [getattr(pipe, name) for name in family_of(pipe).text_encoders]


@torch.no_grad()
def encode_prompts(pipe, prompts, batch=16):
    """The prompts' text inputs to the transformer (a families.Text: embeddings (N, L, D), and HunyuanVideo's
    mask and pooled CLIP), at the transformer's text length, on the text encoder's device."""
    family, device = family_of(pipe), pipe.text_encoder.device
    return Text.cat([family.encode(pipe, prompts[i:i + batch], device) for i in range(0, len(prompts), batch)])


def encode_run_prompts(pipe, concepts, prompts, anchors, preserved, device=None):
    """Step 3 for a run: where the concepts' tokens sit in each prompt, and every prompt's embeddings on
    `device` (where the text encoders go for this, if given)."""
    texts, spans, length, crop = family_of(pipe).token_texts(pipe, prompts)
    tokens = concept_tokens(pipe.tokenizer, texts, concepts, length, spans, crop)
    if device is not None:
        for encoder in text_encoders(pipe):
            encoder.to(device)
    embeds = dict(concept=encode_prompts(pipe, prompts), anchor=encode_prompts(pipe, anchors),
                  preserve=encode_prompts(pipe, preserved), empty=encode_prompts(pipe, [""]))
    return tokens.to(embeds["concept"].device), embeds


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_text_encoder_and_vae(pipe):
    """Training needs neither: CogVideoX's T5 encoder alone is 9 GB in bf16, Wan's UMT5 11 GB, HunyuanVideo's
    Llama 16 GB. They never share the GPU with it."""
    for name in family_of(pipe).text_encoders:
        setattr(pipe, name, None)
    pipe.vae = None
    free_memory()


# -----------------------------------------------------------------------------
# 4. Attach the erasers: a residual adapter on the video output of every block's attention

class Eraser(nn.Module):
    """E(x) = W_up(GELU(W_down x)), W_up zero at the start so that training starts from the original model."""

    def __init__(self, dim, rank):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


class EraserState:
    """What every eraser processor does now; one object shared by all blocks."""
    enabled = True  # False: the frozen original model v*
    tokens = None  # (B, L) concept tokens: record the concept attention of the first B rows
    record_rows = 0  # record the erasers' inputs of the first rows (for L_loc)


class EraserAttnProcessor(nn.Module):
    """The stock attention of the block, then h_video = Attn(h) + E(Attn(h)) on its video output.

    An nn.Module, as diffusers' IP-Adapter processors are: set with `set_processor`, its eraser
    is a submodule of the transformer, so `.to()`, CPU offload, `parameters()` and `state_dict()`
    see it. (`__call__` is defined, not `forward`, so that diffusers passes it the rotary embeddings.)
    The stock processor does the attention itself, so with the erasers off the output is the
    stock output, bit for bit. Under gradient checkpointing this runs twice (forward and
    recompute): the attention maps are recorded only in the no-grad teacher pass, and the
    eraser inputs only while `record_rows` is set, during the student's forward.
    """

    def __init__(self, eraser, state, family):
        super().__init__()
        self.stock, self.eraser, self.state = family.stock_processor(), eraser, state
        self.queries_and_keys = family.queries_and_keys
        self.attention = self.eraser_input = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        video = out[0] if isinstance(out, tuple) else out  # (video, text) for joint attention, video for Wan's
        s = self.state
        if s.tokens is not None:
            rows = len(s.tokens)
            mask = None if attention_mask is None else attention_mask[:rows]
            q, k, key_mask = self.queries_and_keys(attn, hidden_states[:rows], encoder_hidden_states[:rows], mask,
                                                   image_rotary_emb)
            self.attention = concept_attention(q, k, s.tokens, key_mask)
        if s.record_rows:
            self.eraser_input = video[:s.record_rows].detach()
        if s.enabled:  # in the eraser's own dtype (fp32 while training), whatever the backbone's
            video = video + self.eraser(video.to(next(self.eraser.parameters()).dtype)).to(video.dtype)
        return (video, *out[1:]) if isinstance(out, tuple) else video


def eraser_sites(transformer):
    """(module path, attention module) of every place an eraser sits (families.py): attn1 of each CogVideoX
    block, attn2 of each Wan block, the attention of each HunyuanVideo single-stream block."""
    return family_of(transformer).sites(transformer)


def attach_erasers(transformer, rank, device=None, dtype=torch.float32):
    """New erasers (zero: the original model), one per block, on `device` (default the transformer's), set
    into the blocks' attention. Returns them (an nn.ModuleList, in block order) and their shared state."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    erasers = nn.ModuleList(Eraser(dim, rank) for _ in eraser_sites(transformer))
    erasers.to(device or transformer.device, dtype)
    return erasers, insert_erasers(transformer, erasers)


def insert_erasers(transformer, erasers):
    """Set each eraser into its block's attention processor; the backbone is frozen, the erasers train."""
    state = EraserState()
    for (_, attn), eraser in zip(eraser_sites(transformer), erasers, strict=True):
        attn.set_processor(EraserAttnProcessor(eraser, state, family_of(transformer)))
    transformer.requires_grad_(False)
    erasers.requires_grad_(True)
    return state


def processors(transformer):
    return [attn.processor for _, attn in eraser_sites(transformer)]


def set_erasers(transformer, enabled):
    """Switch the erasers on (the erased model) or off (the original model)."""
    first = processors(transformer)[0]
    if not isinstance(first, EraserAttnProcessor):
        raise UserError("this transformer carries no eraser to switch: apply_eraser(pipe, DIR) first")
    first.state.enabled = enabled


@contextlib.contextmanager
def erasers_off(state):
    state.enabled = False
    try:
        yield
    finally:
        state.enabled = True


# -----------------------------------------------------------------------------
# 5. Make the noisy latents x_t with the model's own sampler

@torch.no_grad()
def sample_latents(transformer, sampler, noise, cond, uncond, static, guidance, steps=None):
    """Denoise from `noise` for `steps` of the sampler's steps, guided as the pipeline guides (classifier-free,
    or HunyuanVideo's embedded guidance, already in `static`).

    `sampler` steps as diffusers' schedulers do, `step(v, t, x)`: `x_t_sampler` makes the family's.
    Returns the latent before each step and after the last: (steps + 1, B, *latent shape).
    """
    family, x, xs = family_of(transformer), noise, [noise]
    for t in sampler.timesteps[:steps]:
        v = family.guided_velocity(transformer, x, t.expand(len(x)), cond, uncond, static, guidance)
        x = sampler.step(v, t, x, return_dict=False)[0].to(noise.dtype)
        xs.append(x)
    return torch.stack(xs)


def x_t_sampler(pipe, steps, device=None):
    """The family's sampler on the pipeline's own schedule, set to `steps` steps: DDIM for CogVideoX (whichever
    sampler the pipeline ships), Euler on the shifted flow sigmas for Wan and HunyuanVideo."""
    return family_of(pipe).sampler(pipe.scheduler, steps, device)


class NoisyLatents:
    """Where x_t comes from (as ESD and Receler make it), measured on the toy (docs/experiments.md, section 0).

    'pool' (the default) runs each prompt's trajectory once before training, with the frozen
    model (erasers off); each iteration reads the steps `balanced_draws` picks. The pool stays in
    CPU memory (12 GB at 256 prompts and 49 frames) and one draw at a time goes to the GPU.
    'sample' is ESD's: every step, the model being trained (erasers on, as ESD samples with the
    model it fine-tunes) samples from fresh noise for a random k of N steps; all velocities are
    then read at step k's timestep. It costs up to N guided passes per step.
    """

    def __init__(self, kind, transformer, state, sampler, embeds, uncond, static, shape, guidance, gen):
        self.kind, self.transformer, self.sampler, self.embeds, self.uncond, self.static = \
            kind, transformer, sampler, embeds, uncond, static
        self.shape, self.guidance, self.gen = shape, guidance, gen
        self.pool = None
        if kind == "pool":  # one prompt at a time: no more GPU memory than sampling the model
            with erasers_off(state):
                chunks = [self._sample(i[None]).cpu()
                          for i in tqdm(torch.arange(len(embeds), device=embeds.device), desc="x_t pool")]
            self.pool = torch.cat(chunks, dim=1)  # (steps + 1, prompts, *latent shape), in CPU memory

    def _sample(self, idx, steps=None):
        noise = torch.randn((len(idx), *self.shape), generator=self.gen)  # drawn on the CPU: any device, one run
        noise = noise.to(self.embeds.device, family_of(self.transformer).latent_dtype(self.transformer))
        return sample_latents(self.transformer, self.sampler, noise, self.embeds[idx],
                              self.uncond, self.static, self.guidance, steps)

    def draw(self, idx, k):
        """x_t (B, *latent shape) and its timesteps t (B,) for the prompts `idx` (B,): step k (B,) of their
        sampling ('sample': all at step k[0], as one batch is sampled together)."""
        if self.kind == "pool":
            x_t = self.pool[k, idx].to(self.embeds.device)
        else:  # the erasers are on: the model being trained samples
            k = k[:1].expand(len(idx))
            x_t = self._sample(idx.to(self.embeds.device), int(k[0]))[-1]
        return x_t, self.sampler.timesteps[k.to(self.sampler.timesteps.device)]


def balanced_draws(seed, num_prompts, num_steps, batch, step):
    """Optimizer step `step`'s batch: prompt indices (B,) and sampling steps k (B,), CPU tensors.

    Not independent draws: the run goes through every (prompt, k) pair once per pass, in an order drawn
    afresh each pass from a CPU generator seeded by (seed, pass), so every prompt and every noise level is
    trained on equally often and the draws of step s are the same on any device and after --resume.
    Measured on the toy: independent draws left some seeds' erasers a third weaker (docs/experiments.md, 11).
    """
    pairs = num_prompts * num_steps
    positions = torch.arange(step * batch, (step + 1) * batch)
    picks = torch.empty(batch, dtype=torch.long)
    for p in positions.div(pairs, rounding_mode="floor").unique().tolist():  # the pass(es) this batch falls in
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
        here = positions.div(pairs, rounding_mode="floor") == p
        picks[here] = order[positions[here] % pairs]
    return picks // num_steps, picks % num_steps


# -----------------------------------------------------------------------------
# 6. Teacher velocities: the same network with the erasers off, and Eq. 1's target

@torch.no_grad()
def teacher_pass(transformer, state, x_t, t, cond, anchor, tokens, static, pre=None):
    """v*(x_t, c), v*(x_t, anchor), v*(x_t, c_pre) (None without `pre`) and each block's concept attention for c."""
    rows = [cond, anchor] + ([] if pre is None else [pre])  # one batch of 2 or 3 prompts per sample, one x_t
    state.tokens = tokens
    try:
        with erasers_off(state):
            v = velocity(transformer, x_t.repeat(len(rows), 1, 1, 1, 1), t.repeat(len(rows)), Text.cat(rows), static)
    finally:
        state.tokens = None
    attention = []
    for proc in processors(transformer):  # handed over, not kept
        attention.append(proc.attention)
        proc.attention = None
    v = v.chunk(len(rows))
    return v[0], v[1], v[2] if pre is not None else None, attention


def negative_guidance_target(v_cond, v_anchor, eta):
    # Eq. 1: v_neg = v*(x_t, anchor) - eta * (v*(x_t, c) - v*(x_t, anchor)). Its weights sum to one, so it is
    # the same combination whether v is CogVideoX's v-prediction or Wan's and Hunyuan's flow velocity eps - x0.
    return v_anchor - eta * (v_cond - v_anchor)


# -----------------------------------------------------------------------------
# 7. Concept masks from the teacher's attention

# Concept attention: the block's video queries against the prompt's keys, as the block makes them
# (families.py: after QK-norm, and RoPE where the block applies it). Softmax over the text keys only
# (a cross-attention map, as Receler's masks; exactly Wan's attn2), padding masked where the model masks
# it (HunyuanVideo): the full joint softmax would need every video key too, 17,776 of them at 49 frames.
# Chunked over video tokens, memory stays at (B, heads, 4096, text length) whatever the video length.
def concept_attention(q, k, tokens, key_mask=None, chunk=4096):
    """(B, N_video): per video token, attention to the concept tokens summed, mean over heads.
    q (B, H, N_video, d), k (B, H, L, d), tokens (B, L), key_mask (B, L) True where a key is read."""
    tokens = tokens.to(q.device, torch.float32)[:, None, :, None]  # (B, 1, L, 1)
    scale = q.shape[-1] ** -0.5
    maps = []
    for qc in q.split(chunk, dim=2):
        logits = qc @ k.transpose(-1, -2) * scale  # (B, H, chunk, L)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        maps.append(logits.float().softmax(-1) @ tokens)  # (B, H, chunk, 1)
    return torch.cat(maps, dim=2).squeeze(-1).mean(1)


def concept_mask(attention, grid, threshold, has_concept):
    # M_l: attention to the concept (B, N_video) -> min-max per frame -> threshold; all ones without the concept
    a = attention.float().unflatten(1, grid)  # (B, F, h, w)
    lo, hi = a.amin(dim=(2, 3), keepdim=True), a.amax(dim=(2, 3), keepdim=True)
    mask = ((a - lo) / (hi - lo).clamp_min(1e-12) > threshold).float().flatten(1)  # (B, N_video)
    return torch.where(has_concept[:, None], mask, torch.ones_like(mask))


def token_grid(transformer, shape):
    """The video tokens' (frames, h, w) layout in the transformer's sequence, for latents of `shape`."""
    return family_of(transformer).token_grid(transformer.config, shape)


# -----------------------------------------------------------------------------
# 8. Losses, and the AdamW step on the erasers

def unlearn_loss(v_student, v_neg):
    # L_unlearn = || v'(x_t, c, t) - v_neg ||^2
    return F.mse_loss(v_student.float(), v_neg.float())


def localization_loss(eraser_out, mask):
    # L_loc (one block) = || E_l(Attn_l(h)) * (1 - M_l) ||^2, zero inside the concept's region
    return (eraser_out.float() * (1 - mask[..., None])).pow(2).mean()


def preservation_loss(v_student_pre, v_teacher_pre):
    # L_pre = || v'(x_t, c_pre, t) - v*(x_t, c_pre, t) ||^2
    return F.mse_loss(v_student_pre.float(), v_teacher_pre.float())


def student_pass(transformer, state, x_t, t, text, static, record=False):
    """v'(x_t, text) with gradients to the erasers; `record`: keep the erasers' inputs for L_loc."""
    state.record_rows = len(x_t) if record else 0
    try:
        return velocity(transformer, x_t, t, text, static)
    finally:
        state.record_rows = 0


def localization_backward(transformer, masks, weight):
    """alpha * L_loc backpropagated block by block; returns L_loc. Each term's input is its block's attention
    output, recorded detached: the terms' graphs are independent, so one at a time holds one block's graph,
    and each recorded input is dropped once used. The gradient is the same as one backward of the sum."""
    total = 0.0
    for proc, mask in zip(processors(transformer), masks):
        term = localization_loss(proc.eraser(proc.eraser_input.to(proc.eraser.down.weight.dtype)), mask) / len(masks)
        proc.eraser_input = None
        (weight * term).backward()
        total = total + term.detach()
    return total


class Unlearning:
    """Steps 4-8 on a pipeline whose prompts are encoded, everything on the transformer's device: made, it has
    attached the erasers (step 4), made the x_t source (step 5) and the optimizer; `step()` is one optimizer
    step of steps 5-8 on a random batch of prompts."""

    def __init__(self, args, pipe, embeds, tokens, log=print):
        self.args, self.transformer, device = args, pipe.transformer, pipe.transformer.device
        self.cond, self.anchor = embeds["concept"].to(device), embeds["anchor"].to(device)
        self.pre = embeds["preserve"].to(device)  # each prompt's c_pre
        resolve_defaults(pipe, args)
        shape = video_shape(pipe, args.num_frames, args.height, args.width)
        self.static, self.grid = model_inputs(pipe, shape, args.guidance), token_grid(self.transformer, shape)
        # Every draw of the run (x_t noise, prompts, steps) comes from one CPU generator seeded by --seed and moves
        # to the device after: a CUDA generator's stream is not the CPU's, so --seed is one run on every device.
        torch.manual_seed(args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        # 4. Attach the erasers, zero: the transformer is still the original model
        self.erasers, self.state = attach_erasers(self.transformer, args.rank, device)
        self.tokens = tokens.to(device)
        self.has_concept = self.tokens.sum(1) > 0
        if not self.has_concept.all():
            log(f"# 7. The concept's tokens are missing from {int((~self.has_concept).sum())} of {len(tokens)} "
                "prompts: their concept masks are all ones")
        # 5. Make the noisy latents x_t: the frozen model's trajectories of the concept prompts
        self.xt = NoisyLatents(args.xt, self.transformer, self.state, x_t_sampler(pipe, args.xt_steps, device),
                               self.cond, embeds["empty"].to(device), self.static, shape, args.guidance, self.gen)
        # 8. AdamW on the erasers alone, with gradient checkpointing of whole blocks
        self.transformer.enable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(self.erasers.parameters(), lr=args.lr)
        self.done = 0  # optimizer steps taken: which draws come next

    def step(self, timer=no_timer):
        """One optimizer step of steps 5-8; returns the loss terms. `timer(name)` times each part (bench.py)."""
        args, use_pre, use_loc = self.args, self.args.pres_weight > 0, self.args.loc_weight > 0
        idx, k = balanced_draws(args.seed, len(self.cond), len(self.xt.sampler.timesteps), args.batch_size,
                                self.done)
        self.done += 1
        with timer("x_t"):  # 5. x_t: step k of the batch's trajectories
            x_t, t = self.xt.draw(idx, k)
        idx = idx.to(self.cond.device)
        # Preservation at the same x_t (the paper's L_pre). Measured on the toy, c_pre at its own
        # trajectories' x_t erased red in two-square scenes far less (docs/experiments.md, section 1).
        c_pre = self.pre[idx] if use_pre else None
        with timer("teacher and masks"):
            # 6. Teacher velocities and the negatively guided target (Eq. 1)
            v_cond, v_anchor, v_pre, attention = teacher_pass(self.transformer, self.state, x_t, t, self.cond[idx],
                                                              self.anchor[idx], self.tokens[idx], self.static, c_pre)
            target = negative_guidance_target(v_cond, v_anchor, args.eta)
            # 7. Concept masks from the teacher's attention
            masks = [concept_mask(a, self.grid, args.mask_threshold, self.has_concept[idx]) for a in attention]
            del v_cond, v_anchor, attention
        with timer("student forward and backward"):
            # 8. L = L_unlearn + alpha * L_loc + beta * L_pre, backpropagated one term at a time (the gradient
            # is the sum of the terms'), so that only one term's graph is alive at once.
            self.opt.zero_grad(set_to_none=True)
            loss_unlearn = unlearn_loss(student_pass(self.transformer, self.state, x_t, t, self.cond[idx],
                                                     self.static, record=use_loc), target)
            loss_unlearn.backward()
            del target
            loss_loc = localization_backward(self.transformer, masks, args.loc_weight) if use_loc else torch.zeros(())
            loss_pre = torch.zeros(())
            if use_pre:
                loss_pre = preservation_loss(student_pass(self.transformer, self.state, x_t, t, c_pre, self.static),
                                             v_pre)
                (args.pres_weight * loss_pre).backward()
        with timer("optimizer"):
            self.opt.step()
        return dict(unlearn=loss_unlearn.item(), loc=float(loss_loc), pre=loss_pre.item())  # a GPU-CPU sync


def train(args, pipe, embeds, tokens, log=print, checkpoint=None):
    """Steps 4-8: the erasers trained for args.steps; returns them and the loss history.

    `checkpoint(unlearning, steps_done, history)` is called every args.checkpoint_every steps and on Ctrl-C
    (after the step under way); a non-finite loss stops the run at once (runs.run_steps).
    """
    u = Unlearning(args, pipe, embeds, tokens, log)
    start, history = 0, {"unlearn": [], "loc": [], "pre": []}
    if args.resume:
        start, history = restore_checkpoint(args.output_dir, result_settings(args), u.erasers, u.opt, u.gen)
        u.done = start
        log(f"# 8. Resumed from the checkpoint at step {start}")
    try:
        run_steps(u.step, start, args.steps, history, args.checkpoint_every or max(1, args.steps // 10),
                  checkpoint and functools.partial(checkpoint, u), args.output_dir)
    finally:
        u.transformer.disable_gradient_checkpointing()
    return u.erasers, history


def result_settings(args):
    """The settings that change the result: a run resumes only if they are as they were."""
    return {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite", "device", "resume",
                                                              "checkpoint_every", "steps")}


# -----------------------------------------------------------------------------
# 9. Save the eraser: weights (safetensors) and what they belong to (json), atomically

def model_fingerprint(transformer):
    """The transformer's config: an eraser fits only the architecture it was trained on."""
    return {k: v for k, v in transformer.config.items() if not k.startswith("_")}


def eraser_meta(args, transformer, steps_done, history, prompts):
    """eraser.json: every resolved setting, the base model's config, and how far training got."""
    return dict(vars(args), base_config=model_fingerprint(transformer), steps_done=steps_done,
                final=steps_done == args.steps, num_prompts_built=len(prompts), example_prompts=prompts[:5],
                last_losses={k: v[-1] for k, v in history.items() if v})


def save_eraser(output_dir, erasers, meta):
    """eraser.safetensors ({i}.down.weight, .down.bias, .up.weight, .up.bias for eraser i, in block order, fp32)
    and eraser.json (the base model's config, the concept, every setting as run)."""
    from safetensors.torch import save_file
    os.makedirs(output_dir, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in erasers.state_dict().items()}
    write_atomic(os.path.join(output_dir, "eraser.safetensors"), lambda p: save_file(weights, p))
    write_json(os.path.join(output_dir, "eraser.json"), meta)


def check_output_dir(args):
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir) and not (args.overwrite or args.resume):
        raise UserError(f"--output-dir {args.output_dir} already holds files; pass --overwrite or choose another")
    if args.overwrite:
        move_aside(args.output_dir)


# -----------------------------------------------------------------------------
# The method's outline

def main(argv=None):
    args = parse_args(argv)
    check_output_dir(args)
    rng = random.Random(args.seed)
    device = pick_device(args.device)
    args.device, args.dtype = str(device), str(pick_dtype(device, args.dtype)).removeprefix("torch.")  # as run

    # 1. Load the pipeline, into CPU memory: each part goes to the GPU only while it works
    pipe = load_base_pipeline(args.model, device, args.dtype, move=False)
    resolve_defaults(pipe, args)
    video_shape(pipe, args.num_frames, args.height, args.width)  # a size the model cannot serve: refused now
    print(f"# 1. Loaded {args.model} ({pipe.transformer.dtype}) for {device}; "
          f"videos of {args.num_frames} frames at {args.height}x{args.width}")

    # 2. Build augmented prompts
    prompts, anchors, preserved = run_prompts(args.output_dir, args.resume, lambda: build_prompts(args, rng, device))
    if not prompts:
        raise UserError(f"no prompt names '{args.concept}': check --prompts-file or drop --refiner")
    print(f"# 2. Built {len(prompts)} prompts that carry '{args.concept}', e.g.:")
    for i in range(0, len(prompts), -(-len(prompts) // 3)):  # three, spread over the concepts
        print(f"     c = {prompts[i]!r}\n       anchor = {anchors[i]!r}, c_pre = {preserved[i]!r}")

    # 3. Encode the prompts once, then free the text encoder
    tokens, embeds = encode_run_prompts(pipe, args.concepts, prompts, anchors, preserved, device)
    free_text_encoder_and_vae(pipe)
    pipe.transformer.to(device)
    print(f"# 3. Encoded {2 * len(prompts) + len(preserved) + 1} prompts; freed the text encoder and the VAE")

    # 4-8. The erasers, x_t, teacher velocities, concept masks, losses and AdamW, for --steps steps
    def checkpoint(u, steps_done, history):  # the partial eraser too, usable (with a warning) meanwhile
        save_prompts(args.output_dir, prompts, anchors, preserved)
        save_checkpoint(args.output_dir, steps_done, history, result_settings(args), u.erasers, u.opt, u.gen)
        save_eraser(args.output_dir, u.erasers, eraser_meta(args, pipe.transformer, steps_done, history, prompts))
    erasers, history = train(args, pipe, embeds, tokens, checkpoint=checkpoint)

    # 9. Save the eraser
    save_prompts(args.output_dir, prompts, anchors, preserved)
    save_eraser(args.output_dir, erasers, eraser_meta(args, pipe.transformer, args.steps, history, prompts))
    print(f"# 9. Saved the eraser to {args.output_dir}/eraser.safetensors "
          f"({sum(p.numel() for p in erasers.parameters()) / 1e6:.2f} M parameters)")


if __name__ == "__main__":
    run_cli(main)
