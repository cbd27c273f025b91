"""families.py: what differs between the video models unlearn.py serves, and nothing else.

The method (unlearn.py) is the same for every model; only these facts are not, one class per family:

  check        what the steps cannot serve (image-to-video, two-expert Wan 2.2 A14B), in one line
  size         the video size the model was made for, its latent shape, its video tokens' grid
  text         how prompts are encoded (`encode`) and where a prompt's characters sit among the
               tokens the transformer reads (`token_texts`)
  velocity     how the transformer is called, what it predicts, and how the pipeline guides it
  sampler      the pipeline's own sampler that makes x_t, and how a clean latent is noised to its steps
  erasers      the attention modules that carry an eraser (`sites`), their stock processor,
               and the queries and keys their concept attention is read from (`queries_and_keys`)

                 CogVideoX (2B, 5B, 1.5)     Wan 2.1 / 2.2                HunyuanVideo
  predicts       v (v-prediction, DDPM)      flow velocity eps - x0       flow velocity eps - x0
  guidance       classifier-free             classifier-free              embedded (`guidance` input)
  erasers on     attn1's video output        attn2 (cross-attention)      single-stream blocks' attention,
                 (joint text-video attn)     output, where text enters    video part (the authors' choice)
"""

import copy
import inspect
import math

import numpy as np
import torch

from runs import UserError


class Text:
    """A batch of encoded prompts: the transformer's text inputs by name, batch first. Indexed, moved and
    concatenated as one tensor would be, whatever the family's text inputs are."""

    def __init__(self, **inputs):
        self.inputs = inputs

    def __len__(self):
        return len(self.inputs["encoder_hidden_states"])

    def __getitem__(self, idx):
        return Text(**{k: v[idx] for k, v in self.inputs.items()})

    def to(self, device):
        return Text(**{k: v.to(device) for k, v in self.inputs.items()})

    def expand(self, n):  # one prompt's embeddings as n rows, without a copy
        return Text(**{k: v.expand(n, *v.shape[1:]) for k, v in self.inputs.items()})

    @staticmethod
    def cat(texts):
        return Text(**{k: torch.cat([t.inputs[k] for t in texts]) for k in texts[0].inputs})

    @property
    def device(self):
        return self.inputs["encoder_hidden_states"].device

    @property
    def shape(self):  # the embeddings' (N, L, D)
        return self.inputs["encoder_hidden_states"].shape


def call_default(pipe, name):
    """The pipeline's own default for a call argument (its video size, its text length)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


class Family:
    """What every family shares; each subclass names the rest."""
    pipeline = transformer = ""  # diffusers class names
    default_guidance = 6.0
    text_encoders = ("text_encoder",)  # pipeline components that encode prompts (step 3)
    encoder_width, text_width = "d_model", "text_embed_dim"  # config keys: the text encoder's, the transformer's

    # check
    def check(self, pipe, model):
        cfg = pipe.transformer.config
        if cfg.in_channels != (cfg.out_channels or cfg.in_channels):
            raise UserError(f"'{model}' is an image-to-video model (it reads {cfg.in_channels} latent channels, "
                            f"draws {cfg.out_channels}); unlearn.py serves text-to-video pipelines")
        encoder = getattr(pipe.text_encoder.config, self.encoder_width, None) if pipe.text_encoder is not None else None
        transformer = pipe.transformer.config[self.text_width]
        if encoder is not None and encoder != transformer:
            raise UserError(f"'{model}': its text encoder gives {encoder}-wide embeddings, its transformer reads "
                            f"{transformer}: not a pipeline that can run")

    # size
    def latent_frames(self, pipe, num_frames, multiple):
        if (num_frames - 1) % pipe.vae_scale_factor_temporal:
            raise UserError(f"--num-frames {num_frames}: must be 1 + a multiple of {pipe.vae_scale_factor_temporal}")
        frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return frames + (-frames) % multiple

    def check_pixels(self, height, width, multiple):
        if height % multiple or width % multiple:
            raise UserError(f"--height/--width {height}x{width}: both must be multiples of {multiple}")

    # text
    def token_texts(self, pipe, prompts):
        """What the tokenizer reads for each prompt, the character span of the prompt in it, the length it is
        tokenized to, and how many leading tokens are cropped before the transformer reads them."""
        return list(prompts), [(0, len(p)) for p in prompts], self.text_length(pipe), 0

    def encode(self, pipe, prompts, device):
        """The prompts as the transformer reads them (a T5-style encoder: CogVideoX's T5, Wan's UMT5)."""
        embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                    max_sequence_length=self.text_length(pipe), dtype=pipe.transformer.dtype)[0]
        return Text(encoder_hidden_states=embeds)

    # velocity
    def latent_dtype(self, transformer):
        """The dtype x_t stays in between sampling steps, as the pipeline keeps its latents."""
        return transformer.dtype

    def velocity(self, transformer, x, t, text, static):
        """The transformer's prediction at x (B, *latent shape), t (B,), for `text`: one forward pass."""
        return transformer(hidden_states=x.to(transformer.dtype), timestep=t, **text.inputs, **static,
                           return_dict=False)[0]

    def guided_velocity(self, transformer, x, t, cond, uncond, static, guidance):
        """The velocity the pipeline samples with: classifier-free guidance, [uncond; cond] in one batch."""
        v = self.velocity(transformer, torch.cat([x, x]), torch.cat([t, t]),
                          Text.cat([uncond.expand(len(x)), cond]), static)
        v_uncond, v_cond = v.float().chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    def static_inputs(self, pipe, shape, guidance):
        """Transformer inputs that depend only on the video size (and the guidance): made once per run."""
        return {}

    def negative_prompt(self, text):
        """The pipeline call's arguments for the negative-prompt baseline (sample.py --eval)."""
        return {"negative_prompt": text}

    # erasers
    def stock_processor(self):
        raise NotImplementedError


class FlowEuler:
    """Euler on the pipeline's own flow schedule: its scheduler's sigmas (1 to 0, with its shift) and
    timesteps for `steps` steps, set as the pipeline sets them, and x <- x + (sigma_next - sigma) v,
    where the model predicts v = eps - x0. The pipeline's scheduler itself is left as it was."""

    def __init__(self, scheduler, steps, device=None, **set_timesteps):
        schedule = copy.deepcopy(scheduler)
        schedule.set_timesteps(None if "sigmas" in set_timesteps else steps, device=device, **set_timesteps)
        self.sigmas = schedule.sigmas.to(device, torch.float32)  # steps + 1 of them, the last 0
        self.timesteps = schedule.timesteps.to(device)

    def step(self, v, t, x, return_dict=False):
        i = int((self.timesteps == t).nonzero()[0])  # a CPU-GPU sync, once per sampling step
        return ((x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * v.float()).to(x.dtype),)


def heads_first(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, H * d) -> (B, H, N, d)


class CogVideoX(Family):
    """CogVideoX 2B, 5B and 1.5: v-prediction; text and video share attn1, text first; the eraser acts on
    attn1's video output after to_out, before the block's gated residual (the authors' place)."""
    pipeline, transformer = "CogVideoXPipeline", "CogVideoXTransformer3DModel"

    def text_length(self, pipe):  # 226 for every CogVideoX
        return pipe.transformer.config.max_text_seq_length

    def native_size(self, pipe):
        cfg, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
        height, width = cfg.sample_height * s, cfg.sample_width * s
        if cfg.patch_size_t:  # CogVideoX 1.5: its sample size (300 latents: 2400 px) bounds its RoPE grid, it is
            height, width = min(768, height), min(1360, width)  # not a video size; its model card's size, within it
        return cfg.sample_frames, height, width

    def latent_shape(self, pipe, num_frames, height, width):  # (F', C, H', W')
        cfg, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
        frames = self.latent_frames(pipe, num_frames, cfg.patch_size_t or 1)  # 1.5 pads to its temporal patch
        self.check_pixels(height, width, s * cfg.patch_size)
        return frames, cfg.in_channels, height // s, width // s

    def token_grid(self, config, shape):
        frames, _, h, w = shape
        return frames // (config.patch_size_t or 1), h // config.patch_size, w // config.patch_size

    def static_inputs(self, pipe, shape, guidance):
        """RoPE's (cos, sin), as the pipeline makes them; none for sin-cos models (2B)."""
        if not pipe.transformer.config.use_rotary_positional_embeddings:
            return {}
        s = pipe.vae_scale_factor_spatial
        return {"image_rotary_emb": pipe._prepare_rotary_positional_embeddings(
            shape[2] * s, shape[3] * s, shape[0], pipe.transformer.device)}

    def sampler(self, scheduler, steps, device=None):
        """DDIM on the pipeline's own schedule, whichever sampler it ships (the DPM one's step takes other
        arguments)."""
        from diffusers import CogVideoXDDIMScheduler
        ddim = CogVideoXDDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(steps, device=device)
        return ddim

    def noised(self, sampler, x0, noise, k):
        """x_t at the sampler's steps k (B,) from clean latents x0, its timesteps, and the v the model should
        predict there: x_t = sqrt(a) x0 + sqrt(1 - a) eps, v = sqrt(a) eps - sqrt(1 - a) x0, a = alphas_cumprod[t]."""
        t = sampler.timesteps[k]
        a = sampler.alphas_cumprod[t.long().cpu()].to(x0.device, torch.float32).view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, a.sqrt() * noise - (1 - a).sqrt() * x0

    def sites(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def stock_processor(self):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        return CogVideoXAttnProcessor2_0()

    def queries_and_keys(self, attn, video, text, mask, rotary):
        """Video queries and text keys as attn1 makes them: after QK-norm, RoPE on the video only."""
        q, k = heads_first(attn.to_q(video), attn.heads), heads_first(attn.to_k(text), attn.heads)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q = apply_rotary_emb(q, rotary)
        return q, k, None


class Flow(Family):
    """Flow-matching families: they predict v = eps - x0 and sample by Euler on their shifted sigmas."""

    def latent_dtype(self, transformer):  # WanPipeline and HunyuanVideoPipeline step fp32 latents, cast for the model
        return torch.float32

    def native_size(self, pipe):  # the pipeline's own defaults: no config holds them
        return call_default(pipe, "num_frames"), call_default(pipe, "height"), call_default(pipe, "width")

    def text_length(self, pipe):
        return call_default(pipe, "max_sequence_length")

    def sampler(self, scheduler, steps, device=None):  # WanPipeline sets its scheduler's own steps
        return FlowEuler(scheduler, steps, device)

    def noised(self, sampler, x0, noise, k):
        """x_t at the sampler's steps k (B,) from clean latents x0, its timesteps, and the velocity the model should
        predict there: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0."""
        sigma = sampler.sigmas[k].to(x0.device).view(-1, *[1] * (x0.dim() - 1))
        return (1 - sigma) * x0 + sigma * noise, sampler.timesteps[k], noise - x0


class Wan(Flow):
    """Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 TI2V-5B: text enters only through each block's cross-attention
    attn2 (queries: video, keys: UMT5 text, zero-padded to 512, not masked), so that is where the eraser
    sits, on attn2's output; its concept map is the cross-attention itself."""
    pipeline, transformer = "WanPipeline", "WanTransformer3DModel"
    default_guidance = 5.0
    text_width = "text_dim"

    def check(self, pipe, model):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise UserError(f"'{model}' is Wan 2.2 A14B: two transformers, each denoising its own noise levels "
                            "split by boundary_ratio; unlearn.py trains erasers into one. Erase from Wan 2.1 T2V or "
                            "Wan 2.2 TI2V-5B")
        if pipe.transformer.config.image_dim is not None:
            raise UserError(f"'{model}' is an image-to-video model; unlearn.py serves text-to-video pipelines")
        super().check(pipe, model)

    def latent_shape(self, pipe, num_frames, height, width):  # (C, F', H', W')
        cfg, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
        frames = self.latent_frames(pipe, num_frames, cfg.patch_size[0])
        self.check_pixels(height, width, s * cfg.patch_size[1])
        return cfg.in_channels, frames, height // s, width // s

    def token_grid(self, config, shape):
        return tuple(n // p for n, p in zip(shape[1:], config.patch_size))

    def token_texts(self, pipe, prompts):
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the pipeline tokenizes cleaned text
        texts = [prompt_clean(p) for p in prompts]
        return texts, [(0, len(t)) for t in texts], self.text_length(pipe), 0

    def static_inputs(self, pipe, shape, guidance):
        # Wan 2.2 TI2V-5B reads a timestep per video token (`expand_timesteps`): all equal for text-to-video
        if not pipe.config.get("expand_timesteps"):
            return {}
        return {"tokens_per_video": math.prod(self.token_grid(pipe.transformer.config, shape))}

    def velocity(self, transformer, x, t, text, static):
        if "tokens_per_video" in static:
            t = t[:, None].expand(-1, static["tokens_per_video"])
        return transformer(hidden_states=x.to(transformer.dtype), timestep=t, **text.inputs, return_dict=False)[0]

    def sites(self, transformer):
        return [(f"blocks.{i}.attn2", b.attn2) for i, b in enumerate(transformer.blocks)]

    def stock_processor(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
        return WanAttnProcessor()

    def queries_and_keys(self, attn, video, text, mask, rotary):
        """attn2's queries and keys, after its RMS norms (across heads); no RoPE in cross-attention."""
        return heads_first(attn.norm_q(attn.to_q(video)), attn.heads), \
            heads_first(attn.norm_k(attn.to_k(text)), attn.heads), None


class HunyuanVideo(Flow):
    """HunyuanVideo: 20 double-stream blocks (video and text apart, joint attention), then 40 single-stream
    blocks over one sequence, video first, text last (Llama, 256 tokens, padding masked; CLIP pooled).
    The erasers sit on the video part of every single-stream block's attention output, before the block
    merges it with its MLP in proj_out: the authors' choice, so that their released erasers load. None on
    the double-stream blocks: the single-stream blocks alone see text and video through shared weights,
    and the released erasers leave the double-stream blocks untouched, as this does. Guidance is embedded:
    the `guidance` input (scale x 1000), true classifier-free guidance off, as the stock pipeline runs."""
    pipeline, transformer = "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel"
    text_encoders = ("text_encoder", "text_encoder_2")
    encoder_width = "hidden_size"  # Llama's

    def latent_shape(self, pipe, num_frames, height, width):  # (C, F', H', W')
        cfg, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
        frames = self.latent_frames(pipe, num_frames, cfg.patch_size_t)
        self.check_pixels(height, width, s * cfg.patch_size)
        return cfg.in_channels, frames, height // s, width // s

    def token_grid(self, config, shape):
        _, frames, h, w = shape
        return frames // config.patch_size_t, h // config.patch_size, w // config.patch_size

    def token_texts(self, pipe, prompts):
        """The pipeline puts each prompt in its Llama chat template, tokenizes 256 + crop_start tokens, and
        crops the template's first crop_start tokens."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as template
        start = template["template"].index("{}")
        return [template["template"].format(p) for p in prompts], [(start, start + len(p)) for p in prompts], \
            self.text_length(pipe) + template["crop_start"], template["crop_start"]

    def encode(self, pipe, prompts, device):
        embeds, pooled, mask = pipe.encode_prompt(prompts, device=device, dtype=pipe.transformer.dtype,
                                                  max_sequence_length=self.text_length(pipe))
        return Text(encoder_hidden_states=embeds, encoder_attention_mask=mask, pooled_projections=pooled)

    def static_inputs(self, pipe, shape, guidance):
        transformer = pipe.transformer
        return {"guidance": torch.tensor(guidance * 1000.0, dtype=transformer.dtype, device=transformer.device)}

    def velocity(self, transformer, x, t, text, static):
        return transformer(hidden_states=x.to(transformer.dtype), timestep=t,
                           guidance=static["guidance"].expand(len(x)), **text.inputs, return_dict=False)[0]

    def guided_velocity(self, transformer, x, t, cond, uncond, static, guidance):
        return self.velocity(transformer, x, t, cond, static).float()  # the guidance is an input: one pass

    def negative_prompt(self, text):  # the stock pipeline reads a negative prompt only with true CFG on
        return {} if text is None else {"negative_prompt": text, "true_cfg_scale": 6.0}

    def sampler(self, scheduler, steps, device=None):  # HunyuanVideoPipeline passes these sigmas
        return FlowEuler(scheduler, steps, device, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])

    def sites(self, transformer):
        return [(f"single_transformer_blocks.{i}.attn", b.attn)
                for i, b in enumerate(transformer.single_transformer_blocks)]

    def stock_processor(self):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        return HunyuanVideoAttnProcessor2_0()

    def queries_and_keys(self, attn, video, text, mask, rotary):
        """The single-stream attention's video queries (QK-norm, then RoPE) and text keys (QK-norm), and which
        text keys are not padding: the mask over the joint sequence (B, 1, 1, N_video + L), its text part."""
        q, k = attn.to_q(video).unflatten(-1, (attn.heads, -1)), attn.to_k(text).unflatten(-1, (attn.heads, -1))
        q, k = attn.norm_q(q), attn.norm_k(k)  # (B, N, H, d): this processor's layout
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), None if mask is None else mask[:, 0, 0, -text.shape[1]:]


FAMILIES = [CogVideoX(), Wan(), HunyuanVideo()]


def family_of(obj):
    """The family of a pipeline (or anything called like one), a transformer or a transformer config."""
    name = obj.get("_class_name") if isinstance(obj, dict) else type(obj).__name__
    for family in FAMILIES:
        if name in (family.pipeline, family.transformer):
            return family
    if getattr(obj, "transformer", None) is not None:  # a wrapper of a pipeline: by its transformer
        return family_of(obj.transformer)
    known = ", ".join(f.pipeline for f in FAMILIES)
    raise UserError(f"{name} is not a pipeline unlearn.py serves; it serves {known} (text-to-video)")
