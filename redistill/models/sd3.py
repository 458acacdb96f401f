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
from redistill.models.flow import StraightPathModel
from redistill.models.transformer_t2i import PackedPromptLatent


class SD3Latent(StraightPathModel, PackedPromptLatent):
    kind = "sd3-latent"
    layouts = ("StableDiffusion3Pipeline",)
    default_guidance = 7.0  # StableDiffusion3Pipeline's default guidance_scale
    description = (
        "a Stable Diffusion 3 layout folder (StableDiffusion3Pipeline): SD3Transformer2DModel, AutoencoderKL, two "
        "CLIP text encoders with projection (T5 optional) and a FlowMatchEulerDiscreteScheduler"
    )

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
    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt: the pooled projections of both CLIPs."""
        return self._embeds(prompts)[1].float().cpu()

    # -- the network ----------------------------------------------------------------------------------
    def _call(self, net, z, t, cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        embeds, pooled = self.unpack(cond.to(z.dtype))
        return net(
            hidden_states=z,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t.expand(len(z)) if t.ndim == 0 else t,
        ).sample

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        self.fit_grid(steps)
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
        with self.seeded_renoise(generator):
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
        pipe.redistill_sampling = self.export_sampling()
        return pipe
