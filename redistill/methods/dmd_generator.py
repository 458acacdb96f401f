"""DMD's generator and what sets it up: the generator run as its sampler runs it (one LCM step, or the deterministic
few-step chain), its timesteps, the first student it may start from, the discriminator's logits, the settings check."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redistill.config import DMDParams, settings
from redistill.methods.consistency import consistency_fn, lcm_scheduler
from redistill.methods.student_shape import FeatureMatch
from redistill.methods.training import Draws, Trainer, TrainingConfig
from redistill.models import adapter_for
from redistill.models.prediction import alpha_sigma, to_x0_eps

STARTS = ("teacher", "output", "progressive")


@settings("DMDConfig")
class DMDConfig(DMDParams, TrainingConfig):
    """Settings of one DMD2 run: params.yaml `distill` (TrainingConfig) plus `distill.dmd`
    (DMDParams). Every field and its default is declared there, once; `method_config` fills it in."""


@dataclass
class Generator:
    """G_θ as its sampler runs it: an LCM generator's i-th step, or a deterministic chain from pure noise."""

    run: Trainer
    model: Any  # the teacher's adapter
    student: torch.nn.Module
    timesteps: torch.Tensor  # gen_t: the generator's sampling timesteps (−1: the clean end of a chain)
    alphas_cumprod: Any  # the noise path: an ᾱ table, or a flow teacher's StraightPath
    prediction_type: str
    steps: int  # K
    deterministic: bool  # a deterministic chain (start: output or progressive), else an LCM generator
    x0_call: bool  # the output method's 1-step student: one x₀ call at T−1
    backward_simulation: bool
    real_score: torch.nn.Module  # the frozen teacher, whose block features the student's may match
    fm: FeatureMatch
    feature_loss: float

    def sample(self, draw: Draws, grad: bool, x_real: torch.Tensor, cond) -> torch.Tensor:
        """G_θ's output on a fresh input. A deterministic generator runs from pure noise, as it samples. An LCM
        generator trains a random sampling step i (its input: `lcm_input`). With `grad` the student's block
        features are recorded, and the teacher's on the same (z, t) for feature matching."""
        if self.deterministic:
            z = draw.noise()
            with torch.set_grad_enabled(grad), self.fm.student():
                x = self.chain(z, cond)
            if grad and self.feature_loss > 0:
                self.teacher_features(z, 0, cond)
            return x
        i = draw.index(len(self.timesteps))
        z = self.lcm_input(draw, i, x_real, cond)
        if not grad:
            with torch.no_grad():
                return self.lcm_x0(z, i, cond)
        with self.fm.student():
            x = self.lcm_x0(z, i, cond)
        if self.feature_loss > 0:
            self.teacher_features(z, i, cond)
        return x

    def lcm_input(self, draw: Draws, i: int, x_real: torch.Tensor, cond) -> torch.Tensor:
        """The input of the LCM generator's step i: pure noise at step 0; later, the generator's own earlier steps
        re-noised with fresh noise (DMD2's backward simulation), or real images noised to step i's timestep
        (DMD2's few-step ImageNet setting)."""
        if i == 0 or self.backward_simulation:
            z = draw.noise()
            with torch.no_grad():
                for j in range(i):
                    x0 = self.lcm_x0(z, j, cond)
                    z = self.model.add_noise(x0, draw.noise(), self.timesteps[j + 1].expand(len(z)))
            return z
        return self.model.add_noise(x_real, draw.noise(), self.timesteps[i].expand(len(x_real)))

    def teacher_features(self, z: torch.Tensor, i: int, cond) -> None:
        """The teacher's block features on the same (z, t) as the student's call at step i."""
        with torch.no_grad(), self.run.autocast(), self.fm.teacher():
            self.model.output(self.real_score, z, self.timesteps[i].expand(len(z)), cond)

    def lcm_x0(self, z: torch.Tensor, i: int, cond) -> torch.Tensor:
        """The LCM generator's clean image at its i-th sampling step."""
        t = self.timesteps[i].expand(len(z))
        with self.run.autocast():
            return consistency_fn(
                self.model, self.student, z, t, cond, self.prediction_type, self.alphas_cumprod
            ).float()

    def chain(self, z: torch.Tensor, cond) -> torch.Tensor:
        """A deterministic generator: one x₀ call at T−1, or DDIM on its grid as the stock scheduler runs it
        (x̂₀ clipped, the model's ε), back-propagated through every call."""
        model, gen_t, ac = self.model, self.timesteps, self.alphas_cumprod
        if self.x0_call:
            with self.run.autocast():
                return model.output(self.student, z, gen_t[0].expand(len(z)), cond).float()
        for i in range(self.steps):
            a, s = alpha_sigma(ac, gen_t[i].expand(len(z)))
            a2, s2 = alpha_sigma(ac, gen_t[i + 1].expand(len(z)))
            with self.run.autocast():
                out = model.output(self.student, z, gen_t[i].expand(len(z)), cond).float()
                x0_hat, eps = to_x0_eps(out, z, a, s, self.prediction_type)
            z = a2 * x0_hat.clamp(-1, 1) + s2 * eps
        return z


def disc_logits(run: Trainer, disc, model, draw: Draws, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The discriminator's logits on `x` noised to `t`."""
    with run.autocast():
        return disc(model.add_noise(x, draw.noise(), t), t, cond).float()


def check_settings(cfg: DMDConfig, model) -> None:
    """Refuse settings this teacher's kind cannot serve, before anything trains."""
    if cfg.start not in STARTS:
        raise ValueError(f"distill.dmd.start must be one of {', '.join(STARTS)}, got {cfg.start!r}")
    if model.family == "flow" and (cfg.start != "teacher" or cfg.regression_weight > 0):
        raise ValueError(
            f"a {model.kind} teacher is distilled by dmd from the teacher itself (distill.dmd.start: teacher, "
            "regression_weight: 0): the deterministic starts and the regression are DDIM chains on an ᾱ schedule"
        )
    if not model.clips and (cfg.start != "teacher" or cfg.regression_weight > 0):
        raise ValueError(
            f"a {model.kind} teacher is distilled by dmd from the teacher itself (distill.dmd.start: teacher, "
            "regression_weight: 0): the deterministic starts and the regression clip x̂₀ to pixel range"
        )
    if cfg.lora_rank and cfg.start != "teacher":
        raise ValueError(
            "a LoRA generator (distill.student.lora_rank > 0) starts as the teacher: set distill.dmd.start: teacher"
        )


def lcm_sampler(model, sched_cfg, cfg: DMDConfig):
    """The stock scheduler an LCM-style generator samples with: LCM's on the teacher's ᾱ schedule, or the
    flow-matching LCM scheduler at σ = 1, (K−1)/K, …, 1/K for a flow teacher."""
    if model.family == "flow":
        from redistill.models.flow import lcm_flow_scheduler

        return lcm_flow_scheduler(model.num_train_timesteps, cfg.target_steps)
    return lcm_scheduler(sched_cfg, cfg.solver_steps, model.clips)


def generator_timesteps(sched_cfg, cfg: DMDConfig, chain: bool, x0_call: bool, flow: bool = False) -> torch.Tensor:
    """The generator's timesteps: LCM's (e.g. 959, 719, 479, 239; a flow teacher's σ·T: 1000, 750, 500, 250); a
    deterministic chain's grid (959, 709, 459, 209, then the clean end −1); one x₀ call at T−1 for a 1-step output
    start."""
    from redistill.methods.progressive import student_grid

    T, K = sched_cfg.num_train_timesteps, cfg.target_steps
    if not chain and flow:
        from redistill.models.flow import lcm_flow_scheduler

        sampler = lcm_flow_scheduler(T, K)
        sampler.set_timesteps(K)
        return sampler.timesteps
    if not chain:
        sampler = lcm_scheduler(sched_cfg, cfg.solver_steps)
        sampler.set_timesteps(K)
        return sampler.timesteps
    if x0_call:
        return torch.tensor([T - 1, -1])
    return student_grid(K, T, cfg.first_timestep)


def _output_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir).parent / (Path(ckpt_dir).name + "-output")


def _first_student(
    teacher,
    data,
    cfg: DMDConfig,
    ckpt_dir: Path,
    log,
    teacher_sha256,
    pairs_dir,
    main: bool = True,
    samples_dir: Path | None = None,
) -> dict:
    """The weights of the deterministic student the generator starts from: output-distilled (on the shared
    pair cache) or progressive, at the generator's step count. Kept beside the checkpoints until the DMD run
    ends, so a resumed run does not distil it again."""
    from safetensors.torch import load_file, save_file

    folder = _output_dir(ckpt_dir)
    key = (
        f"{cfg.start}-{teacher_sha256 or 'unkeyed'}-{cfg.target_steps}-{cfg.pairs}-{cfg.pairs_steps}-"
        f"{cfg.output_steps if cfg.start == 'output' else cfg.progressive_steps}-{cfg.first_timestep}-{cfg.seed}"
    )
    done = folder / f"student-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if done.is_file():
        return load_file(done)
    shared = dict(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        mixed_precision=cfg.mixed_precision,
        student_channels=cfg.student_channels,
        student_layers=cfg.student_layers,
        target_steps=cfg.target_steps,
    )
    if cfg.start == "output":
        from redistill.methods.output import OutputConfig
        from redistill.methods.output import distill as first

        fcfg = OutputConfig(
            pairs=cfg.pairs,
            pairs_steps=cfg.pairs_steps,
            steps=cfg.output_steps,
            lr=cfg.lr,
            first_timestep=cfg.first_timestep,
            **shared,
        )
        extra = {"teacher_sha256": teacher_sha256, "pairs_dir": pairs_dir, "samples_dir": samples_dir}
    else:
        from redistill.methods.progressive import ProgressiveConfig
        from redistill.methods.progressive import distill as first

        teacher_steps = cfg.target_steps * 4  # two halving rounds, as the progressive default (16 → 4)
        fcfg = ProgressiveConfig(
            teacher_steps=teacher_steps,
            steps_per_round=cfg.progressive_steps,
            first_timestep=cfg.first_timestep,
            lr=cfg.lr,
            **shared,
        )
        extra = {}
    log(f"dmd: distilling the {cfg.start} student the generator starts from")
    pipe, _ = first(teacher, data, fcfg, folder / "checkpoints", log=log, **extra)
    weights = {k: v.contiguous() for k, v in adapter_for(pipe).unet.state_dict().items()}
    if main:  # one process writes; the others hold the same weights
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, done)
    return weights
