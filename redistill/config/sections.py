"""The settings of the stages that make a workspace: the data (`prepare`), the feature spaces (`features`), the
teachers (`teacher`, `finetune`, `flow_teacher`, `t2i_teacher`), the champion and the demos."""

from __future__ import annotations

from pydantic import Field

from redistill.config.model import ConfigError, settings
from redistill.config.tables import METHODS, TEACHER_OBJECTIVES


@settings("prepare")
class PrepareParams:
    """`prepare` stage: sklearn's bundled digits → PNG folders."""

    seed: int = Field(0, description="one seed fixes the split, the incoming batches and their drift")
    image_size: int = Field(
        8, description="8 = native digits resolution; 16 = nearest-upsampled (≈3× the training cost)"
    )
    holdout: int = Field(
        450, description="images kept out of the reference: the classifier's test split and the incoming pool"
    )
    batch_size: int = Field(150, description="images per incoming batch")
    class_mix_classes: list[int] = Field(
        default_factory=lambda: [0, 1, 7], description="over-represented in batch `class_mix`"
    )
    class_mix_share: float = Field(
        0.6, description="share of batch `class_mix` drawn from those classes (the reference has ≈0.3)"
    )
    style_rotation_deg: float = Field(12.0, description="batch `style`: rotation magnitude, sign drawn per image")
    style_dilation: int = Field(
        2, description="batch `style`: grey-dilation footprint in pixels (thicker strokes); 1 = off"
    )


@settings("features")
class FeaturesParams:
    """`features` stage: the digit classifier whose penultimate layer feeds FID/KID."""

    seed: int = Field(0, description="seed of the classifier's initialisation and batches")
    feature_dim: int = Field(64, description="width of the penultimate layer = FID feature dimension")
    epochs: int = Field(60, description="classifier training epochs")
    batch_size: int = Field(128, description="classifier batch size")
    lr: float = Field(2.0e-3, description="classifier learning rate (Adam)")
    not_digit_ratio: float = Field(
        0.5, description='"not a digit" examples per digit example (noise, shuffles, blends)'
    )
    confidence: float = Field(0.9, description='a sample is "recognisable" when max-prob over the 10 digits is ≥ this')
    encoder_epochs: int = Field(
        150, description="the label-free SimCLR encoder (redistill/encoder.py), trained on the reference too"
    )
    encoder_dim: int = Field(128, description="its representation width: the `encoder` feature space")


@settings("teacher")
class TeacherParams:
    """`teacher` stage: the DDPM teacher recipe (UNet2DModel + DDPMScheduler, ε-prediction, EMA)."""

    seed: int = Field(0, description="seed of the teacher's initialisation, batches and noise")
    name: str = Field("digits-ddpm", description="folder under data/teachers/")
    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 64], description="UNet2DModel channels, one entry per level"
    )
    layers_per_block: int = Field(2, description="ResNet layers per UNet level")
    norm_num_groups: int = Field(32, description="GroupNorm groups")
    num_train_timesteps: int = Field(1000, description="DDPM timesteps T")
    beta_schedule: str = Field(
        "squaredcos_cap_v2", description="cosine: the linear schedule wastes steps on tiny images"
    )
    train_steps: int = Field(16000, description="optimiser steps")
    batch_size: int = Field(128, description="images per optimiser step")
    lr: float = Field(6.0e-4, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(250, description="linear learning-rate warm-up steps")
    snr_gamma: float = Field(5.0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it")
    ema_decay: float = Field(0.9995, description="decay of the exported EMA of the teacher")
    checkpoint_every: int = Field(1000, description="steps between resumable checkpoints")
    class_conditional: bool = Field(
        False,
        description="train on the data's labels (labels.csv): a UNet with class embeddings in a ClassConditionalPipeline",
    )
    label_dropout: float = Field(
        0.1,
        description="class-conditional: share of labels replaced by the null class, for classifier-free guidance (Ho & Salimans 2022)",
    )
    guidance_scale: float = Field(
        2.0, description="class-conditional: the guidance scale w the saved teacher samples with, u + w·(c − u)"
    )
    objective: str = Field(
        "ddpm",
        description="ddpm: ε-prediction on the DDPM schedule (a DDPMScheduler); flow_matching: velocity on the straight path between data and noise (a FlowMatchEulerDiscreteScheduler)",
    )
    shift: float = Field(
        1.0,
        description="flow_matching: the FlowMatchEulerDiscreteScheduler's timestep shift, used in training and saved with the teacher (1 = none; SD3 uses 3)",
    )

    def __post_init__(self):
        if self.objective not in TEACHER_OBJECTIVES:
            raise ConfigError(
                f"teacher.objective must be one of {', '.join(TEACHER_OBJECTIVES)}, got {self.objective!r}"
            )
        if not 0.0 < self.shift < float("inf"):
            raise ConfigError(f"teacher.shift must be a finite number above 0 (1 = no shift), got {self.shift}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(
                f"teacher.label_dropout must be in [0, 1), got {self.label_dropout}; "
                "1 would never show the model a class"
            )
        if not 0.0 <= self.guidance_scale < float("inf"):  # NaN fails too
            raise ConfigError(
                f"teacher.guidance_scale must be a finite number of at least 0 (1 = no guidance), "
                f"got {self.guidance_scale}"
            )
        if self.class_conditional and self.label_dropout == 0.0 and self.guidance_scale != 1.0:
            raise ConfigError(
                f"teacher.label_dropout is 0, so the null class that guidance needs is never trained, but "
                f"teacher.guidance_scale is {self.guidance_scale}; set label_dropout above 0 (e.g. 0.1) "
                "or guidance_scale to 1.0"
            )


@settings("finetune")
class FinetuneParams:
    """`finetune` stage: a new teacher made by training the committed one a little longer (the warm-start figure)."""

    name: str = Field("digits-ddpm-ft", description="folder under data/teachers/")
    steps: int = Field(300, description="optimiser steps on top of the teacher's own")
    lr: float = Field(2.0e-4, description="peak learning rate of the extra steps")
    warmup_steps: int = Field(20, description="linear learning-rate warm-up steps")
    seed: int = Field(
        1, description="another seed than the teacher's: new batches and noise, so the weights really move"
    )

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"finetune.steps must be at least 1, got {self.steps}")


@settings("flow_teacher")
class FlowTeacherParams:
    """`flow_teacher` stage: the embedded flow-matching digits teacher (`redistill teacher flow`): the
    `teacher` recipe with these overrides and `objective: flow_matching`."""

    name: str = Field("digits-flow", description="folder under data/flow-teachers/")
    train_steps: int = Field(6000, description="optimiser steps")
    shift: float = Field(1.0, description="the FlowMatchEulerDiscreteScheduler's timestep shift (1 = none)")
    ema_decay: float = Field(
        0.999, description="decay of the exported EMA (shorter than the DDPM teacher's: fewer steps)"
    )
    seed: int = Field(0, description="seed of the initialisation, batches and noise")

    def __post_init__(self):
        if self.train_steps < 1:
            raise ConfigError(f"flow_teacher.train_steps must be at least 1, got {self.train_steps}")


@settings("t2i_teacher")
class T2ITeacherParams:
    """`t2i_teacher` stage: the embedded text-to-image teacher (redistill/teacher_t2i.py): a tiny Stable Diffusion
    layout (CLIP text encoder, AutoencoderKL, UNet2DConditionModel, DDIMScheduler) trained on the captioned digits."""

    name: str = Field("digits-t2i", description="folder under data/t2i-teachers/")
    seed: int = Field(0, description="seed of the captions, the initialisations, batches and noise")
    image_size: int = Field(
        16, description="the digits nearest-upsampled to this size (a multiple of 8); the VAE halves it"
    )
    model_max_length: int = Field(
        16, description="the tokenizer's length in tokens (the longest class prompt is 8 with start and end)"
    )
    text_width: int = Field(64, description="CLIP text encoder hidden size = the UNet's cross_attention_dim")
    text_layers: int = Field(2, description="CLIP text encoder transformer layers")
    train_text_encoder: bool = Field(
        True,
        description="train the text encoder with the UNet (+4% per step); false keeps it random and frozen (distinct prompts still get distinct hidden states)",
    )
    latent_channels: int = Field(4, description="VAE latent channels (as Stable Diffusion)")
    vae_block_out_channels: list[int] = Field(
        default_factory=lambda: [16, 32], description="AutoencoderKL channels, one entry per level (two levels: f = 2)"
    )
    vae_steps: int = Field(800, description="VAE optimiser steps, before the UNet's")
    vae_batch_size: int = Field(64, description="images per VAE step")
    vae_lr: float = Field(1.0e-3, description="VAE peak learning rate (AdamW, cosine decay)")
    kl_weight: float = Field(
        1.0e-4,
        description="weight of the VAE's KL term (per latent element summed, per pixel) against the per-pixel L1 reconstruction",
    )
    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 64],
        description="UNet2DConditionModel channels: a cross-attention level, then a plain one",
    )
    layers_per_block: int = Field(1, description="ResNet (and transformer) layers per UNet level")
    norm_num_groups: int = Field(16, description="GroupNorm groups of the UNet")
    attention_heads: int = Field(
        2,
        description="cross-attention heads (the UNet's attention_head_dim, as SD 1.x names it); 2 heads of 16 and 32 channels cost ⅔ of 8 tiny ones",
    )
    text_time_embedding: bool = Field(
        True,
        description="also add an attention-pooled prompt embedding to the time embedding (UNet2DConditionModel addition_embed_type 'text'), which every ResNet block sees, as class labels reach the digits teacher: with cross-attention alone the prompt was ignored in the pilot",
    )
    num_train_timesteps: int = Field(1000, description="DDPM timesteps T")
    beta_schedule: str = Field(
        "squaredcos_cap_v2",
        description="cosine (Nichol & Dhariwal 2021), as the digits teacher: the linear schedules waste steps on tiny images",
    )
    train_steps: int = Field(6000, description="UNet optimiser steps (≈0.35 s each at batch 128 on one thread)")
    batch_size: int = Field(128, description="latents per UNet step")
    lr: float = Field(5.0e-4, description="UNet peak learning rate (AdamW, cosine decay)")
    warmup_steps: int = Field(250, description="linear learning-rate warm-up steps (UNet)")
    snr_gamma: float = Field(5.0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it")
    ema_decay: float = Field(0.999, description="decay of the exported EMA of the UNet (and of a trained text encoder)")
    caption_dropout: float = Field(
        0.1, description="share of captions replaced by the empty prompt, for classifier-free guidance"
    )
    guidance_scale: float = Field(
        3.0,
        description="the w written to redistill_sampling.json when no sweep is measured (no classifier, or guidance_sweep empty)",
    )
    guidance_sweep: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 3.0, 5.0],
        description="w values measured after training with the digits classifier; the best (adherent and recognisable share) is written",
    )
    eval_samples: int = Field(500, description="samples per measured w (the prompts of each class, evenly)")
    eval_steps: int = Field(50, description="DDIM steps of the measurement (and of the w choice)")
    checkpoint_every: int = Field(500, description="steps (VAE and UNet) between resumable checkpoints")

    def __post_init__(self):
        if self.image_size % 8 or self.image_size < 8:
            raise ConfigError(
                f"t2i_teacher.image_size must be a multiple of 8 (native digits are 8×8), got {self.image_size}"
            )
        if len(self.vae_block_out_channels) != 2 or len(self.block_out_channels) != 2:
            raise ConfigError(
                "t2i_teacher.vae_block_out_channels and block_out_channels take two entries each "
                f"(f = 2 latents; a cross-attention and a plain UNet level), got "
                f"{self.vae_block_out_channels} and {self.block_out_channels}"
            )
        if min(self.train_steps, self.vae_steps, self.batch_size, self.vae_batch_size, self.checkpoint_every) < 1:
            raise ConfigError(
                "t2i_teacher.train_steps, vae_steps, batch_size, vae_batch_size and checkpoint_every must "
                "each be at least 1"
            )
        if not 0.0 < self.caption_dropout < 1.0:
            raise ConfigError(
                f"t2i_teacher.caption_dropout must be in (0, 1), got {self.caption_dropout}; 0 never trains "
                "the empty prompt that guidance needs, 1 never shows a caption"
            )
        if not 1.0 <= self.guidance_scale < float("inf") or any(
            not 1.0 <= w < float("inf") for w in self.guidance_sweep
        ):
            raise ConfigError(
                f"t2i_teacher.guidance_scale and guidance_sweep must be finite and at least 1 (1 = no "
                f"guidance), got {self.guidance_scale} and {self.guidance_sweep}"
            )


@settings("t2i_demo")
class T2IDemoParams:
    """`t2i_demo`: what `redistill demo --kind text-to-image` changes of the settings for its own workspace
    (runs/demo-text-to-image): the registered model, and the student it distils from the embedded text-to-image teacher."""

    student_name: str = Field("digits-t2i-student", description="the registered model of the text-to-image demo")
    method: str = Field("consistency", description="consistency (LCM-LoRA) or dmd")
    target_steps: int = Field(4, description="the student's sampling steps")
    lora_rank: int = Field(
        16, description="the LoRA adapter's rank (distill.student.lora_rank); 0 trains the whole UNet"
    )
    steps: int = Field(
        1500, description="the method's optimiser steps (distill.consistency.steps or distill.dmd.steps)"
    )
    lr: float = Field(2.0e-3, description="the adapter's learning rate (distill.lr)")
    batch_size: int = Field(64, description="images per optimiser step (distill.batch_size)")

    def __post_init__(self):
        where = type(self).__section__
        if self.method not in ("consistency", "dmd"):
            raise ConfigError(f"{where}.method must be consistency or dmd, got {self.method!r}")
        if min(self.target_steps, self.steps, self.batch_size) < 1 or self.lora_rank < 0 or not self.lr > 0:
            raise ConfigError(
                f"{where}.target_steps, steps and batch_size must be at least 1, lora_rank at least 0, lr above 0"
            )


@settings("champion")
class ChampionParams:
    """`champion` (`redistill champion`, the DVC stage `champion`): the committed champion, distilled from the committed
    teacher with the `distill` settings (the best recipe measured) and judged as a cycle would judge it."""

    out: str = Field(
        "data/champion/digits-student", description="the champion's folder (committed: a fresh clone has it)"
    )
    budget_minutes: float = Field(
        90.0,
        description="the distillation's budget on 2 CPU cores, recorded with its wall time (a run over it says so)",
    )

    def __post_init__(self):
        if not self.out or not self.budget_minutes > 0:
            raise ConfigError("champion.out must be a folder and champion.budget_minutes above 0")


@settings("demo")
class DemoParams:
    """`demo` (`redistill demo`): the continuous loop on the embedded digits: the committed champion is registered, a
    fine-tuned teacher lands in data/teachers/, the watch finds it, a warm re-distillation is judged and promoted."""

    new_teacher: str = Field(
        "data/teacher-updates/digits-ddpm-ft",
        description="the new teacher that lands (the finetune stage's, committed), copied whole into data/teachers/",
    )
    cold_method: str = Field("progressive", description="`demo --cold`: the method of its one cold cycle")
    cold_steps: int = Field(4, description="`demo --cold`: the cold student's sampling steps")

    def __post_init__(self):
        if self.cold_method not in METHODS:
            raise ConfigError(f"demo.cold_method must be one of {', '.join(METHODS)}, got {self.cold_method!r}")
        if self.cold_steps < 1:
            raise ConfigError(f"demo.cold_steps must be at least 1, got {self.cold_steps}")
