"""Text-to-image flow-matching transformers with embedded guidance: the Flux layout (`transformer` =
`FluxTransformer2DModel`; `vae` = `AutoencoderKL` with a shift factor; a CLIP text encoder for the pooled vector
and a T5 encoder for the sequence; a `FlowMatchEulerDiscreteScheduler` with dynamic shifting), sampled by the
stock `FluxPipeline` (Black Forest Labs' FLUX.1).

The conventions this adapter owns, so that no method sees them:
- **Flow matching.** x_σ = (1 − σ)·x₀ + σ·ε; the transformer predicts v = ε − x₀ and takes its timestep as
  σ = t/1000 (the methods' t is σ·T).
- **Latent packing.** The methods see the VAE's latents (N, C, h, w), shifted then scaled; the transformer sees
  them packed 2×2 into tokens (N, h/2·w/2, 4C) with their position ids, as `FluxPipeline` packs them; `output`
  packs, calls and unpacks.
- **Guidance.** Guidance-distilled: the guidance scale w is an input of the transformer (`guidance_embeds`), one
  pass per step; the teacher's output is at its w (the pipeline's default 3.5) and the student learns the same,
  fed the same w. (True classifier-free guidance with a negative prompt is not used.)
- **The teacher's sampler.** Euler at σ = 1, (N−1)/N, …, 1/N, shifted by μ from the image's token count
  (`use_dynamic_shifting`), as the pipeline samples; a student samples its own σ unshifted (shift 1).
- **Prompts.** T5's hidden states (`max_sequence_length`, 8 or the folder's) and CLIP's pooled output, packed into
  one tensor per prompt (`pack`/`unpack`).
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter
from redistill.models.flow import StraightPathModel
from redistill.models.transformer_t2i import PackedPromptLatent


class FluxLatent(StraightPathModel, PackedPromptLatent):
    kind = "flux-latent"
    layouts = ("FluxPipeline",)
    default_guidance = 3.5  # FluxPipeline's default guidance_scale
    description = (
        "a Flux layout folder (FluxPipeline): FluxTransformer2DModel, AutoencoderKL, a CLIP and a T5 text encoder "
        "and a FlowMatchEulerDiscreteScheduler"
    )

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

        return (
            isinstance(pipe, FluxPipeline)
            and isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)
            and isinstance(getattr(pipe, "vae", None), AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "text_encoder_2", None) is not None
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def sample_size(self) -> tuple[int, int]:
        size = int(self.sampling.get("image_size", self.pipe.vae.config.sample_size))
        return size // self.vae_scale_factor, size // self.vae_scale_factor

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.unet.config.guidance_embeds)

    def facts(self) -> dict:
        c = self.scheduler_config
        return {
            **ModelAdapter.facts(self),
            "denoiser": type(self.unet).__name__,
            "guidance_embeds": self.guidance_embedded,
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "latent_channels": self.channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": float(self.pipe.vae.config.scaling_factor),
            "vae_shift_factor": float(self.pipe.vae.config.shift_factor or 0.0),
            "max_sequence_length": self.max_sequence_length,
            "use_dynamic_shifting": bool(c.get("use_dynamic_shifting")),
            "guidance_scale": self.guidance_scale,
        }

    # -- pictures ↔ latents, prompts → one tensor each ------------------------------------------------------
    @torch.no_grad()
    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt: CLIP's pooled output."""
        return self._embeds(prompts)[1].float().cpu()

    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        return 1  # the guidance is an input, not a second pass

    # -- the network ----------------------------------------------------------------------------------
    def _pack_latents(self, z: torch.Tensor) -> torch.Tensor:
        n, c, h, w = z.shape
        return z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

    def _unpack_latents(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, _, d = x.shape
        return x.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)

    def _call(self, net, z, t, cond) -> torch.Tensor:
        from diffusers import FluxPipeline

        n, _, h, wd = z.shape
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        t = t.expand(n) if t.ndim == 0 else t
        embeds, pooled = self.unpack(cond.to(z.dtype))
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, wd // 2, z.device, z.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=z.device, dtype=z.dtype)
        guidance = (
            torch.full((n,), self.guidance_scale, device=z.device, dtype=torch.float32)
            if net.config.guidance_embeds
            else None
        )
        out = net(
            hidden_states=self._pack_latents(z),
            timestep=t.to(z.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        return self._unpack_latents(out, h, wd)

    def teacher_output(self, net, z, t, cond=None):
        return self.output(net, z, t, cond)  # guidance-distilled: w is an input of the one pass

    def _mu(self) -> float | None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler_config
        if not c.get("use_dynamic_shifting"):
            return None
        h, w = self.sample_size
        return calculate_shift(
            (h // 2) * (w // 2),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    @torch.no_grad()
    def ode_sample(self, net, x, steps, cond=None):
        """The teacher's own sampler from latents `x`: Euler at σ = 1, …, 1/steps shifted by μ, as FluxPipeline."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self._mu())
        for t in sched.timesteps:
            x = sched.step(self.teacher_output(net, x, t.expand(len(x)).to(x.device), cond), t, x).prev_sample
        return x

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        self.fit_grid(steps)
        if cond is None:
            cond = self.draw_prompts(n, generator)
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        packed = self.encode_prompts(list(cond)) if isinstance(cond, (list, tuple)) else cond
        embeds, pooled = self.unpack(packed)
        h, wd = self.image_size
        with self.seeded_renoise(generator):
            return self.pipe(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                num_inference_steps=steps,
                guidance_scale=float(guidance_scale),
                generator=generator,
                height=h,
                width=wd,
                max_sequence_length=self.max_sequence_length,
                output_type="pt",
            ).images.float()

    def export(self, unet, scheduler):
        from diffusers import FluxPipeline

        p = self.pipe
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=p.vae,
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            text_encoder_2=p.text_encoder_2,
            tokenizer_2=p.tokenizer_2,
            transformer=unet,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.redistill_sampling = {**self.export_sampling(), "image_size": self.image_size[0]}
        return pipe
