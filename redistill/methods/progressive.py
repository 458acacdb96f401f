"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", arXiv:2202.00512), Algorithm 2.

Each round trains a student to match, in one DDIM step, two DDIM steps of its teacher. The student is
then the next round's teacher and the step count halves, from the teacher's DDIM step count down to the
target. The student predicts v rather than ε (the paper's section 4): at few steps the first step starts
at almost pure noise, where an x₀ recovered from ε divides by α ≈ 0. The export is a stock
`DDPMPipeline` whose saved `DDIMScheduler` ("trailing" spacing, v-prediction) samples the student
correctly at the target step count.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from redistill import checkpoint
from redistill.prediction import alpha_sigma, to_x0_eps

STUDENT_PREDICTION = "v_prediction"


@dataclass
class ProgressiveConfig:
    """Settings of one progressive distillation run (from params.yaml `distill`)."""

    teacher_steps: int = 64  # the teacher's DDIM step count where halving starts
    target_steps: int = 4  # the student's step count after the last round
    steps_per_round: int = 400  # optimiser steps in each halving round
    batch_size: int = 64
    lr: float = 2.0e-4
    ema_decay: float = 0.999  # the EMA weights are exported and teach the next round
    seed: int = 0
    checkpoint_every: int = 200  # optimiser steps between resumable checkpoints


def halving_schedule(teacher_steps: int, target_steps: int) -> list[int]:
    """Student step counts, one per round: teacher_steps/2, /4, ..., target_steps."""
    if target_steps < 1 or teacher_steps <= target_steps:
        raise ValueError(f"need teacher_steps > target_steps ≥ 1, got {teacher_steps} and {target_steps}")
    ratio = teacher_steps // target_steps
    if teacher_steps % target_steps or ratio & (ratio - 1):
        raise ValueError(
            f"teacher_steps ({teacher_steps}) must be target_steps ({target_steps}) times a power of two, "
            f"e.g. {target_steps * 16}"
        )
    rounds, n = [], teacher_steps
    while n > target_steps:
        n //= 2
        rounds.append(n)
    return rounds


def ddim_grid(n: int, num_train_timesteps: int) -> torch.Tensor:
    """DDIM's "trailing" timesteps for n steps, then −1 (the clean end): [999, 749, 499, 249, −1] for n=4."""
    t = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1
    return torch.from_numpy(np.append(t, -1))


def ddim_step(x0: torch.Tensor, z: torch.Tensor, a_t, s_t, a_s, s_s) -> torch.Tensor:
    """Deterministic DDIM from z_t to z_s given the x₀ prediction: z_s = α_s·x₀ + σ_s/σ_t·(z_t − α_t·x₀)."""
    return a_s * x0 + (s_s / s_t) * (z - a_t * x0)


def distillation_target(z_t, z_tpp, a_t, s_t, a_tpp, s_tpp) -> torch.Tensor:
    """The x̃ for which one DDIM step from z_t lands on the teacher's two-step result z_t″ (Alg. 2):
    x̃ = (z_t″ − (σ_t″/σ_t)·z_t) / (α_t″ − (σ_t″/σ_t)·α_t)."""
    r = s_tpp / s_t
    return (z_tpp - r * z_t) / (a_tpp - r * a_t)


def _x0(unet, z, t, prediction_type, alphas_cumprod, clip: bool):
    a, s = alpha_sigma(alphas_cumprod, t)
    x0, _ = to_x0_eps(unet(z, t).sample, z, a, s, prediction_type)
    return x0.clamp(-1, 1) if clip else x0


def distill(
    teacher,
    data: torch.Tensor,
    cfg: ProgressiveConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    keep_checkpoints: int = 2,
):
    """Progressively distil `teacher` (a pipeline with unet + scheduler) on images `data` in [0, 1].

    Returns the stock DDPMPipeline of the final student (EMA weights, DDIM trailing, v-prediction) and a
    summary. Resumes from the latest checkpoint in `ckpt_dir`.
    """
    from diffusers import DDIMScheduler, DDPMPipeline
    from diffusers.training_utils import EMAModel

    sched_cfg = teacher.scheduler.config
    T = sched_cfg.num_train_timesteps
    alphas_cumprod = teacher.scheduler.alphas_cumprod.float()
    rounds = halving_schedule(cfg.teacher_steps, cfg.target_steps)
    x_all = data.float() * 2.0 - 1.0
    teacher_unet = copy.deepcopy(teacher.unet).eval().requires_grad_(False)
    teacher_type = sched_cfg.prediction_type
    start_round, start_step, elapsed = 0, 0, 0.0

    ckpt_dir = Path(ckpt_dir)
    resume = None
    found = checkpoint.latest(ckpt_dir)
    if found:
        last, meta = found
        if meta["config"] == asdict(cfg) and meta["teacher_prediction"] == teacher_type:
            resume = last
            start_round, start_step, elapsed = meta["round"], meta["step"], meta["elapsed_s"]
            if start_round > 0:
                teacher_unet.load_state_dict(checkpoint.load_weights(resume, "teacher"))
                teacher_type = STUDENT_PREDICTION
            log(f"resumed from {resume.name}: round {start_round + 1}/{len(rounds)}, step {start_step}")
        else:
            shutil.rmtree(ckpt_dir)

    t0 = time.perf_counter() - elapsed
    history = []
    for r in range(start_round, len(rounds)):
        n = rounds[r]
        grid = ddim_grid(n, T)  # the student's steps; the teacher's 2n grid adds the midpoints
        mid = ddim_grid(2 * n, T)[1::2]
        # 1. The student starts as a copy of its teacher (Alg. 2: η ← θ).
        student = copy.deepcopy(teacher_unet).train().requires_grad_(True)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + r)
        step = 0
        if resume is not None and r == start_round:
            student.load_state_dict(checkpoint.load_weights(resume, "student"))
            state = checkpoint.load_state(resume)
            opt.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
            gen.set_state(state["generator"])
            step = start_step
        losses = []
        # a bar on a terminal only (disable=None): logs and CI get the log lines below instead
        bar = tqdm(total=cfg.steps_per_round, initial=step, desc=f"round {r + 1}/{len(rounds)} ({2 * n}→{n} steps)",
                   disable=None, leave=False)
        while step < cfg.steps_per_round:
            # 2. Data and a student timestep: x ~ D, i ~ U{0..n−1}, t = grid[i]; z_t = α_t·x + σ_t·ε.
            x = x_all[torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)]
            i = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            t, t_mid, t_next = grid[i], mid[i], grid[i + 1]
            a_t, s_t = alpha_sigma(alphas_cumprod, t)
            z_t = a_t * x + s_t * torch.randn(x.shape, generator=gen)
            with torch.no_grad():
                # 3. Two DDIM steps of the teacher: t → t′ → t″ (its sampler clips x̂₀ to [−1, 1]).
                a_m, s_m = alpha_sigma(alphas_cumprod, t_mid)
                a_n, s_n = alpha_sigma(alphas_cumprod, t_next)
                z_mid = ddim_step(_x0(teacher_unet, z_t, t, teacher_type, alphas_cumprod, True), z_t, a_t, s_t, a_m, s_m)
                z_next = ddim_step(_x0(teacher_unet, z_mid, t_mid, teacher_type, alphas_cumprod, True), z_mid, a_m, s_m, a_n, s_n)
                # 4. The target x̃ that makes one student step land on the teacher's two-step result.
                x_target = distillation_target(z_t, z_next, a_t, s_t, a_n, s_n)
            # 5. Truncated-SNR weighted loss in x-space: max(α²/σ², 1)·‖x̃ − x̂_η(z_t)‖².
            x_student = _x0(student, z_t, t, STUDENT_PREDICTION, alphas_cumprod, False)
            weight = torch.clamp(a_t**2 / s_t**2, min=1.0).view(-1)
            loss = (weight * (x_student - x_target).pow(2).mean(dim=(1, 2, 3))).mean()
            # 6. Update, then the EMA that becomes the next teacher.
            checkpoint.update(loss, student, opt, ema)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % 100 == 0 or step == cfg.steps_per_round:
                log(f"round {r + 1}/{len(rounds)} ({2 * n}→{n} steps) step {step}/{cfg.steps_per_round} "
                    f"loss {np.mean(losses[-100:]):.4f} {time.perf_counter() - t0:.0f}s")
            # 7. Snapshot: everything needed to resume mid-round.
            if step % cfg.checkpoint_every == 0 and step < cfg.steps_per_round:
                checkpoint.save(
                    ckpt_dir / f"checkpoint-{r:02d}-{step:06d}",
                    {"student": student.state_dict(), **({"teacher": teacher_unet.state_dict()} if r > 0 else {})},
                    {"optimizer": opt.state_dict(), "ema": ema.state_dict(), "generator": gen.get_state()},
                    {"round": r, "step": step, "order": r * 10**9 + step, "config": asdict(cfg),
                     "teacher_prediction": sched_cfg.prediction_type, "elapsed_s": time.perf_counter() - t0},
                )
                checkpoint.prune(ckpt_dir, keep_checkpoints)
        bar.close()
        # 8. θ ← η: the EMA student teaches the next round, at half the steps.
        ema.copy_to(student.parameters())
        teacher_unet = student.eval().requires_grad_(False)
        teacher_type = STUDENT_PREDICTION
        history.append({"round": r + 1, "student_steps": n, "final_loss": float(np.mean(losses[-100:])) if losses else None})

    scheduler = DDIMScheduler.from_config(
        sched_cfg, prediction_type=STUDENT_PREDICTION, timestep_spacing="trailing", clip_sample=True,
        set_alpha_to_one=True,
    )
    summary = {"method": "progressive", "config": asdict(cfg), "rounds": history,
               "wall_time_s": round(time.perf_counter() - t0, 1), "num_inference_steps": cfg.target_steps}
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return DDPMPipeline(unet=teacher_unet, scheduler=scheduler), summary
