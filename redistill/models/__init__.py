"""The model adapter: the one seam between redistill and a kind of diffusers pipeline (DESIGN.md).

Methods, the teacher check, evaluation, drift embeddings and serving never call `unet(z, t)` or a
pipeline directly. They ask the pipeline's adapter, which knows, for its kind of pipeline:
- the facts: prediction type, the noise schedule (ᾱ_t), channels and image size;
- how to noise (`add_noise`) and denoise with conditioning (`output`; `teacher_output` with guidance folded
  in, for a conditional teacher);
- how to draw a batch of conditions for training (`conditions`; None for an unconditional model);
- how to sample a batch of images (`sample`), and how to run its deterministic ODE sampler from given noise
  (`ode_sample`: the teacher pairs and couplings of the output and rectified methods);
- its velocity on the straight path between data and noise (`velocity`): a flow-matching model's own output,
  a diffusion model's probability-flow ODE in those coordinates;
- how to export a student as a stock diffusers pipeline folder (`export`);
- for a text-to-image kind only, its prompts and latents (`encode`, `decode`, `use_prompts`, `encode_prompts`, …):
  declared here, absent (`hasattr` is False, a call raises NotOffered) on the other kinds.

One implementation per kind of pipeline, in its own file beside this one; `adapter_for(pipe)` picks the
first kind that claims the pipeline. Adding a kind adds a file and a line to `KINDS` and touches no method.
"""

from __future__ import annotations

from typing import Any

from redistill.models.base import ModelAdapter, NotOffered, UnsupportedPipeline, text_to_image_only

__all__ = [
    "ModelAdapter",
    "NotOffered",
    "UnsupportedPipeline",
    "adapter_for",
    "check_layout",
    "supported_kinds",
    "text_to_image_only",
]


def _kinds() -> list[type[ModelAdapter]]:
    from redistill.models.class_conditional import ClassConditionalPixel
    from redistill.models.dit import DiTLatent
    from redistill.models.flow import FlowMatchingPixel
    from redistill.models.flux import FluxLatent
    from redistill.models.pixart import PixArtLatent
    from redistill.models.pixel import UnconditionalPixel
    from redistill.models.sd3 import SD3Latent
    from redistill.models.text_to_image import TextToImageLatent

    return [
        UnconditionalPixel,
        ClassConditionalPixel,
        FlowMatchingPixel,
        TextToImageLatent,
        DiTLatent,
        SD3Latent,
        PixArtLatent,
        FluxLatent,
    ]


def adapter_for(pipe: Any) -> ModelAdapter:
    """The adapter of the first kind that claims `pipe`; UnsupportedPipeline (naming the kinds) if none does.

    One adapter per pipeline object: what a caller tells it (a text-to-image model's prompts and guidance
    scale) holds for every later user of the same pipeline (the method, the evaluation)."""
    cached = getattr(pipe, "_redistill_adapter", None)
    if cached is not None and cached.pipe is pipe and type(cached).claims(pipe):
        return cached
    for kind in _kinds():
        if kind.claims(pipe):
            adapter = kind(pipe)
            try:
                pipe._redistill_adapter = adapter
            except (AttributeError, TypeError):  # an object that takes no attributes: a fresh adapter each time
                pass
            return adapter
    kinds = "; ".join(f"{k.kind} ({k.description})" for k in _kinds())
    raise UnsupportedPipeline(
        f"redistill has no adapter for a {type(pipe).__name__} "
        f"(denoiser: {type(getattr(pipe, 'unet', getattr(pipe, 'transformer', None))).__name__}); supported kinds: {kinds}"
    )


def supported_kinds() -> list[str]:
    return [k.kind for k in _kinds()]


def check_layout(model_index: dict, where: object) -> None:
    """Refuse, before anything loads, a folder whose model_index.json names a transformer layout (a `transformer`
    component) that no kind serves, listing the layouts that are served. UNet layouts are checked once loaded
    (`adapter_for`): one pipeline class (DDPMPipeline) holds several kinds."""
    name = model_index.get("_class_name")
    name = name[-1] if isinstance(name, list) else name
    if "transformer" not in model_index or any(name in k.layouts for k in _kinds()):
        return
    served = "; ".join(f"{'/'.join(k.layouts)} ({k.kind})" for k in _kinds())
    raise UnsupportedPipeline(
        f"{where} is a {name} folder, a transformer layout redistill does not serve yet; it serves: {served}. "
        "Point the cycle at a folder of one of these layouts (as `save_pretrained` writes it)"
    )
