"""Text-to-image flow-matching transformers: the Stable Diffusion 3 layout (`transformer` = `SD3Transformer2DModel`,
an MMDiT; `vae` = `AutoencoderKL` with a shift factor; two CLIP text encoders with projection and their tokenizers,
T5 optional; a `FlowMatchEulerDiscreteScheduler`), sampled by the stock `StableDiffusion3Pipeline` (Esser et al.
2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206).

The conventions this adapter owns, so that no method sees them:
- **Flow matching.** The path is x_σ = (1 − σ)·x₀ + σ·ε and the transformer predicts v = ε − x₀ at timestep σ·1000
  (the `flow` family: the methods' timesteps t are σ·T already).
- **Latents.** The VAE's latents, shifted then scaled: z = (latent − shift_factor)·scaling_factor; decoded as
  z / scaling_factor + shift_factor. H and W must be multiples of the VAE's factor × the patch size.
- **Prompts.** Each CLIP's penultimate hidden states, concatenated along the features and zero-padded to
  `joint_attention_dim`, then `max_sequence_length` zero tokens where T5 is absent, as `encode_prompt` makes
  them; the pooled projections of both CLIPs, concatenated. The methods see one tensor per prompt: the hidden
  states flattened, then the pooled vector (`pack`/`unpack`).
- **Guidance.** u + w·(c − u) with u under the empty prompt, as the pipeline's classifier-free guidance; a
  student is sampled at guidance 1 with the teacher's w folded in.
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter
from redistill.models.text_to_image import TextToImageLatent

SD3_GUIDANCE = 7.0  # StableDiffusion3Pipeline's default guidance_scale
T5_TOKENS = 8  # the zero tokens standing in for T5 when a folder has none (the pipeline's max_sequence_length)


class SD3Latent(TextToImageLatent):
    kind = "sd3-latent"
    layouts = ("StableDiffusion3Pipeline",)
    family = "flow"
    solver = "euler"
    description = (
        "a Stable Diffusion 3 layout folder (StableDiffusion3Pipeline): SD3Transformer2DModel, AutoencoderKL, two "
        "CLIP text encoders with projection (T5 optional) and a FlowMatchEulerDiscreteScheduler"
    )

    def __init__(self, pipe, guidance_scale: float | None = None):
        super().__init__(pipe, guidance_scale)
        if guidance_scale is None and not self.sampling:
            self.guidance_scale = SD3_GUIDANCE  # the pipeline's default, not SD 1.x's

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

        return (
            isinstance(pipe, StableDiffusion3Pipeline)
            and isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)
            and isinstance(getattr(pipe, "vae", None), AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "text_encoder_2", None) is not None
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (a transformer here; the name is the interface's)."""
        return self.pipe.transformer

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise ValueError(f"a {self.kind} model has no ᾱ schedule (it predicts a velocity on the straight path)")

    def noise_path(self):
        from redistill.models.prediction import StraightPath

        return StraightPath(self.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def max_sequence_length(self) -> int:
        """The zero tokens standing in for T5 (or T5's tokens, where the folder has it)."""
        return int(self.sampling.get("max_sequence_length", T5_TOKENS))

    def facts(self) -> dict:
        cfg = self.unet.config
        return {
            **ModelAdapter.facts(self),
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "latent_channels": self.channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": float(self.pipe.vae.config.scaling_factor),
            "text_encoder": type(self.pipe.text_encoder).__name__,
            "max_prompt_tokens": self.max_prompt_tokens,
            "guidance_scale": self.guidance_scale,
            "denoiser": type(self.unet).__name__,
            "patch_size": int(cfg.patch_size),
            "joint_attention_dim": int(cfg.joint_attention_dim),
            "pooled_projection_dim": int(cfg.pooled_projection_dim),
            "vae_shift_factor": float(self.pipe.vae.config.shift_factor or 0.0),
            "t5": self.pipe.text_encoder_3 is not None,
            "shift": float(self.scheduler_config.get("shift", 1.0)),
        }

    # -- pictures ↔ latents, prompts → one tensor each ------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256) -> torch.Tensor:
        vae = self.pipe.vae
        shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
        out = [vae.encode(x.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean for x in images.split(batch)]
        return (torch.cat(out).float() - shift) * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        vae = self.pipe.vae
        shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
        z = latents.to(vae.device, vae.dtype) / scale + shift
        return (torch.cat([vae.decode(x).sample for x in z.split(batch)]).float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(N, L, D) hidden states and (N, P) pooled projections → one (N, L·D + P) tensor."""
        return torch.cat([embeds.flatten(1), pooled], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, p = int(self.unet.config.joint_attention_dim), int(self.unet.config.pooled_projection_dim)
        n, width = cond.shape
        return cond[:, : width - p].reshape(n, (width - p) // d, d), cond[:, width - p :]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        cond = self.pack(*self._embeds(prompts))
        return cond.to(device if device is not None else cond.device)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt: the pooled projections of both CLIPs."""
        return self._embeds(prompts)[1].float().cpu()

    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        return 2 if guidance_scale > 1 else 1

    # -- the network ----------------------------------------------------------------------------------
    def guidance_embedding(self, net, n, w, device, dtype):
        return None  # an MMDiT has no guidance input (Flux does)

    def _call(self, net, z, t, cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        embeds, pooled = self.unpack(cond.to(z.dtype))
        return net(
            hidden_states=z,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t.expand(len(z)) if t.ndim == 0 else t,
        ).sample

    def output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("an SD3 model needs prompt embeddings for every call (adapter.conditions)")
        return self._call(net, z, t, cond)

    def teacher_output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("an SD3 model needs prompt embeddings for every call (adapter.conditions)")
        if self.guidance_scale == 1.0:
            return self._call(net, z, t, cond)
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        t = t.expand(len(z)) if t.ndim == 0 else t
        both = self._call(net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, self.uncond(len(z), z.device)]))
        c, u = both.chunk(2)
        return u + self.guidance_scale * (c - u)

    def uncond(self, n: int, device) -> torch.Tensor:
        if self._uncond is None or self._uncond.device != torch.device(device):
            self._uncond = self.encode_prompts([""], device)
        return self._uncond.expand(n, -1)

    def velocity(self, net, x, sigma, cond=None):
        return self.teacher_output(net, x, sigma.to(x.device).float() * self.num_train_timesteps, cond)

    def add_noise(self, x0, noise, t):
        sigma = (t.float() / self.num_train_timesteps).view(-1, 1, 1, 1).to(x0.device)
        return (1 - sigma) * x0 + sigma * noise

    @torch.no_grad()
    def ode_sample(self, net, x, steps, cond=None):
        """The teacher's own sampler from latents `x`: Euler on its scheduler's grid at `steps`, guided."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            x = sched.step(self.teacher_output(net, x, t.expand(len(x)).to(x.device), cond), t, x).prev_sample
        return x

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        if cond is None:
            cond = self.draw_prompts(n, generator)
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        w = float(guidance_scale)
        packed = self.encode_prompts(list(cond)) if isinstance(cond, (list, tuple)) else cond
        embeds, pooled = self.unpack(packed)
        kw = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if w > 1:
            u_embeds, u_pooled = self.unpack(self.uncond(len(packed), packed.device))
            kw.update(negative_prompt_embeds=u_embeds, negative_pooled_prompt_embeds=u_pooled)
        h, wd = self.image_size
        return self.pipe(
            **kw,
            num_inference_steps=steps,
            guidance_scale=w,
            generator=generator,
            height=h,
            width=wd,
            output_type="pt",
        ).images.float()

    def export(self, unet, scheduler):
        from diffusers import StableDiffusion3Pipeline

        p = self.pipe
        pipe = StableDiffusion3Pipeline(
            transformer=unet,
            scheduler=scheduler,
            vae=p.vae,
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            text_encoder_2=p.text_encoder_2,
            tokenizer_2=p.tokenizer_2,
            text_encoder_3=p.text_encoder_3,
            tokenizer_3=p.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.redistill_sampling = {**self.sampling, "max_sequence_length": self.max_sequence_length}
        return pipe
