"""Text-to-image latent teachers: the Stable Diffusion layout (`unet` = `UNet2DConditionModel`, `vae` =
`AutoencoderKL`, `text_encoder` + `tokenizer` = CLIP, a DDPM-family `scheduler`), sampled by the stock
`StableDiffusionPipeline`.

- The model works in the VAE's latent space: `channels` and `sample_size` are the latents' (what every method
  noises and denoises); `image_channels` and `image_size` are the pictures' (what the data and the evaluation
  see). `encode` takes images in [0, 1] to scaled latents, `decode` back.
- Conditions are prompts, encoded by the teacher's own text encoder into its hidden states (N, L, D): the
  tensor `output` passes to the UNet as `encoder_hidden_states` and `sample` passes to the pipeline as
  `prompt_embeds`. Training batches draw prompts from `prompts` (the representative set's captions, set by
  the caller with `use_prompts`).
- Classifier-free guidance (Ho & Salimans 2022): the teacher's output is u + w·(c − u) at `guidance_scale` w,
  u under the empty prompt's embedding, as `StableDiffusionPipeline` samples it. Every method distils that
  guided output, so the student needs one UNet call per step. A student UNet with a guidance embedding
  (`time_cond_proj_dim`, as LCM's) is given w through it (`guidance_embedding`, the pipeline's
  `get_guidance_scale_embedding`, fed w − 1 as `StableDiffusionPipeline` feeds it); one without has w folded
  in at the fixed scale. Either way the student is sampled at guidance 1: one UNet pass per step, where the
  teacher pays two.
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter

DEFAULT_PROMPTS = ("a picture",)  # the probe's prompt until the caller gives the data's captions
DEFAULT_GUIDANCE = 7.5  # StableDiffusionPipeline's default guidance_scale
SAMPLING_FILE = "redistill_sampling.json"  # in a pipeline folder: the guidance (and steps) it is sampled at


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] → the VAE posterior's mean, shifted then scaled as the latent pipelines scale
    it: (latent − shift_factor)·scaling_factor (no shift where the VAE has none, as SD 1.x's and DiT's)."""
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    out = [vae.encode(x.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean for x in images.split(batch)]
    return (torch.cat(out).float() - shift) * scale


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents → images in [0, 1], float (N, C, H, W): latents / scaling_factor + shift_factor, decoded."""
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    z = latents.to(vae.device, vae.dtype) / scale + shift
    return (torch.cat([vae.decode(x).sample for x in z.split(batch)]).float() / 2 + 0.5).clamp(0, 1)


def folder_sampling(pipe) -> dict:
    """What the folder the pipeline was loaded from says of its sampling (`SAMPLING_FILE`): a teacher's
    `guidance_scale`; a distilled student's `guidance_scale` 1.0, `distilled_guidance_scale` and
    `num_inference_steps`. Empty for a folder without one (StableDiffusionPipeline keeps no guidance setting)."""
    import json
    from pathlib import Path

    if getattr(pipe, "redistill_sampling", None):  # set on the pipeline (a student, or one loaded from its adapter)
        return dict(pipe.redistill_sampling)
    where = getattr(pipe.config, "_name_or_path", None) or ""
    f = Path(where) / SAMPLING_FILE if where else None
    if f is None or not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); write it again or delete it") from e
    return data if isinstance(data, dict) else {}


class TextToImageLatent(ModelAdapter):
    kind = "text-to-image-latent"
    layouts = ("StableDiffusionPipeline",)
    clips = False  # latents are not confined to [−1, 1]
    description = (
        "a Stable Diffusion layout folder: UNet2DConditionModel, AutoencoderKL, a CLIP text encoder and "
        "tokenizer, and a DDPM-family scheduler (StableDiffusionPipeline)"
    )

    def __init__(self, pipe, guidance_scale: float | None = None):
        super().__init__(pipe)
        self.prompts: list[str] = list(DEFAULT_PROMPTS)
        self.paired = False
        self.sampling = folder_sampling(pipe)
        # the teacher's w: given, else the folder's (a student: the scale folded into it), else SD's default
        w = (
            guidance_scale
            if guidance_scale is not None
            else self.sampling.get("distilled_guidance_scale") or self.sampling.get("guidance_scale", DEFAULT_GUIDANCE)
        )
        self.guidance_scale = float(w)
        self._uncond = None

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        return (
            isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)
            and isinstance(getattr(pipe, "vae", None), AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "tokenizer", None) is not None
            and hasattr(getattr(pipe, "scheduler", None), "alphas_cumprod")
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return True

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.pipe.vae.config.in_channels)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.sample_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def facts(self) -> dict:
        return {
            **super().facts(),
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "latent_channels": self.channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": float(self.pipe.vae.config.scaling_factor),
            "text_encoder": type(self.pipe.text_encoder).__name__,
            "max_prompt_tokens": self.max_prompt_tokens,
            "cross_attention_dim": int(self.unet.config.cross_attention_dim),
            "time_cond_proj_dim": self.unet.config.time_cond_proj_dim,
            "guidance_scale": self.guidance_scale,
        }

    # -- pictures ↔ latents, prompts → embeddings ---------------------------------------------------------
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → the scaled latents the UNet works on (the posterior's mean)."""
        return vae_encode(self.pipe.vae, images, batch)

    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Scaled latents → images in [0, 1], float (N, C, H, W)."""
        return vae_decode(self.pipe.vae, latents, batch)

    def to_model_space(self, images):
        return self.encode(images)

    def use_prompts(self, prompts: list[str], paired: bool = False) -> TextToImageLatent:
        """Training batches and unprompted samples draw from `prompts` (the representative set's captions).
        `paired`: prompts[i] is the caption of training image i, and `conditions_at` gives each image its own."""
        prompts = [p if isinstance(p, str) else "" for p in prompts]
        if not prompts:
            raise ValueError("a text-to-image model needs at least one prompt to draw from")
        self.prompts, self.paired = list(prompts), paired
        return self

    def conditions_at(self, index, n, generator, device="cpu"):
        if not self.paired:
            return self.conditions(n, generator, device)
        return self.encode_prompts([self.prompts[i] for i in index.tolist()], device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """The text encoder's last hidden states (N, L, D) of `prompts`, padded to the tokenizer's length, as
        `StableDiffusionPipeline.encode_prompt` makes them (truncated past `max_prompt_tokens`)."""
        enc = self.pipe.text_encoder
        hidden = enc(self._token_ids(prompts))[0]
        return hidden.to(device if device is not None else enc.device)

    def _token_ids(self, prompts: list[str]) -> torch.Tensor:
        """`prompts` tokenised as StableDiffusionPipeline does: padded to the tokenizer's length, truncated past it."""
        tok = self.pipe.tokenizer
        return tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.pipe.text_encoder.device)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt (N, D): the text encoder's pooled output (the end-of-text token's state), the
        prompt embedding drift and prompt-set comparisons use."""
        return self.pipe.text_encoder(self._token_ids(prompts)).pooler_output.float().cpu()

    def uncond(self, n: int, device) -> torch.Tensor:
        """The empty prompt's hidden states, `n` times (the unconditional branch of guidance)."""
        if self._uncond is None or self._uncond.device != torch.device(device):
            self._uncond = self.encode_prompts([""], device)
        return self._uncond.expand(n, -1, -1)

    def draw_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which of `prompts` a batch of `n` draws with `generator` (the first draw `sample` makes from it, so
        the evaluation can tell, from the seed alone, which prompt each sample was asked for)."""
        return torch.randint(0, len(self.prompts), (n,), generator=generator, device=generator.device).cpu()

    def draw_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        return [self.prompts[i] for i in self.draw_indices(n, generator).tolist()]

    def draw_key(self) -> str:
        """What else than the seed decides a sample: the prompt set and the guidance (for sample caches)."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps([self.prompts, self.guidance_scale, self.sampling]).encode()).hexdigest()[:16]

    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        """UNet calls per sampling step: 2 under classifier-free guidance (the doubled batch), else 1."""
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        return 2 if guidance_scale > 1 and getattr(self.unet.config, "time_cond_proj_dim", None) is None else 1

    def conditions(self, n, generator, device="cpu"):
        return self.encode_prompts(self.draw_prompts(n, generator), device)

    # -- the network ----------------------------------------------------------------------------------
    def guidance_embedding(self, net, n: int, w: float, device, dtype) -> torch.Tensor | None:
        """LCM's guidance-scale embedding of w for a UNet with `time_cond_proj_dim` (None for one without), as
        `StableDiffusionPipeline` computes it from `guidance_scale` (it embeds w − 1)."""
        dim = getattr(net.config, "time_cond_proj_dim", None)
        if dim is None:
            return None
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

        w_in = torch.full((n,), w - 1.0)
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(self.pipe, w_in, embedding_dim=dim)
        return emb.to(device=device, dtype=dtype)

    def output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a text-to-image model needs prompt embeddings for every call (adapter.conditions)")
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        emb = self.guidance_embedding(net, len(z), self.guidance_scale, z.device, z.dtype)
        return net(z, t, encoder_hidden_states=cond.to(z.dtype), timestep_cond=emb).sample

    def teacher_output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a text-to-image model needs prompt embeddings for every call (adapter.conditions)")
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        if self.guidance_scale == 1.0:
            return net(z, t, encoder_hidden_states=cond.to(z.dtype)).sample
        both = net(
            torch.cat([z, z]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond, self.uncond(len(z), cond.device)]).to(z.dtype),
        ).sample
        c, u = both.chunk(2)
        return u + self.guidance_scale * (c - u)

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        """`n` images in [0, 1] from `StableDiffusionPipeline` (the VAE decode included). `cond`: prompt strings,
        or their hidden states from `conditions`; None draws from `prompts`. `guidance_scale` defaults to the
        adapter's (the teacher's w); a distilled student is sampled at 1.0."""
        if cond is None:
            cond = self.draw_prompts(n, generator)
        if guidance_scale is None:  # the folder's own (a student: 1.0, or its embedded w), else the teacher's w
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        w = float(guidance_scale)
        kw = (
            {"prompt": list(cond)}
            if isinstance(cond, (list, tuple))
            else {
                "prompt_embeds": cond,
                "negative_prompt_embeds": self.uncond(len(cond), cond.device) if w > 1 else None,
            }
        )
        size = self.image_size
        out = self.pipe(
            **kw,
            num_inference_steps=steps,
            guidance_scale=w,
            generator=generator,
            height=size[0],
            width=size[1],
            output_type="pt",
        ).images
        return out.float()

    def export(self, unet, scheduler):
        from diffusers import StableDiffusionPipeline

        p = self.pipe
        pipe = StableDiffusionPipeline(
            vae=p.vae,
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
