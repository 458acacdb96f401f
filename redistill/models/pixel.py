"""Unconditional pixel-space teachers: a `UNet2DModel` (1 or 3 channels, any size diffusers supports) with a
DDPM-family scheduler, sampled by the stock `DDPMPipeline`. The embedded digits teacher is one of these.
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter


class UnconditionalPixel(ModelAdapter):
    kind = "unconditional-pixel"
    layouts = ("DDPMPipeline", "DDIMPipeline")
    description = "a UNet2DModel without class embeddings and a DDPM-family scheduler, e.g. a DDPMPipeline"
    pairs_from_samples = True  # DDPMPipeline with DDIM: noise drawn from the generator, η = 0, x₀ clipped to [−1, 1]

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import UNet2DModel

        unet = getattr(pipe, "unet", None)
        return (
            isinstance(unet, UNet2DModel)
            and getattr(unet, "class_embedding", None) is None
            and hasattr(pipe, "scheduler")
            and hasattr(pipe.scheduler, "alphas_cumprod")
        )

    def output(self, net, z, t, cond=None):
        return net(z, t).sample

    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        return self.pipe(batch_size=n, generator=generator, num_inference_steps=steps, output_type="pt").images.float()

    def export(self, unet, scheduler):
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=unet, scheduler=scheduler)
