"""Output (fidelity) distillation (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative
Models for Improved Sampling Speed", arXiv:2101.02388), in one step or through a few-step sampler.

1. Run the teacher's deterministic DDIM sampler once over a fixed set of initial noises, keeping each
   (noise x_T, teacher output x₀) pair. The pairs depend only on the teacher, its sampler step count,
   their number and the seed, so they are cached under `data/pairs/` in a file named by the teacher's
   sha256 and reused by every later cycle (`data/pairs` is a DVC-tracked output).
2. Train the student, a copy of the teacher's UNet, so that its sampler maps x_T to x₀:
   - one step (the paper): x̂₀ = s_θ(x_T, T−1), with the L2 loss ‖x̂₀ − x₀‖²;
   - K > 1 steps: the student runs DDIM on its own K-step grid (the progressive method's: first_timestep,
     then T/K apart), keeping the teacher's prediction type and clipping x̂₀ as the stock scheduler does,
     and the L2 loss on the chain's output is back-propagated through all K network calls. The paper's
     objective, applied to the sampler the student will be used with: what the evaluation pairs with the
     teacher on the same noise is exactly what is trained.
3. Export the teacher kind's stock pipeline (a `DDPMPipeline` for pixel teachers): for one step a `DDIMScheduler`
   ("trailing", prediction_type "sample", final α = 1) that runs exactly that call; for K steps the
   `DDIMScheduler` ("leading" with `steps_offset`) that runs exactly the trained chain.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from redistill.config import OutputParams, settings
from redistill.methods.student_shape import FeatureMatch, with_sampling
from redistill.methods.training import Draws, Phase, Trainer, TrainingConfig, frozen, new_ema, sizes, student_like, warm
from redistill.models import adapter_for
from redistill.models.prediction import alpha_sigma, to_x0_eps

STUDENT_PREDICTION = "sample"
# The pairs' noise is drawn from seeds this far from the distill seed, so it never repeats the evaluation's noise
# (generation batch i seeded evaluate.seed + i): a student judged on the noises it was trained to map would be
# judged on its training set. Measured: a student trained on 2,000 pairs that were the evaluation's own draw scored
# 95% recognisable on them and 84% on fresh noise.
PAIR_SEED_OFFSET = 1_000_000


def pair_seed(cfg) -> int:
    """The seed of the pairs' noise: the distill seed moved past every seed the evaluation draws with."""
    return cfg.seed + PAIR_SEED_OFFSET


@settings("OutputConfig")
class OutputConfig(OutputParams, TrainingConfig):
    """Settings of one output-distillation run: params.yaml `distill` (TrainingConfig) plus `distill.output`
    (OutputParams). Every field and its default is declared there, once; `method_config` fills it in."""


def pairs_file(pairs_dir: Path, teacher_sha256: str, cfg: OutputConfig, solver: str = "ddim", draw: str = "") -> Path:
    """The cache file of the pairs: named by the teacher's sha256 and what else fixes the pairs (its ODE
    solver: DDIM for a diffusion teacher, Euler for a flow-matching one; a conditional latent teacher's draw key:
    the prompts drawn from and the guidance)."""
    seed = pair_seed(cfg)
    what = f"{teacher_sha256}|{cfg.pairs_steps}|{cfg.pairs}|{seed}" + ("" if solver == "ddim" else f"|{solver}")
    what += f"|{draw}" if draw else ""
    digest = hashlib.sha256(what.encode()).hexdigest()[:8]
    name = f"{teacher_sha256[:16]}-{solver}{cfg.pairs_steps}-n{cfg.pairs}-s{seed}-{digest}.safetensors"
    return Path(pairs_dir) / name


@torch.no_grad()
def teacher_pairs(teacher, cfg: OutputConfig, shape: tuple[int, ...], device, batch: int = 500):
    """Step 1: (x_T, x₀, conditions) from the teacher's deterministic sampler (`ode_sample`: DDIM, η = 0, the
    teacher's own spacing; a flow-matching teacher's Euler sampler); the conditions are None for an
    unconditional teacher, else one drawn per pair (guidance folded in)."""
    model = adapter_for(teacher)
    unet = model.unet.to(device).eval()
    gen = torch.Generator().manual_seed(pair_seed(cfg))
    noise = torch.randn((cfg.pairs, *shape), generator=gen)
    cond = model.conditions(cfg.pairs, gen)
    outs = []
    for i in range(0, cfg.pairs, batch):
        x = noise[i : i + batch].to(device)
        c = None if cond is None else cond[i : i + batch].to(device)
        x = model.ode_sample(unet, x, cfg.pairs_steps, c)
        outs.append((x.clamp(-1, 1) if model.clips else x).cpu())  # latents are not clipped
    return noise, torch.cat(outs), cond


def unkeyed_sha256(teacher) -> str:
    """The cache key of a teacher not loaded from a folder: the sha256 of its UNet's weights."""
    h = hashlib.sha256()
    for k, v in sorted(adapter_for(teacher).unet.state_dict().items()):
        h.update(k.encode()), h.update(v.cpu().numpy().tobytes())
    return h.hexdigest()


def load_or_make_pairs(
    teacher,
    teacher_sha256: str,
    cfg: OutputConfig,
    shape,
    device,
    pairs_dir: Path,
    log: Callable[[str], None],
    samples_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Path, bool]:
    """The cached pairs of this teacher, or new ones written atomically to the cache; (x_T, x₀, conditions, file,
    reused). A teacher whose pairs are its own samples (`pairs_from_samples`) takes them from the workspace's store of
    drawn samples, `samples_dir`, where the evaluation finds the same draw."""
    from safetensors.torch import load_file, save_file

    model = adapter_for(teacher)
    if samples_dir is not None and model.pairs_from_samples:
        return _pairs_from_samples(teacher, teacher_sha256, cfg, samples_dir, log)
    solver = model.solver
    f = pairs_file(pairs_dir, teacher_sha256, cfg, solver, model.draw_key() if not model.clips else "")
    if f.is_file():
        d = load_file(f)
        log(f"reusing {len(d['noise'])} teacher pairs from {f}")
        return d["noise"], d["x0"], d.get("cond"), f, True
    log(f"generating {cfg.pairs} teacher pairs ({solver} {cfg.pairs_steps} steps) into {f}")
    noise, x0, cond = teacher_pairs(teacher, cfg, shape, device)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tensors = {
        "noise": noise.contiguous(),
        "x0": x0.contiguous(),
        **({} if cond is None else {"cond": cond.contiguous()}),
    }
    metadata = {"teacher_sha256": teacher_sha256, "pairs_steps": str(cfg.pairs_steps), "seed": str(pair_seed(cfg))}
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(f)
    return noise, x0, cond, f, False


def _pairs_from_samples(
    teacher, teacher_sha256: str, cfg: OutputConfig, samples_dir: Path, log: Callable[[str], None]
) -> tuple[torch.Tensor, torch.Tensor, None, Path, bool]:
    """The pairs drawn as the evaluation draws the teacher (`metrics.sample` with DDIM at `pairs_steps`, generation
    batch i seeded `pair_seed + i`, `GENERATION_BATCH` images each) and kept in the same store, `samples_dir`, one
    file per batch: every method and every cycle on this teacher shares them, and a larger set reuses a smaller one's
    batches. Each image is the teacher's deterministic DDIM output from the noise its batch's generator drew, which
    is regenerated here. The seeds never meet the evaluation's (`PAIR_SEED_OFFSET`)."""
    from diffusers import DDIMScheduler, DDPMPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from redistill.config import GENERATION_BATCH
    from redistill.evaluation.sampling import _batches, sample_cached

    view = DDPMPipeline(unet=teacher.unet, scheduler=DDIMScheduler.from_config(teacher.scheduler.config))
    view.set_progress_bar_config(disable=True)
    model = adapter_for(view)
    log(f"teacher pairs: {cfg.pairs} DDIM {cfg.pairs_steps}-step samples from the store {samples_dir}")
    seed = pair_seed(cfg)
    images, reused = sample_cached(
        view,
        None,
        "DDIMScheduler",
        cfg.pairs,
        cfg.pairs_steps,
        seed,
        GENERATION_BATCH,
        Path(samples_dir),
        sha256=teacher_sha256,
    )
    shape = (model.channels, *model.sample_size)
    noise = torch.cat(
        [
            randn_tensor(
                (size, *shape),
                generator=torch.Generator(device=view.device).manual_seed(s),
                device=view.device,
                dtype=view.unet.dtype,
            ).cpu()
            for s, size in _batches(cfg.pairs, seed, GENERATION_BATCH)
        ]
    )
    return noise.float(), model.to_model_space(images), None, Path(samples_dir), reused


def student_chain(
    run: Trainer,
    model,
    student,
    z: torch.Tensor,
    cond,
    grid: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    clip: bool = True,
) -> torch.Tensor:
    """The student's K-step DDIM sampler on `grid` (K steps, then −1), as the exported DDIMScheduler runs it: x̂₀
    clipped, the model's ε; differentiable through every call. On a flow teacher's straight path (`alphas_cumprod`
    a StraightPath, `clip` off) the same step is the Euler step the exported FlowMatchEulerDiscreteScheduler takes."""
    for i in range(len(grid) - 1):
        t = grid[i].expand(len(z))
        a, s = alpha_sigma(alphas_cumprod, t)
        a_next, s_next = alpha_sigma(alphas_cumprod, grid[i + 1].expand(len(z)))
        with run.autocast():
            x0_hat, eps = to_x0_eps(model.output(student, z, t, cond).float(), z, a, s, prediction_type)
        z = a_next * (x0_hat.clamp(-1, 1) if clip else x0_hat) + s_next * eps
    return z


def distill(
    teacher,
    data: torch.Tensor,
    cfg: OutputConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    init: dict | None = None,
    teacher_sha256: str | None = None,
    pairs_dir: Path | None = None,
    samples_dir: Path | None = None,
):
    """Output-distil `teacher` into a student of `cfg.target_steps` steps; `data` only fixes the image shape
    (the pairs are the training set). Returns (the teacher kind's stock pipeline, summary)."""
    from redistill.methods.progressive import check_grid, flow_grid, student_grid, student_scheduler

    model = adapter_for(teacher)  # every network call, condition and the export go through it
    sched_cfg = teacher.scheduler.config
    T = sched_cfg.num_train_timesteps
    K, ptype = cfg.target_steps, model.prediction_type
    flow = model.family == "flow"  # a flow teacher: Euler on the straight path, the student's own velocity
    if K > 1 and not flow:
        check_grid(K, T, cfg.first_timestep)
    run = Trainer(
        ckpt_dir,
        {"method": "output", "config": asdict(cfg), "teacher": teacher_sha256},
        cfg.checkpoint_every,
        log,
        cfg.mixed_precision,
        seed=cfg.seed,
    )
    dev = run.device
    if teacher_sha256 is None:  # a teacher not loaded from a folder: key the cache on its weights
        teacher_sha256 = unkeyed_sha256(teacher)
    shape = (model.channels, *model.sample_size)  # the model's space: pixels, or a latent teacher's latents
    # 1. The teacher's (x_T, x₀) pairs from its deterministic sampler, cached by the teacher's sha256.
    with run.main_first():  # the main process makes the cache, the others then read it
        noise, x0, cond, pfile, reused = load_or_make_pairs(
            teacher, teacher_sha256, cfg, shape, dev, Path(pairs_dir or "data/pairs"), log, samples_dir
        )
    noise, x0 = noise.to(dev), x0.to(dev)
    cond = None if cond is None else cond.to(dev)
    teacher_unet = frozen(copy.deepcopy(model.unet)).to(dev)
    # 2. The student starts as a copy of the teacher's UNet (or a smaller one initialised from it).
    student = warm(student_like(teacher_unet, cfg.student_channels, cfg.student_layers), init)  # or the champion
    fm = FeatureMatch(teacher_unet, student, cfg.feature_loss)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t_last = run.shard(torch.full((cfg.batch_size,), T - 1, device=dev, dtype=torch.long))
    # K > 1: e.g. 959, 709, 459, 209, then −1 (clean); a flow teacher's: σ·T at σ = 1, (K−1)/K, …, 1/K, then −1
    grid = (flow_grid(K, T) if flow else student_grid(K, T, cfg.first_timestep)).to(dev)
    alphas_cumprod = model.noise_path().to(dev)
    draw = Draws(gen, run, cfg.batch_size, shape, dev)  # every draw, of the global batch

    def step():
        # A batch of pairs; the student's sampler maps x_T to x̂₀ (one call at T−1, the paper's, or its K-step
        # DDIM chain, the sampler it will be used with), pulled to the teacher's x₀ by the L2 loss.
        idx = draw.integers(len(noise))
        z, c = noise[idx], None if cond is None else cond[idx]
        if cfg.feature_loss > 0:  # the teacher's block features on the same input, for feature matching
            with torch.no_grad(), fm.teacher():
                model.output(teacher_unet, z, t_last if K == 1 and not flow else grid[0].expand(len(idx)), c)
        with run.autocast(), fm.student():
            if K == 1 and not flow:
                pred = model.output(student, z, t_last, c).float()
            else:  # a flow student's one step too: x̂₀ = x − v̂ at σ = 1
                pred = student_chain(
                    run, model, student, z, c, grid, alphas_cumprod, ptype, clip=model.clips and not flow
                )
        loss = (pred - x0[idx]).pow(2).mean() + fm.loss()
        run.backward(loss, student, opt, ema)
        return {"loss": loss.item()}

    losses = run.phase(
        Phase(
            0,
            f"output distillation ({K} step{'s' if K > 1 else ''})",
            cfg.steps,
            {"student": student},
            {"student": opt},
            {"student": ema},
            gen,
        ),
        step,
    )
    fm.remove()
    # 3. Export: DDIM "trailing" at 1 step calls the student once at T−1 and returns its x₀; at K steps,
    #    DDIM on the trained grid.
    ema.copy_to(student.parameters())
    summary = {
        "method": "output",
        "config": asdict(cfg),
        "final_loss": losses.get("loss"),
        **sizes(teacher_unet, student),
        "pairs_file": str(pfile),
        "pairs_reused": reused,
        "wall_time_s": run.finish(),
        "num_inference_steps": K,
    }
    if flow:
        from redistill.models.flow import euler_scheduler

        scheduler = euler_scheduler(T, K)
    elif K == 1:
        scheduler = one_step_scheduler(sched_cfg, model.clips)
    else:
        scheduler = student_scheduler(sched_cfg, ptype, cfg.first_timestep, K, clip=model.clips)
    return with_sampling(model.export(frozen(student).cpu(), scheduler), model, K), summary


def one_step_scheduler(teacher_scheduler_config, clip: bool = True):
    """The stock DDIM ("trailing", x₀ prediction) that at 1 step calls the student once at T−1 and returns its
    output (clipped to [−1, 1] in pixels, `clip`; latents are not)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        teacher_scheduler_config,
        prediction_type=STUDENT_PREDICTION,
        timestep_spacing="trailing",
        clip_sample=clip,
        set_alpha_to_one=True,
    )
