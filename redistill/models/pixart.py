"""Text-to-image latent transformers with a T5 text encoder: the PixArt-Σ layout (`transformer` =
`PixArtTransformer2DModel`, `vae` = `AutoencoderKL`, `text_encoder` = `T5EncoderModel` + its tokenizer, a
DDPM-family `scheduler`), sampled by the stock `PixArtSigmaPipeline` (Chen et al. 2024, "PixArt-Σ",
arXiv:2403.04692).

The conventions this adapter owns, so that no method sees them:
- **Prediction.** ε on the scheduler's ᾱ schedule (the diffusion family); a learned-variance transformer
  (`out_channels` = 2 × `in_channels`) also outputs Σ, and `output` returns the ε half, as the pipeline splits it.
- **Latents.** The VAE's latents times `scaling_factor`.
- **Prompts.** T5's last hidden states and their attention mask, `max_sequence_length` tokens (8, or the folder's
  `redistill_sampling.json`), as `encode_prompt` makes them without caption cleaning; the methods see one
  tensor per prompt, the states flattened and then the mask (`pack`/`unpack`).
- **Sampling.** `use_resolution_binning=False`: the pipeline otherwise snaps sizes to its aspect-ratio bins.
- **Guidance.** u + w·(c − u) under the empty prompt at the pipeline's default w = 4.5, folded into a student,
  which is sampled at guidance 1.
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter
from redistill.models.transformer_t2i import PackedPromptLatent


class PixArtLatent(PackedPromptLatent):
    kind = "pixart-latent"
    layouts = ("PixArtSigmaPipeline",)
    default_guidance = 4.5  # PixArtSigmaPipeline's default guidance_scale
    description = (
        "a PixArt-Σ layout folder (PixArtSigmaPipeline): PixArtTransformer2DModel, AutoencoderKL, a T5 text "
        "encoder and tokenizer, and a DDPM-family scheduler"
    )

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel

        return (
            isinstance(pipe, PixArtSigmaPipeline)
            and isinstance(getattr(pipe, "transformer", None), PixArtTransformer2DModel)
            and isinstance(getattr(pipe, "vae", None), AutoencoderKL)
            and getattr(pipe, "text_encoder", None) is not None
            and hasattr(getattr(pipe, "scheduler", None), "alphas_cumprod")
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def learned_sigma(self) -> bool:
        return int(self.unet.config.out_channels) == 2 * self.channels

    def facts(self) -> dict:
        return {
            **ModelAdapter.facts(self),
            "denoiser": type(self.unet).__name__,
            "patch_size": int(self.unet.config.patch_size),
            "learned_sigma": self.learned_sigma,
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "latent_channels": self.channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling_factor": float(self.pipe.vae.config.scaling_factor),
            "text_encoder": type(self.pipe.text_encoder).__name__,
            "max_sequence_length": self.max_sequence_length,
            "guidance_scale": self.guidance_scale,
        }

    # -- prompts → one tensor each ---------------------------------------------------------------------
    @torch.no_grad()
    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe.text_encoder.device,
        )
        return embeds, mask

    def pack(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, D) hidden states and their (N, L) mask → one (N, L·D + L) tensor."""
        return torch.cat([embeds.flatten(1), mask.to(embeds.dtype)], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = int(self.pipe.text_encoder.config.d_model)
        n, width = cond.shape
        length = width // (d + 1)
        return cond[:, : length * d].reshape(n, length, d), cond[:, length * d :].round().long()

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt: T5's hidden states averaged over the prompt's tokens."""
        embeds, mask = self._embeds(prompts)
        m = mask.unsqueeze(-1).float()
        return ((embeds.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu()

    # -- the network ----------------------------------------------------------------------------------
    def _call(self, net, z, t, cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        embeds, mask = self.unpack(cond.to(z.dtype))
        out = net(
            z,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t.expand(len(z)) if t.ndim == 0 else t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        return out[:, : z.shape[1]]  # the ε half of a learned-variance output

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        if cond is None:
            cond = self.draw_prompts(n, generator)
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        w = float(guidance_scale)
        packed = self.encode_prompts(list(cond)) if isinstance(cond, (list, tuple)) else cond
        embeds, mask = self.unpack(packed)
        kw = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if w > 1:
            u_embeds, u_mask = self.unpack(self.uncond(len(packed), packed.device))
            kw.update(negative_prompt=None, negative_prompt_embeds=u_embeds, negative_prompt_attention_mask=u_mask)
        h, wd = self.image_size
        return self.pipe(
            **kw,
            num_inference_steps=steps,
            guidance_scale=w,
            generator=generator,
            height=h,
            width=wd,
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            output_type="pt",
        ).images.float()

    def export(self, unet, scheduler):
        from diffusers import PixArtSigmaPipeline

        p = self.pipe
        pipe = PixArtSigmaPipeline(
            tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, transformer=unet, scheduler=scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.redistill_sampling = self.export_sampling()
        return pipe
