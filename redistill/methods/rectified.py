"""Rectified flow (Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", arXiv:2209.03003) and its distillation to one or a few Euler steps (the "2-rectified flow +
distillation" recipe; InstaFlow, Liu et al. 2024, arXiv:2309.06380): the survey's third trajectory family.

The path from data x₀ to noise z is the straight line x_σ = (1 − σ)·x₀ + σ·z, σ ∈ [0, 1], in diffusers'
flow-matching convention (the network sees timestep σ·T and predicts the velocity dx/dσ = z − x₀). A
flow-matching teacher is such a flow; a diffusion (ε/v) teacher is one too once its probability-flow ODE is
written in these coordinates (the model adapter's `velocity`; its own DDIM sampler solves that ODE).

1. Couplings. The teacher's ODE solver maps a fixed set of noises z to its outputs x₀ (a flow-matching
   teacher: its own Euler sampler at `couplings_steps`; a diffusion teacher: its DDIM sampler). They depend only
   on the teacher, the solver's steps, their number and the seed, so they are cached under `data/pairs/` by
   the teacher's sha256 (for a diffusion teacher the output method's pairs at the same settings are the same file).
2. Reflow. The student, a copy of the teacher's network, learns the velocity of the straight interpolations
   between each coupling's ends: t ~ U(0, 1), x_t = t·z + (1 − t)·x₀, min ‖(z − x₀) − v_θ(x_t, t)‖². The
   couplings do not cross, so the new flow (the 2-rectified flow) has straighter paths than the teacher's.
   The reflowed flow does not depend on the student's step count: it is cached beside its couplings, keyed by
   them and the reflow's settings, so students of other step counts and later cycles reuse it.
3. Straightness, the paper's S = ∫₀¹ E‖(z − x₀) − v(x_t, t)‖² dt, of the teacher's flow and of the reflowed one,
   on noise the training never saw, along Euler paths of `reflow_ode_steps` (per pixel; 0 = straight).
4. Distillation. The reflowed flow's ODE (Euler, `reflow_ode_steps`) gives new couplings from the same noises;
   the student's K-step Euler sampler, on exactly the grid the exported scheduler runs, is trained end to end to
   map each z to its x₀ (L2; InstaFlow uses LPIPS, whose weights cannot be downloaded here), at `distill_lr`: it
   starts from the reflowed flow, which a large first step would throw away (`distill_targets: teacher` uses the
   teacher's couplings instead, which an exact reflow reproduces). With
   `distill_steps` 0 the reflowed flow itself is the student, sampled with K Euler steps.
5. Export: the teacher kind's stock pipeline (a `DDPMPipeline`) with a `FlowMatchEulerDiscreteScheduler` whose
   K-step grid is σ = 1, (K − 1)/K, …, 1/K: plain diffusers samples the student at K steps exactly as trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from redistill.config import RectifiedParams, settings
from redistill.methods.student_shape import with_sampling
from redistill.methods.training import Phase, Trainer, TrainingConfig, frozen, new_ema, sizes, student_like
from redistill.models import adapter_for
from redistill.models.flow import FlowMatchingPixel, euler_scheduler


@settings("RectifiedConfig")
class RectifiedConfig(RectifiedParams, TrainingConfig):
    """Settings of one rectified-flow run: params.yaml `distill` (TrainingConfig) plus `distill.rectified`
    (RectifiedParams). Every field and its default is declared there, once; `method_config` fills it in."""


def euler_grid(T: int, steps: int) -> torch.Tensor:
    """The σ grid (then 0) that the exported scheduler samples at `steps`."""
    sched = euler_scheduler(T, steps)
    sched.set_timesteps(steps)
    return sched.sigmas.float()


def euler_path(velocity: Callable, net, x: torch.Tensor, sigmas: torch.Tensor, cond=None) -> torch.Tensor:
    """Euler on the flow ODE dx/dσ = v(x, σ | cond) from x along `sigmas` (1 → 0); differentiable, so a student's
    few-step sampler can be trained end to end."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * _v(velocity, net, x, s.expand(len(x)).to(x.device), cond)
    return x


def _v(velocity: Callable, net, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """v(x, σ), or v(x, σ | cond) for a conditional flow (an unconditional velocity takes no condition)."""
    return velocity(net, x, sigma) if cond is None else velocity(net, x, sigma, cond)


@torch.no_grad()
def euler(velocity: Callable, net, z: torch.Tensor, sigmas: torch.Tensor, batch: int = 500, cond=None) -> torch.Tensor:
    """Euler on the flow ODE dx/dσ = v(x, σ | cond) from noise z along `sigmas` (1 → 0), in batches."""
    return torch.cat(
        [
            euler_path(velocity, net, z[i : i + batch], sigmas, None if cond is None else cond[i : i + batch])
            for i in range(0, len(z), batch)
        ]
    )


def interpolate(z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path between a coupling's ends, x_t = t·z + (1 − t)·x₀, at one t per image."""
    return t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * x0


def reflow_loss(z: torch.Tensor, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖(z − x₀) − v_θ(x_t, t)‖²: the straight path's velocity against the network's."""
    return ((z - x0) - v).pow(2).mean()


def amp_velocity(run: Trainer, kind, net, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """The student's velocity v_θ(x, σ | cond) through the flow-matching adapter `kind` (one call: a conditional
    student has the teacher's guidance folded in), under the run's mixed precision."""
    with run.autocast():
        return kind.output(net, x, sigma.to(x.device).float() * kind.num_train_timesteps, cond).float()


@torch.no_grad()
def straightness(velocity: Callable, net, z: torch.Tensor, steps: int, cond=None) -> float:
    """S = ∫₀¹ E‖(z − x₀) − v(x_σ, σ)‖² dσ (Liu et al. 2023, Def. 3.2) along Euler paths of `steps` even steps,
    per pixel; x₀ is the path's own end. 0 for a straight flow."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x, vs = z, []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = _v(velocity, net, x, s.expand(len(x)).to(x.device), cond)
        vs.append(v)
        x = x + (s_next - s) * v
    return float(torch.stack([(v - (z - x)).pow(2).mean() for v in vs]).mean())


def reflow_file(couplings: Path, cfg: RectifiedConfig, teacher_kind: str) -> Path:
    """The cache file of the reflowed flow: beside its couplings, named by what fixes the reflow."""
    what = json.dumps(
        {
            "couplings": couplings.name,
            "kind": teacher_kind,
            "steps": cfg.reflow_steps,
            "batch": cfg.batch_size,
            "lr": cfg.lr,
            "ema": cfg.ema_decay,
            "seed": cfg.seed,
            "shape": [list(cfg.student_channels), cfg.student_layers],
            "amp": cfg.mixed_precision,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(what.encode()).hexdigest()[:8]
    return couplings.with_name(f"{couplings.stem}-reflow{cfg.reflow_steps}-{digest}.safetensors")


def _save_atomic(net: torch.nn.Module, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def distill(
    teacher,
    data: torch.Tensor,
    cfg: RectifiedConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    teacher_sha256: str | None = None,
    pairs_dir: Path | None = None,
    samples_dir: Path | None = None,
):
    """Reflow `teacher` and distil the 2-rectified flow into a `cfg.target_steps`-step Euler student; `data` only
    fixes the image shape (the couplings are the training set). Returns (stock pipeline, summary)."""
    from redistill.methods.output import load_or_make_pairs, unkeyed_sha256

    model = adapter_for(teacher)  # the teacher's kind: its ODE sampler, its velocity
    if model.conditional and model.family != "flow":
        raise ValueError(
            f"rectified reflows a conditional teacher only where it is a flow (SD3, Flux): the student of a {model.kind} "
            "teacher would be a flow in a pipeline whose sampler serves diffusion only. Use distill.method: "
            "consistency, dmd, output, progressive or adversarial"
        )
    if cfg.feature_loss > 0:
        raise ValueError("distill.student.feature_loss is not used by rectified; set it to 0")
    T, K = model.num_train_timesteps, cfg.target_steps
    run = Trainer(
        ckpt_dir,
        {"method": "rectified", "config": asdict(cfg), "teacher": teacher_sha256, "teacher_kind": model.kind},
        cfg.checkpoint_every,
        log,
        cfg.mixed_precision,
        seed=cfg.seed,
    )
    dev = run.device
    teacher_unet = frozen(copy.deepcopy(model.unet)).to(dev)
    # the student is a flow whatever the teacher is: its calls and export go through a flow-matching adapter (a flow
    # teacher's own: its conditions, latents and guidance; else the pixel flow's)
    flow = model if model.family == "flow" else FlowMatchingPixel(model.export(teacher_unet, euler_scheduler(T, K)))
    v_student = partial(amp_velocity, run, flow)
    shape = (model.channels, *model.sample_size)  # the model's space: pixels, or a latent teacher's latents

    # 1. Couplings (z, x₀) from the teacher's ODE solver, cached by teacher sha256.
    pcfg = SimpleNamespace(pairs=cfg.couplings, pairs_steps=cfg.couplings_steps, seed=cfg.seed)
    with run.main_first():  # the main process makes the cache, the others then read it
        z_all, x0_all, c_all, cfile, reused = load_or_make_pairs(
            teacher,
            teacher_sha256 or unkeyed_sha256(teacher),
            pcfg,
            shape,
            dev,
            Path(pairs_dir or "data/pairs"),
            log,
            samples_dir,
        )
    z_all, x0_all = z_all.to(dev), x0_all.to(dev)
    c_all = None if c_all is None else c_all.to(dev)
    held = torch.Generator().manual_seed(cfg.seed + 7)
    held_out = torch.randn((256, *shape), generator=held).to(dev)
    held_cond = model.conditions(256, held, dev)  # a conditional teacher's conditions for it (else None)

    # 2. Reflow: the velocity of the couplings' straight interpolations, cached beside the couplings.
    student = student_like(teacher_unet, cfg.student_channels, cfg.student_layers)
    rfile = reflow_file(cfile, cfg, model.kind)
    reflowed, reflow, reflow_reused = train_reflow(
        run, cfg, student, v_student, z_all, x0_all, rfile, cfile, log, c_all
    )

    # 3. Straightness of the teacher's flow and of the reflowed one, on held-out noise.
    measured = {
        "teacher": straightness(model.velocity, teacher_unet, held_out, cfg.reflow_ode_steps, held_cond),
        "reflowed": straightness(v_student, reflowed, held_out, cfg.reflow_ode_steps, held_cond),
    }
    log(
        f"straightness (per pixel, {cfg.reflow_ode_steps} Euler steps): teacher {measured['teacher']:.4f}, "
        f"reflowed {measured['reflowed']:.4f}"
    )

    # 4. Distillation of the reflowed flow into K Euler steps on the export's grid, towards the reflowed flow's own
    #    couplings (the paper's), or the teacher's, which an exact reflow would reproduce (its paths do not cross).
    final, distilled = reflowed, {}
    if cfg.distill_steps > 0:
        if cfg.distill_targets == "reflowed":
            sigmas = torch.linspace(1.0, 0.0, cfg.reflow_ode_steps + 1).to(dev)
            targets = euler(v_student, reflowed, z_all, sigmas, cond=c_all)
            targets = targets.clamp(-1, 1) if model.clips else targets
        else:
            targets = x0_all
        final, distilled = train_few_step(
            run, cfg, reflowed, v_student, z_all, targets, euler_grid(T, K).to(dev), c_all
        )

    # 5. Export: the stock pipeline and the flow-matching scheduler that samples exactly this grid at K steps.
    summary = {
        "method": "rectified",
        "config": asdict(cfg),
        "teacher_kind": model.kind,
        "straightness": measured,
        "reflow_loss": reflow.get("loss"),
        "final_loss": distilled.get("loss", reflow.get("loss")),
        **sizes(teacher_unet, final),
        "couplings_file": str(cfile),
        "couplings_reused": reused,
        "reflow_file": str(rfile),
        "reflow_reused": reflow_reused,
        "wall_time_s": run.finish(),
        "num_inference_steps": K,
    }
    return with_sampling(model.export(final.cpu(), euler_scheduler(T, K)), model, K), summary


def train_reflow(
    run: Trainer,
    cfg: RectifiedConfig,
    student: torch.nn.Module,
    v_student: Callable,
    z_all: torch.Tensor,
    x0_all: torch.Tensor,
    rfile: Path,
    cfile: Path,
    log: Callable[[str], None],
    c_all: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict, bool]:
    """Phase 0, reflow: `student` learns the velocity of the couplings' straight paths. Returns (the reflowed flow,
    its losses, reused). It depends on the couplings and the reflow's settings, not on the step count, so it is read
    from `rfile` when there (students of other step counts reuse it) or from the checkpoint of a resumed run."""
    if run.skips(0):  # resumed in the distillation: the reflowed flow is in the checkpoint
        reflowed = frozen(student)
        reflowed.load_state_dict(run.resumed_weights("reflow"))
        return reflowed, {}, False
    if rfile.is_file():
        from safetensors.torch import load_file

        log(f"reusing the reflowed flow from {rfile}")
        reflowed = frozen(student)
        reflowed.load_state_dict(load_file(rfile))
        return reflowed, {}, True
    dev = run.device
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def step():
        # a coupling and a time on its straight path, t ~ U(0, 1): this process's shard of the global batch
        idx = torch.randint(0, len(z_all), (cfg.batch_size,), generator=gen).to(dev)
        t = torch.rand((cfg.batch_size,), generator=gen).to(dev)
        idx, t = run.shard(idx, t)
        z, x0, c = z_all[idx], x0_all[idx], None if c_all is None else c_all[idx]
        loss = reflow_loss(z, x0, _v(v_student, student, interpolate(z, x0, t), t, c))
        run.backward(loss, student, opt, ema)
        return {"loss": loss.item()}

    losses = run.phase(
        Phase(
            0,
            "reflow (2-rectified flow)",
            cfg.reflow_steps,
            {"student": student},
            {"student": opt},
            {"student": ema},
            gen,
        ),
        step,
    )
    ema.copy_to(student.parameters())
    reflowed = frozen(student)
    if run.main:
        _save_atomic(reflowed, rfile, {"couplings": cfile.name, "reflow_loss": str(losses.get("loss"))})
    return reflowed, losses, False


def train_few_step(
    run: Trainer,
    cfg: RectifiedConfig,
    reflowed: torch.nn.Module,
    v_student: Callable,
    z_all: torch.Tensor,
    targets: torch.Tensor,
    grid: torch.Tensor,
    c_all: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Phase 1, distillation: a copy of the reflowed flow, sampled with Euler on `grid` (K steps) and
    back-propagated through every step, learns to map each noise z to its target (L2). Returns (student, losses)."""
    K, dev = len(grid) - 1, run.device
    student = student_like(reflowed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_lr or cfg.lr, weight_decay=0.0)
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def step():
        idx = run.shard(torch.randint(0, len(z_all), (cfg.batch_size,), generator=gen).to(dev))
        c = None if c_all is None else c_all[idx]
        loss = (euler_path(v_student, student, z_all[idx], grid, c) - targets[idx]).pow(2).mean()
        run.backward(loss, student, opt, ema)
        return {"loss": loss.item()}

    losses = run.phase(
        Phase(
            1,
            f"distillation ({K} Euler step{'s' if K > 1 else ''})",
            cfg.distill_steps,
            {"student": student, "reflow": reflowed},
            {"student": opt},
            {"student": ema},
            gen,
        ),
        step,
    )
    ema.copy_to(student.parameters())
    return frozen(student), losses
