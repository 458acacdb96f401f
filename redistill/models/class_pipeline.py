"""A class-conditional image pipeline for `UNet2DModel`s with class embeddings, with classifier-free guidance.

This file imports only torch and diffusers, so an exported student folder carries a copy of it
(`pipeline_redistill.py`) and anyone can load the folder without redistill:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("student/", trust_remote_code=True)
    images = pipe(class_labels=[0, 3], num_inference_steps=4).images

redistill itself never runs the copy inside a folder: it loads such folders with this class.

Guidance (Ho & Salimans 2022): with `null_class` set (the label the teacher was trained with when the class was
dropped), each step calls the network on the class and on `null_class` and uses u + w·(c − u) at
`guidance_scale` w. A distilled student has the guidance folded in (guided distillation, Meng et al. 2023):
its folder says `guidance_scale` 1.0 and `distilled_guidance_scale` w.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def guided_output(
    unet, sample: torch.Tensor, t, class_labels: torch.Tensor, null_class: int | None, guidance_scale: float
) -> torch.Tensor:
    """`unet`'s output for `class_labels` at `t` (one timestep, or one per sample), guided u + w·(c − u) when
    `guidance_scale` w ≠ 1 and a null class is set: one call on the class and the null class together."""
    if null_class is None or guidance_scale == 1.0:
        return unet(sample, t, class_labels=class_labels).sample
    if torch.is_tensor(t) and t.ndim == 1:  # a timestep per sample: one for each half
        t = torch.cat([t, t])
    both = unet(
        torch.cat([sample, sample]),
        t,
        class_labels=torch.cat([class_labels, torch.full_like(class_labels, null_class)]),
    ).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class ClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet,
        scheduler,
        num_classes: int | None = None,
        null_class: int | None = None,
        guidance_scale: float = 1.0,
        distilled_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if num_classes is None:
            num_classes = int(unet.config.num_class_embeds) - (1 if null_class is not None else 0)
        self.register_to_config(
            num_classes=num_classes,
            null_class=null_class,
            guidance_scale=guidance_scale,
            distilled_guidance_scale=distilled_guidance_scale,
        )

    def model_output(self, sample: torch.Tensor, t, class_labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The network's output at `t` for `class_labels`, guided when `guidance_scale` ≠ 1 and a null class is set."""
        return guided_output(self.unet, sample, t, class_labels, self.config.null_class, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images of `class_labels` (one per label; without them, `batch_size` labels drawn uniformly
        with `generator`). `guidance_scale` defaults to the folder's."""
        device = self.unet.device
        if class_labels is None:
            class_labels = torch.randint(
                0,
                self.config.num_classes,
                (batch_size,),
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        if ((labels < 0) | (labels >= self.config.num_classes)).any():
            raise ValueError(f"class labels must be in 0..{self.config.num_classes - 1}, got {labels.tolist()}")
        w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        # a clipping DDIM must move along the ε of the clipped x₀: with the model's own ε, every clipped step
        # (frequent under guidance) leaves the sample off its trajectory and the images break up
        extra = (
            {"use_clipped_model_output": True}
            if "use_clipped_model_output" in inspect.signature(self.scheduler.step).parameters
            else {}
        )
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.model_output(image, t, labels, w)
            image = self.scheduler.step(out, t, image, generator=generator, **extra).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
