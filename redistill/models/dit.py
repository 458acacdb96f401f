"""Class-conditional latent transformers: the DiT layout (`transformer` = `DiTTransformer2DModel`, `vae` =
`AutoencoderKL`, a DDPM-family `scheduler`), sampled by the stock `DiTPipeline` (Peebles & Xie 2023, "Scalable
Diffusion Models with Transformers", arXiv:2212.09748).

The conventions this adapter owns, so that no method sees them:
- **Latents.** The transformer works on the VAE's latents times `scaling_factor` (DiT has no shift factor):
  `channels` and `sample_size` are the latents', `image_channels` and `image_size` the pictures'.
- **Prediction.** ε on the scheduler's ᾱ schedule, at integer timesteps 0…T−1. A transformer trained with a
  learned variance (`out_channels` = 2 × `in_channels`) also outputs Σ channels; `output` returns the ε half,
  as `DiTPipeline` splits it, and every method distils that half (the student keeps the teacher's shape).
- **Classes and guidance.** `DiTPipeline` guides with the hard-coded null class 1000 (`num_embeds_ada_norm`,
  the extra row of the label table): u + w·(c − u) on ε at `guidance_scale` w (the pipeline's default 4.0).
  The teacher's output is that guided ε, so a student needs one call per step and is sampled at guidance 1
  (guided distillation, Meng et al. 2023). How many of the table's classes are real (10 for the digits,
  1000 for ImageNet) and the teacher's w come from the folder's `redistill_sampling.json` when it has one
  (`save_pretrained` keeps no `id2label`), else all `num_embeds_ada_norm` classes at w = 4.0.
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter
from redistill.models.text_to_image import folder_sampling, vae_decode, vae_encode

DIT_NULL_CLASS = 1000  # DiTPipeline's unconditional label, hard-coded in its __call__
DIT_GUIDANCE = 4.0  # DiTPipeline's default guidance_scale


class DiTLatent(ModelAdapter):
    kind = "dit-latent"
    layouts = ("DiTPipeline",)
    clips = False  # latents are not confined to [−1, 1]
    description = (
        "a DiT layout folder (DiTPipeline): DiTTransformer2DModel, AutoencoderKL and a DDPM-family scheduler, "
        "class-conditional"
    )

    def __init__(self, pipe, guidance_scale: float | None = None):
        super().__init__(pipe)
        self.sampling = folder_sampling(pipe)
        w = (
            guidance_scale
            if guidance_scale is not None
            else self.sampling.get("distilled_guidance_scale") or self.sampling.get("guidance_scale", DIT_GUIDANCE)
        )
        self.guidance_scale = float(w)

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

        return (
            isinstance(pipe, DiTPipeline)
            and isinstance(getattr(pipe, "transformer", None), DiTTransformer2DModel)
            and isinstance(getattr(pipe, "vae", None), AutoencoderKL)
            and hasattr(getattr(pipe, "scheduler", None), "alphas_cumprod")
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (a transformer here; the name is the interface's)."""
        return self.pipe.transformer

    @property
    def conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return int(self.sampling.get("num_classes") or self.unet.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_embeds_ada_norm)

    @property
    def learned_sigma(self) -> bool:
        return int(self.unet.config.out_channels) == 2 * self.channels

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

    def facts(self) -> dict:
        return {
            **super().facts(),
            "denoiser": type(self.unet).__name__,
            "patch_size": int(self.unet.config.patch_size),
            "learned_sigma": self.learned_sigma,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
            "guidance_scale": self.guidance_scale,
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "vae_scaling_factor": float(self.pipe.vae.config.scaling_factor),
        }

    # -- pictures ↔ latents -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → the scaled latents the transformer works on (the posterior's mean)."""
        return vae_encode(self.pipe.vae, images, batch)

    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Scaled latents → images in [0, 1], as `DiTPipeline` decodes them."""
        return vae_decode(self.pipe.vae, latents, batch)

    def to_model_space(self, images):
        return self.encode(images)

    # -- the network ----------------------------------------------------------------------------------
    def conditions(self, n, generator, device="cpu"):
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=generator.device).to(device)

    def _call(self, net, z, t, labels) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        out = net(z, timestep=t.expand(len(z)) if t.ndim == 0 else t, class_labels=labels).sample
        return out[:, : z.shape[1]]  # the ε half of a learned-variance output (DiTPipeline's split)

    def output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a DiT model needs class labels for every call")
        return self._call(net, z, t, cond)

    def teacher_output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a DiT model needs class labels for every call")
        if self.guidance_scale == 1.0:
            return self._call(net, z, t, cond)
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        both = self._call(
            net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, torch.full_like(cond, self.null_class)])
        )
        c, u = both.chunk(2)
        return u + self.guidance_scale * (c - u)

    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        """Transformer calls per sampling step: 2 under classifier-free guidance (the doubled batch), else 1."""
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        return 2 if guidance_scale > 1 else 1

    def draw_key(self) -> str:
        """What else than the seed decides a sample: the classes drawn from and the guidance (for sample caches)."""
        import hashlib
        import json

        key = [self.num_classes, self.guidance_scale, self.sampling]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        """`n` images in [0, 1] from the stock `DiTPipeline`: labels `cond`, else drawn uniformly with `generator`
        (before the pipeline draws its noise); at the folder's guidance (a student: 1.0), else the teacher's w."""
        if cond is None:
            cond = self.conditions(n, generator)
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        labels = [int(c) for c in torch.as_tensor(cond).tolist()]
        if float(guidance_scale) > 1 and self.null_class != DIT_NULL_CLASS:
            raise ValueError(
                f"DiTPipeline guides with the null class {DIT_NULL_CLASS}, but this transformer's null class is "
                f"{self.null_class} (num_embeds_ada_norm); sample it at guidance_scale 1"
            )
        out = self.pipe(
            class_labels=labels,
            guidance_scale=float(guidance_scale),
            generator=generator,
            num_inference_steps=steps,
            output_type="pt",
        ).images
        return out.float()

    def export(self, unet, scheduler):
        """A stock `DiTPipeline` around the student, sampled at guidance 1 with the teacher's w folded in."""
        from diffusers import DiTPipeline

        pipe = DiTPipeline(transformer=unet, vae=self.pipe.vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.redistill_sampling = {
            **self.sampling,
            "guidance_scale": 1.0,
            "distilled_guidance_scale": self.guidance_scale,
        }
        pipe.redistill_sampling["num_classes"] = self.num_classes
        return pipe
