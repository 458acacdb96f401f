"""The `distill` settings: the method, the shared budget, one subsection per method and the student's shape."""

from __future__ import annotations

from pydantic import Field

from redistill.config.model import ConfigError, settings
from redistill.config.tables import METHODS, resolve_targets


@settings("distill.progressive")
class ProgressiveParams:
    """`distill.progressive`: halving rounds (Salimans & Ho 2022)."""

    teacher_steps: int = Field(16, description="the teacher's DDIM step count where halving starts")
    steps_per_round: int = Field(1500, description="optimiser steps per halving round")
    first_timestep: int = Field(
        959, description="the student's first timestep: 959 keeps the teacher's ε; 999 = trailing, v student"
    )


@settings("distill.consistency")
class ConsistencyParams:
    """`distill.consistency`: LCM-style consistency distillation (Song et al. 2023; Luo et al. 2023)."""

    steps: int = Field(3000, description="optimiser steps")
    solver_steps: int = Field(
        48, description="N, the teacher's DDIM solver grid; skip k = 1000 // N (48: starts at t=959)"
    )
    target_ema: float = Field(0.95, description="μ of the target network θ⁻")
    huber_c: float = Field(0.001, description="pseudo-Huber constant; 0 gives L2")
    export: str = Field(
        "ema",
        description="the exported weights: ema (of θ, distill.ema_decay) or target (θ⁻, as diffusers' LCM script)",
    )
    sampler: str = Field(
        "lcm",
        description="lcm (stock LCMScheduler: re-noise with fresh noise) or ddim (deterministic, stock DDIMScheduler)",
    )

    def __post_init__(self):
        if self.export not in ("ema", "target"):
            raise ConfigError(f"distill.consistency.export must be ema or target, got {self.export!r}")
        if self.sampler not in ("lcm", "ddim"):
            raise ConfigError(f"distill.consistency.sampler must be lcm or ddim, got {self.sampler!r}")


@settings("distill.output")
class OutputParams:
    """`distill.output`: one-step output distillation on cached teacher pairs (Luhman & Luhman 2021)."""

    pairs: int = Field(8000, description="(noise, teacher output) pairs, generated once per teacher into data/pairs/")
    pairs_steps: int = Field(50, description="the teacher's DDIM steps per pair")
    steps: int = Field(3000, description="optimiser steps")
    first_timestep: int = Field(
        959, description="more than 1 step: the student's DDIM chain starts here, then T/steps apart"
    )


@settings("distill.rectified")
class RectifiedParams:
    """`distill.rectified`: reflow, then distillation to few Euler steps (Liu et al. 2023; InstaFlow, Liu et al. 2024)."""

    couplings: int = Field(
        8000,
        description="(noise, teacher output) couplings from the teacher's ODE, cached in data/pairs/ by teacher sha256",
    )
    couplings_steps: int = Field(
        50,
        description="the teacher's ODE solver steps per coupling (its own Euler sampler; DDIM for a diffusion teacher)",
    )
    reflow_steps: int = Field(
        3000, description="optimiser steps of reflow: the student's velocity on the couplings' straight interpolations"
    )
    reflow_ode_steps: int = Field(
        16, description="Euler steps of the reflowed flow when it makes the distillation's couplings"
    )
    distill_steps: int = Field(
        1500,
        description="optimiser steps of the distillation to target_steps Euler steps; 0 exports the reflowed flow itself",
    )
    distill_lr: float = Field(
        3.0e-5,
        description="learning rate of the distillation phase, which starts from the reflowed flow (0 = distill.lr)",
    )
    distill_targets: str = Field(
        "reflowed",
        description="what the K-step student is distilled onto: reflowed (the reflowed flow's own couplings, the paper's) or teacher (the teacher's couplings, which an exact reflow reproduces)",
    )

    def __post_init__(self):
        for name in ("couplings", "couplings_steps", "reflow_steps", "reflow_ode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.rectified.{name} must be at least 1, got {getattr(self, name)}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill.rectified.distill_steps must be 0 or more, got {self.distill_steps}")
        if not 0.0 <= self.distill_lr < float("inf"):
            raise ConfigError(
                f"distill.rectified.distill_lr must be 0 (= distill.lr) or a positive number, got {self.distill_lr}"
            )
        if self.distill_targets not in ("reflowed", "teacher"):
            raise ConfigError(
                f"distill.rectified.distill_targets must be reflowed or teacher, got {self.distill_targets!r}"
            )


@settings("distill.adversarial")
class AdversarialParams:
    """`distill.adversarial`: ADD-style adversarial distillation (Sauer et al. 2023)."""

    steps: int = Field(1500, description="student steps, one discriminator step each (~4× a progressive step's cost)")
    distill_weight: float = Field(2.5, description="λ of the distillation loss next to the adversarial one")
    disc_lr: float = Field(0.0002, description="the discriminator's learning rate")
    disc_max_t: int = Field(500, description="the discriminator sees images noised at t < this")
    solver_steps: int = Field(48, description="the LCMScheduler grid of the student's timesteps (starts at 959)")


@settings("distill.dmd")
class DMDParams:
    """`distill.dmd`: DMD2-style distribution matching (Yin et al. 2024)."""

    def __post_init__(self):
        if self.start not in ("teacher", "output", "progressive"):
            raise ConfigError(f"distill.dmd.start must be one of teacher, output, progressive, got {self.start!r}")

    steps: int = Field(1000, description="generator steps")
    fake_updates: int = Field(5, description="fake-score steps per generator step (two time-scale rule)")
    fake_lr: float = Field(0.0003, description="the fake score's learning rate")
    gan_weight: float = Field(
        0.0, description="> 0 adds DMD2's GAN term on real images (a head on the fake score's features)"
    )
    start: str = Field(
        "teacher",
        description="the generator: teacher (LCM multistep), or a deterministic sampler distilled first: output or progressive",
    )
    regression_weight: float = Field(
        0.0, description="> 0 adds DMD1's regression loss on cached teacher pairs (deterministic generators only)"
    )
    output_steps: int = Field(3000, description="start: output — its optimiser steps")
    progressive_steps: int = Field(
        1500, description="start: progressive — optimiser steps per halving round (2 rounds)"
    )
    first_timestep: int = Field(959, description="a deterministic K-step generator's first timestep (then T/K apart)")
    pairs: int = Field(
        8000,
        description="teacher pairs for the regression and the output start, cached in data/pairs/ (shared with `output`)",
    )
    pairs_steps: int = Field(50, description="the teacher's DDIM steps per pair")
    backward_simulation: bool = Field(
        False, description="later steps' inputs: the generator's own re-noised outputs (true) or noised real images"
    )
    t_min: int = Field(20, description="the DMD loss noises the generator output at t ~ U{t_min..t_max}")
    t_max: int = Field(980, description="upper end of that range")
    solver_steps: int = Field(48, description="the LCMScheduler grid of the generator's timesteps")


@settings("distill.student")
class StudentParams:
    """`distill.student`: a smaller student (BK-SDM style) for any method; empty / 0 keep the teacher's shape."""

    block_out_channels: list[int] = Field(default_factory=list, description="one entry per UNet level, e.g. [16, 32]")
    layers_per_block: int = Field(0, description="e.g. 1 where the teacher has 2")
    feature_loss: float = Field(0.0, description="weight of block-output feature matching to the teacher (0: off)")
    lora_rank: int = Field(
        0,
        description="> 0: a LoRA student (LCM-LoRA), the teacher's own UNet plus a LoRA adapter of this rank on the layers lora_targets names, of which only the adapter trains (consistency and dmd; text-to-image teachers); 0: the whole UNet trains",
    )
    lora_alpha: float = Field(
        0.0, description="the LoRA scale's numerator (the update is scaled alpha/rank); 0 means alpha = rank"
    )
    lora_targets: str | list[str] = Field(
        "lcm",
        description="the layers the adapter adapts: lcm (diffusers' LCM-LoRA list: attention and feed-forward projections, ResNet convolutions and time projections, down/upsamplers), attention (to_q, to_k, to_v, to_out.0 only), or a list of module names",
    )

    def __post_init__(self):
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ConfigError(
                f"distill.student.lora_rank and lora_alpha must be ≥ 0, got {self.lora_rank} and {self.lora_alpha}"
            )
        try:
            resolve_targets(self.lora_targets)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@settings("distill")
class DistillParams:
    """`distill`: the method, the shared budget, and one subsection of settings per method."""

    method: str = Field(
        "progressive",
        description="progressive, consistency, output, adversarial, dmd or rectified: one file each in redistill/methods/",
    )
    target_steps: int = Field(4, description="the student's sampling step count")
    batch_size: int = Field(64, description="images per optimiser step")
    lr: float = Field(3.0e-4, description="the student's learning rate")
    ema_decay: float = Field(0.999, description="the exported EMA of the student")
    seed: int = Field(0, description="seed of the student's batches and noise")
    checkpoint_every: int = Field(200, description="steps between resumable checkpoints")
    mixed_precision: str = Field(
        "no", description="torch AMP: no, fp16 (loss-scaled, overflowed steps skipped) or bf16"
    )
    init: str = Field(
        "auto",
        description="cold: from the teacher; warm: from the champion (refused when it does not fit); auto: warm when it fits, else cold",
    )
    warm_fraction: float = Field(
        0.05,
        description="a warm start trains this share of the method's optimiser steps, on this share of its teacher pairs",
    )
    num_processes: int = Field(
        1,
        description="processes the distillation runs on, data parallel (accelerate launch: "
        "gloo on CPUs, one GPU each with NCCL); batch_size is the global batch, split over them",
    )
    progressive: ProgressiveParams = Field(
        default_factory=ProgressiveParams, description="settings of method progressive"
    )
    consistency: ConsistencyParams = Field(
        default_factory=ConsistencyParams, description="settings of method consistency"
    )
    output: OutputParams = Field(default_factory=OutputParams, description="settings of method output")
    adversarial: AdversarialParams = Field(
        default_factory=AdversarialParams, description="settings of method adversarial"
    )
    dmd: DMDParams = Field(default_factory=DMDParams, description="settings of method dmd")
    rectified: RectifiedParams = Field(default_factory=RectifiedParams, description="settings of method rectified")
    student: StudentParams = Field(
        default_factory=StudentParams, description="a smaller student's shape, for any method"
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown distill.method {self.method!r}; valid methods are: {', '.join(METHODS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"distill.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.target_steps < 1:
            raise ConfigError(f"distill.target_steps must be at least 1, got {self.target_steps}")
        if self.init not in ("cold", "warm", "auto"):
            raise ConfigError(f"distill.init must be cold, warm or auto, got {self.init!r}")
        if not 0 < self.warm_fraction <= 1:
            raise ConfigError(f"distill.warm_fraction must be in (0, 1], got {self.warm_fraction}")
        if self.num_processes < 1:
            raise ConfigError(f"distill.num_processes must be at least 1, got {self.num_processes}")
        if self.batch_size % self.num_processes:
            raise ConfigError(
                f"distill.batch_size {self.batch_size} is the global batch, split evenly over "
                f"distill.num_processes ({self.num_processes}): make it a multiple of {self.num_processes}"
            )
