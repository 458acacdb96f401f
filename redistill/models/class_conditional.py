"""Class-conditional pixel-space teachers: a `UNet2DModel` with class embeddings (`num_class_embeds`) and a
DDPM-family scheduler, sampled by `ClassConditionalPipeline` (redistill/models/class_pipeline.py).

- Conditions are class labels, drawn uniformly over the teacher's classes for each training batch.
- Where the teacher was trained for classifier-free guidance (its pipeline names a `null_class`, the label it
  saw when the class was dropped), the teacher's output is the guided one at its `guidance_scale` w:
  u + w·(c − u). Every method distils that guided output, so the student needs one network call per step
  with the guidance folded in (guided distillation, Meng et al. 2023, "On Distillation of Guided Diffusion
  Models", arXiv:2210.03142); its export says `guidance_scale` 1.0 and `distilled_guidance_scale` w.
- A teacher saved as a plain `DDPMPipeline` folder whose UNet has class embeddings is served too (no null
  class known: sampled without guidance).
"""

from __future__ import annotations

import torch

from redistill.models.base import ModelAdapter
from redistill.models.class_pipeline import ClassConditionalPipeline, guided_output


class ClassConditionalPixel(ModelAdapter):
    kind = "class-conditional-pixel"
    layouts = ("ClassConditionalPipeline", "DDPMPipeline")
    description = (
        "a UNet2DModel with class embeddings (num_class_embeds) and a DDPM-family scheduler, in a "
        "ClassConditionalPipeline or a DDPMPipeline folder"
    )

    def __init__(self, pipe):
        super().__init__(pipe)
        if isinstance(pipe, ClassConditionalPipeline):
            self.runner = pipe
        else:  # a DDPMPipeline folder around a class-conditional UNet: sampled by the same loop, unguided
            self.runner = ClassConditionalPipeline(
                pipe.unet, pipe.scheduler, num_classes=int(pipe.unet.config.num_class_embeds)
            )
            self.runner.set_progress_bar_config(disable=True)

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import UNet2DModel

        unet = getattr(pipe, "unet", None)
        return (
            isinstance(unet, UNet2DModel)
            and getattr(unet, "class_embedding", None) is not None
            and getattr(unet.config, "num_class_embeds", None) is not None
            and hasattr(pipe, "scheduler")
            and hasattr(pipe.scheduler, "alphas_cumprod")
        )

    @property
    def conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return int(self.runner.config.num_classes)

    @property
    def null_class(self) -> int | None:
        return self.runner.config.null_class

    @property
    def guidance_scale(self) -> float:
        return float(self.runner.config.guidance_scale)

    def facts(self) -> dict:
        return {
            **super().facts(),
            "num_classes": self.num_classes,
            "null_class": self.null_class,
            "guidance_scale": self.guidance_scale,
            "distilled_guidance_scale": self.runner.config.get("distilled_guidance_scale"),
        }

    def conditions(self, n, generator, device="cpu"):
        return torch.randint(0, self.num_classes, (n,), generator=generator).to(device)

    def output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a class-conditional model needs class labels for every call")
        t = torch.as_tensor(t, device=z.device)
        return net(z, t.expand(len(z)) if t.ndim == 0 else t, class_labels=cond).sample

    def teacher_output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError("a class-conditional model needs class labels for every call")
        t = torch.as_tensor(t, device=z.device)  # one timestep per sample, as `output` passes them
        return guided_output(net, z, t.expand(len(z)) if t.ndim == 0 else t, cond, self.null_class, self.guidance_scale)

    @torch.no_grad()
    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        self.runner.scheduler = self.pipe.scheduler  # the evaluation may have swapped the sampler
        return self.runner(
            class_labels=cond,
            batch_size=n,
            generator=generator,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="pt",
        ).images.float()

    def export(self, unet, scheduler):
        pipe = ClassConditionalPipeline(
            unet,
            scheduler,
            num_classes=self.num_classes,
            null_class=self.null_class,
            guidance_scale=1.0,
            distilled_guidance_scale=self.guidance_scale,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
