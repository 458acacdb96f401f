"""The settings of the embedded transformer teachers (`dit_teacher`, `sd3_teacher`: redistill/teachers/transformer.py)
and of their demos (`dit_demo`, `sd3_demo`: `redistill demo --kind dit|sd3`)."""

from __future__ import annotations

from pydantic import Field

from redistill.config.model import ConfigError, settings
from redistill.config.sections import T2IDemoParams


@settings("transformer_teacher")
class TransformerTeacherParams:
    """What both embedded transformer teachers share: the captioned digits (16×16) in the latent space of the embedded
    text-to-image teacher's trained VAE (4×8×8), a transformer on 2×2 patches (16 tokens), its EMA exported."""

    name: str = Field("digits-transformer", description="the teacher's folder name")
    seed: int = Field(0, description="seed of the initialisation, batches and noise")
    vae: str = Field(
        "data/t2i-teachers/digits-t2i/vae",
        description="a trained AutoencoderKL folder whose latents the transformer learns (as DiT reuses SD's VAE); its scaling (and SD3's shift) is measured on the data",
    )
    width: int = Field(96, description="the transformer's hidden size (heads × head_dim)")
    head_dim: int = Field(32, description="channels per attention head")
    layers: int = Field(6, description="transformer blocks")
    patch_size: int = Field(2, description="latent pixels per patch side (8×8 latents → 16 tokens at 2)")
    train_steps: int = Field(8000, description="optimiser steps")
    batch_size: int = Field(128, description="latents per step")
    lr: float = Field(5.0e-4, description="peak learning rate (AdamW, cosine decay)")
    warmup_steps: int = Field(250, description="linear learning-rate warm-up steps")
    ema_decay: float = Field(0.999, description="decay of the exported EMA of the weights")
    guidance_scale: float = Field(
        3.0, description="the w written to redistill_sampling.json when no sweep is measured (no classifier)"
    )
    guidance_sweep: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 3.0, 5.0],
        description="w values measured after training with the digits classifier; the best (adherent and recognisable share) is written",
    )
    eval_samples: int = Field(500, description="samples per measured w (each class evenly)")
    eval_steps: int = Field(50, description="sampling steps of the measurement (and of the w choice)")
    checkpoint_every: int = Field(500, description="steps between resumable checkpoints")

    def __post_init__(self):
        where = type(self).__section__
        if self.width % self.head_dim or self.width < self.head_dim:
            raise ConfigError(
                f"{where}.width must be a multiple of {where}.head_dim, got {self.width}, {self.head_dim}"
            )
        if min(self.layers, self.patch_size, self.train_steps, self.batch_size, self.checkpoint_every) < 1:
            raise ConfigError(f"{where}.layers, patch_size, train_steps, batch_size and checkpoint_every must be ≥ 1")
        if not 1.0 <= self.guidance_scale < float("inf") or any(
            not 1.0 <= w < float("inf") for w in self.guidance_sweep
        ):
            raise ConfigError(
                f"{where}.guidance_scale and guidance_sweep must be finite and at least 1 (1 = no guidance)"
            )


@settings("dit_teacher")
class DiTTeacherParams(TransformerTeacherParams):
    """`dit_teacher` stage: the embedded class-conditional DiT (Peebles & Xie 2023, arXiv:2212.09748) in a stock
    `DiTPipeline`: ε-prediction on the cosine schedule with Min-SNR-γ, labels dropped to the null class by the
    model's own label embedding (10%, as DiT trains) for classifier-free guidance."""

    name: str = Field("digits-dit", description="folder under data/dit-teachers/")
    beta_schedule: str = Field("squaredcos_cap_v2", description="the DDPM schedule (cosine, as the digits teachers)")
    snr_gamma: float = Field(5.0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it")


@settings("sd3_teacher")
class SD3TeacherParams(TransformerTeacherParams):
    """`sd3_teacher` stage: the embedded text-to-image MMDiT in a stock `StableDiffusion3Pipeline` (two CLIP text
    encoders with projection trained jointly, no T5), rectified flow with logit-normal timesteps (Esser et al. 2024)."""

    name: str = Field("digits-sd3", description="folder under data/sd3-teachers/")
    width: int = Field(64, description="the MMDiT's hidden size (heads × head_dim)")
    layers: int = Field(4, description="MMDiT blocks")
    text_width: int = Field(
        64, description="each CLIP text encoder's hidden size (their projections feed the pooled vector)"
    )
    text_layers: int = Field(2, description="each CLIP text encoder's layers")
    model_max_length: int = Field(16, description="the tokenizers' length in tokens")
    max_sequence_length: int = Field(8, description="the zero tokens standing in for the absent T5 (the pipeline's)")
    shift: float = Field(1.0, description="the sampler's timestep shift (SD3 uses 3 at 1024²; 16 tokens need none)")
    caption_dropout: float = Field(0.1, description="share of captions replaced by the empty prompt, for guidance")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.caption_dropout < 1.0 or not self.shift > 0:
            raise ConfigError("sd3_teacher.caption_dropout must be in (0, 1) and sd3_teacher.shift above 0")


@settings("dit_demo")
class DiTDemoParams(T2IDemoParams):
    """`dit_demo`: what `redistill demo --kind dit` changes of the settings for its workspace runs/demo-dit."""

    student_name: str = Field("digits-dit-student", description="the registered model of the DiT demo")


@settings("sd3_demo")
class SD3DemoParams(T2IDemoParams):
    """`sd3_demo`: what `redistill demo --kind sd3` changes of the settings for its workspace runs/demo-sd3."""

    student_name: str = Field("digits-sd3-student", description="the registered model of the SD3 demo")
