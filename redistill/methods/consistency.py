"""Consistency distillation, latent-consistency-model style (Song et al. 2023, "Consistency Models",
arXiv:2303.01469, Algorithm 2; Luo et al. 2023, "Latent Consistency Models", arXiv:2310.04378, Algorithm 1).

The student f_θ(z_t, t) = c_skip(t)·z_t + c_out(t)·x̂₀,θ(z_t, t) learns to map every point of the
teacher's probability-flow trajectory to that trajectory's clean end. Training pairs are two adjacent
points on the teacher's trajectory: one DDIM step of the teacher, skipping k timesteps (LCM's "skipping-step
solver"), links z_{t} to ẑ_{t−k}, and the student at z_t is pulled towards an EMA target network θ⁻ at
ẑ_{t−k}. The boundary f(z, 0) = z comes from c_skip(0) = 1, c_out(0) = 0.

The student keeps the teacher's prediction type and starts as an exact copy of it, as LCM does, so
at step 0 f_θ is already the teacher's one-step x̂₀. Its training timesteps are LCM's
{k−1, 2k−1, …, N·k−1} with k = ⌊T/N⌋, the grid that `LCMScheduler(original_inference_steps=N)`
samples from, so the export is the teacher kind's stock pipeline + `LCMScheduler` that samples in 1 to 4 steps.
For a cosine-schedule ε teacher, choose N so that N·k < T: at t = T−1 the signal α_t is ~5e-5 and an ε
model cannot recover x̂₀ there (N = 48 starts at t = 959, much as DDIM's "leading" 50 steps start at 980).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from redistill.config import ConsistencyParams, settings
from redistill.methods.student_shape import FeatureMatch, with_sampling
from redistill.methods.training import Draws, Phase, Trainer, TrainingConfig, frozen, new_ema, sizes, student_like, warm
from redistill.models import adapter_for
from redistill.models.lora import add_lora, fused_copy
from redistill.models.prediction import alpha_sigma, to_x0_eps

SIGMA_DATA = 0.5  # LCM's σ_data in the boundary scalings
TIMESTEP_SCALING = 10.0  # LCMScheduler's default: c_skip(t) falls to ~0 after the first few timesteps


@settings("ConsistencyConfig")
class ConsistencyConfig(ConsistencyParams, TrainingConfig):
    """Settings of one consistency distillation run: params.yaml `distill` (TrainingConfig) plus `distill.consistency`
    (ConsistencyParams). Every field and its default is declared there, once; `method_config` fills it in."""


def solver_grid(solver_steps: int, num_train_timesteps: int, flow: bool = False) -> tuple[torch.Tensor, int | float]:
    """LCM's training timesteps {k−1, 2k−1, …, N·k−1} and the skip k = T // N. On a flow teacher's straight path
    (`flow`), the N evenly spaced noise levels σ = n/N as timesteps σ·T, with k = T/N: its neighbour below the first
    is σ = 0, the clean end, and a K-step student's σ = 1, (K−1)/K, …, 1/K lie on it when K divides N."""
    if flow:
        if solver_steps < 1:
            raise ValueError(f"solver_steps must be at least 1, got {solver_steps}")
        k = num_train_timesteps / solver_steps
        return torch.arange(1, solver_steps + 1, dtype=torch.float32) * k, k
    k = num_train_timesteps // solver_steps
    if k < 1:
        raise ValueError(f"solver_steps ({solver_steps}) must not exceed the teacher's {num_train_timesteps} timesteps")
    return torch.arange(1, solver_steps + 1) * k - 1, k


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) as `LCMScheduler.get_scalings_for_boundary_condition_discrete` computes them;
    t = −1 (the clean end) counts as 0: c_skip = 1, c_out = 0."""
    st = t.float().clamp(min=0) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / (st**2 + SIGMA_DATA**2).sqrt()
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def consistency_fn(model, unet, z, t, cond, prediction_type, alphas_cumprod) -> torch.Tensor:
    """f(z_t, t) = c_skip(t)·z_t + c_out(t)·x̂₀(z_t, t), `unet` called through the adapter `model` under `cond`;
    `alphas_cumprod` is the noise path (an ᾱ table or a flow teacher's StraightPath)."""
    a, s = alpha_sigma(alphas_cumprod, t)
    x0, _ = to_x0_eps(model.output(unet, z, t.clamp(min=0), cond), z, a, s, prediction_type)
    c_skip, c_out = boundary_scalings(t)
    return c_skip * z + c_out * x0


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """√(‖a − b‖² + c²) − c per element, averaged (LCM's loss); plain squared error when c = 0."""
    if c == 0:
        return (a - b).pow(2).mean()
    return (torch.sqrt((a - b).pow(2) + c**2) - c).mean()


def ddim_solver_step(x0: torch.Tensor, z_t: torch.Tensor, a_t, s_t, a_s, s_s) -> torch.Tensor:
    """One DDIM step of the teacher's ODE from z_t to s given its x̂₀ (LCM's DDIMSolver):
    ẑ_s = α_s·x̂₀ + σ_s·ε̂, with ε̂ = (z_t − α_t·x̂₀)/σ_t."""
    eps = (z_t - a_t * x0) / s_t
    return a_s * x0 + s_s * eps


def sampling_scheduler(teacher_scheduler_config, cfg: ConsistencyConfig, clip: bool, flow: bool = False):
    """The stock scheduler the student is exported with: LCM's multistep sampling (re-noise each clean estimate with
    fresh noise), or the deterministic DDIM one (`cfg.sampler: ddim`). A flow teacher's student: the flow-matching
    LCM scheduler, or Euler, at σ = 1, (K−1)/K, …, 1/K."""
    if flow:
        from redistill.models.flow import euler_scheduler, lcm_flow_scheduler

        T = teacher_scheduler_config.num_train_timesteps
        make = euler_scheduler if cfg.sampler == "ddim" else lcm_flow_scheduler
        return make(T, cfg.target_steps)
    if cfg.sampler == "ddim":
        return deterministic_scheduler(teacher_scheduler_config, cfg.solver_steps, cfg.target_steps, clip)
    return lcm_scheduler(teacher_scheduler_config, cfg.solver_steps, clip)


def distill(
    teacher,
    data: torch.Tensor,
    cfg: ConsistencyConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    init: dict | None = None,
    teacher_sha256: str | None = None,
    teacher_uri: str | None = None,
):
    """Consistency-distil `teacher` on images `data` in [0, 1]; returns (stock DDPMPipeline with an
    LCMScheduler, summary). Resumes from the latest checkpoint in `ckpt_dir`."""
    model = adapter_for(teacher)  # every network call, condition and the export go through it
    sched_cfg = teacher.scheduler.config
    ptype = model.prediction_type  # "flow" for a flow-matching teacher: its velocity, on the straight path
    T = model.num_train_timesteps
    grid, k = solver_grid(cfg.solver_steps, T, flow=model.family == "flow")
    if cfg.target_steps > cfg.solver_steps:
        raise ValueError(f"target_steps ({cfg.target_steps}) cannot exceed solver_steps ({cfg.solver_steps})")
    run = Trainer(
        ckpt_dir,
        {"method": "consistency", "config": asdict(cfg), "teacher_prediction": ptype},
        cfg.checkpoint_every,
        log,
        cfg.mixed_precision,
        seed=cfg.seed,
    )
    dev = run.device
    path = model.noise_path().to(dev)  # the ᾱ schedule, or a flow teacher's straight path
    grid = grid.to(dev)
    x_all = model.to_model_space(data).to(dev)  # pixels in [−1, 1], or a latent teacher's VAE latents
    teacher_unet = frozen(copy.deepcopy(model.unet)).to(dev)
    # 1. θ and θ⁻ both start as the teacher (LCM: initialise from the pre-trained model), or as a smaller
    #    student initialised from it, or (LCM-LoRA) as the teacher plus a zero-effect LoRA adapter, of which
    #    only the adapter trains.
    if cfg.lora_rank:
        student = lora_student(teacher_unet, cfg, init)
    else:
        student = warm(student_like(teacher_unet, cfg.student_channels, cfg.student_layers), init)  # or the champion
    target = frozen(copy.deepcopy(student))
    fm = FeatureMatch(teacher_unet, student, cfg.feature_loss)
    opt = torch.optim.AdamW([w for w in student.parameters() if w.requires_grad], lr=cfg.lr, weight_decay=0.0)
    ema = new_ema(student, cfg.ema_decay)
    ema_target = new_ema(student, cfg.target_ema, warmup=False)  # θ⁻ as diffusers' EMAModel with a fixed μ
    gen = torch.Generator().manual_seed(cfg.seed)
    ph = Phase(
        0,
        f"consistency (N={cfg.solver_steps}, k={k})",
        cfg.steps,
        {"student": student, "target": target},
        {"student": opt},
        {"student": ema, "target": ema_target},
        gen,
    )
    draw = Draws(gen, run, cfg.batch_size, tuple(x_all.shape[1:]), dev)  # every draw, of the global batch

    def step():
        # 2. x ~ D, n ~ U{1..N}: t = t_n and its neighbour s = t − k on the solver grid; z_t = α_t·x + σ_t·ε.
        #    Drawn for the global batch; this process trains on its shard of it.
        i = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        c = model.conditions_at(i, cfg.batch_size, gen, dev)  # the batch's captions, or drawn conditions; else None
        x, c = run.shard(x_all[i.to(dev)], c)
        t = grid[draw.integers(cfg.solver_steps)]
        s = t - k  # −1 for the first grid point: the clean end
        a_t, s_t = alpha_sigma(path, t)
        a_s, s_s = alpha_sigma(path, s)
        z_t = model.add_noise(x, draw.noise(), t)
        with torch.no_grad(), run.autocast():
            # 3. One DDIM step of the teacher along its ODE: ẑ_s = α_s·x̂₀ + σ_s·ε̂ (x̂₀ clipped, as its sampler does).
            with fm.teacher():
                x0, _ = to_x0_eps(model.teacher_output(teacher_unet, z_t, t, c).float(), z_t, a_t, s_t, ptype)
            x0 = x0.clamp(-1, 1) if model.clips else x0  # pixels are clipped as the sampler clips them; latents not
            z_s = ddim_solver_step(x0, z_t, a_t, s_t, a_s, s_s)
            # 4. The target f_θ⁻(ẑ_s, s); at the clean end the boundary condition makes it ẑ_s itself.
            f_target = consistency_fn(model, target, z_s, s, c, ptype, path).float()
        # 5. The student at z_t, and the pseudo-Huber distance to the target.
        with run.autocast(), fm.student():
            f_student = consistency_fn(model, student, z_t, t, c, ptype, path).float()
        loss = pseudo_huber(f_student, f_target, cfg.huber_c) + fm.loss()
        # 6. Gradient step on θ (and its export EMA), then θ⁻ ← μ·θ⁻ + (1 − μ)·θ.
        run.backward(loss, student, opt, ema)
        ema_target.step(student.parameters())
        ema_target.copy_to(target.parameters())
        return {"loss": loss.item()}

    losses = run.phase(ph, step)
    fm.remove()
    # 7. Export θ's EMA (or θ⁻ itself, as diffusers' LCM script does) with the scheduler that samples it:
    #    LCM's multistep sampling (re-noise each clean estimate with fresh noise) or the deterministic one.
    (ema_target if cfg.export == "target" else ema).copy_to(student.parameters())
    summary = {
        "method": "consistency",
        "config": asdict(cfg),
        "final_loss": losses.get("loss"),
        **sizes(teacher_unet, student),
        "solver_skip": k,
        "wall_time_s": run.finish(),
        "num_inference_steps": cfg.target_steps,
    }
    sched = sampling_scheduler(sched_cfg, cfg, model.clips, flow=model.family == "flow")
    if not cfg.lora_rank:
        return with_sampling(model.export(frozen(student).cpu(), sched), model, cfg.target_steps), summary
    # 8. LCM-LoRA: the pipeline holds the UNet with the adapter fused in (stock diffusers loads it as it is); the
    #    adapter itself, with its base teacher's sha256, is written beside it when the pipeline is saved.
    student = student.cpu()
    return lora_export(model, student, sched, cfg, teacher_sha256, summary, teacher_uri)


def lora_student(teacher_unet, cfg, init: dict | None):
    """A copy of the teacher's UNet with a zero-effect LoRA adapter of `cfg.lora_rank`, of which only the adapter
    trains (LCM-LoRA); refused for a warm start (an adapter is trained on its base from the start)."""
    if init is not None:
        raise ValueError(
            "a LoRA student (distill.student.lora_rank > 0) is trained on its base teacher from the "
            "start: set distill.init: cold (or auto, which starts it cold), or set lora_rank: 0"
        )
    return add_lora(copy.deepcopy(teacher_unet), cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets)


def lora_export(model, student, sched, cfg, teacher_sha256, summary: dict, teacher_uri: str | None = None):
    """A LoRA student as the kind's stock pipeline with the adapter fused into its UNet (stock diffusers loads it as
    it is), carrying the adapter itself and its base teacher's sha256, written beside it when it is saved."""
    student = student.cpu()
    pipe = with_sampling(model.export(fused_copy(student), sched), model, cfg.target_steps)
    pipe.redistill_lora = {
        "unet": student,
        "base_sha256": teacher_sha256,
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha or cfg.lora_rank,
        "base_uri": teacher_uri,
    }
    adapter_params = sum(w.numel() for n, w in student.named_parameters() if "lora_" in n)
    summary.update(lora_rank=cfg.lora_rank, adapter_params=adapter_params, base_sha256=teacher_sha256)
    return pipe, summary


def deterministic_scheduler(teacher_scheduler_config, solver_steps: int, steps: int, clip: bool = True):
    """The stock `DDIMScheduler` that samples a consistency model deterministically: each clean
    estimate moves to the next timestep along the ε it implies instead of fresh noise. The grid starts where
    LCM's does (the top of the solver grid) and is spaced T/steps ("leading" with `steps_offset`). The
    boundary scalings are left out: past the first timesteps c_skip(t) is below 1e-5."""
    from diffusers import DDIMScheduler

    T = teacher_scheduler_config.num_train_timesteps
    first = int(solver_grid(solver_steps, T)[0][-1])
    return DDIMScheduler.from_config(
        teacher_scheduler_config,
        clip_sample=clip,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=first - (steps - 1) * (T // steps),
    )


def lcm_scheduler(teacher_scheduler_config, solver_steps: int, clip: bool = True):
    """The stock `LCMScheduler` over the grid {k−1, …, N·k−1}: it applies c_skip/c_out and re-noises
    between steps (multistep consistency sampling)."""
    from diffusers import LCMScheduler

    known = inspect.signature(LCMScheduler.__init__).parameters  # DDPM-only keys (variance_type) would only warn
    return LCMScheduler.from_config(
        {k: v for k, v in teacher_scheduler_config.items() if k in known},
        original_inference_steps=solver_steps,
        timestep_scaling=TIMESTEP_SCALING,
        clip_sample=clip,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
