"""The `teacher` stage: train a DDPM (Ho et al. 2020, arXiv:2006.11239) on an image folder.

The teacher is a stock diffusers `DDPMPipeline` (UNet2DModel + DDPMScheduler, ε-prediction, 1,000
training timesteps) whose UNet holds the EMA weights, saved with safetensors weights. The recipe adds
two well-known accelerations for a CPU budget: the cosine noise schedule (Nichol & Dhariwal 2021), which
suits tiny images, and Min-SNR-γ loss weighting (Hang et al. 2023, arXiv:2303.09556).

With `teacher.class_conditional` the UNet also takes the data's class labels (`num_class_embeds` = classes + 1)
and is trained for classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): each label is replaced by
the extra null class with probability `label_dropout`, so one network learns both the conditional and the
unconditional model. It is saved as a `ClassConditionalPipeline` that samples at `guidance_scale`.

With `teacher.objective: flow_matching` the same UNet is trained as a flow-matching model instead (Lipman et al.
2023, arXiv:2210.02747; rectified flow, Liu et al. 2023, arXiv:2209.03003), in diffusers' convention: on the
straight path x_σ = (1 − σ)·x₀ + σ·ε it predicts the velocity ε − x₀ at timestep σ·T, with σ drawn
logit-normal and shifted by `shift` as Stable Diffusion 3 is trained (Esser et al. 2024, arXiv:2403.03206). It
is saved as a stock `DDPMPipeline` folder whose scheduler is a `FlowMatchEulerDiscreteScheduler` with that
shift, which plain diffusers samples.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from redistill.config import TeacherParams
from redistill.core import checkpoint
from redistill.data.images import ImageSet
from redistill.models.pipelines import PipelineError, pipeline_sha256, save_pipeline

# ---------------------------------------------------------------------------------------------------


def build_unet(p: TeacherParams, channels: int, sample_size: int, num_classes: int | None = None):
    """The teacher's UNet2DModel: plain ResNet down/up blocks, sized for tiny images; with `num_classes`, class
    embeddings for those classes plus the null class `num_classes`."""
    from diffusers import UNet2DModel

    n = len(p.block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(p.block_out_channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        **({} if num_classes is None else {"num_class_embeds": num_classes + 1}),
    )


def build_scheduler(p: TeacherParams):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if p.objective == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=p.num_train_timesteps, shift=p.shift)

    return DDPMScheduler(
        num_train_timesteps=p.num_train_timesteps,
        beta_schedule=p.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def class_labels(data: ImageSet) -> tuple[torch.Tensor, int]:
    """The data's labels as a tensor, and the number of classes (max label + 1); refuses unlabelled data."""
    from redistill.data.base import DataError

    if data.labels is None:
        raise DataError(
            "teacher.class_conditional is true but the training images have no labels; add a labels.csv "
            "(file,label rows) beside the images, or set teacher.class_conditional to false"
        )
    if len(data.labels) and data.labels.min() < 0:
        raise DataError(
            f"class labels must be 0 or more for teacher.class_conditional, got {int(data.labels.min())} in labels.csv"
        )
    return torch.from_numpy(data.labels).long(), int(data.labels.max()) + 1


def cfg_labels(y: torch.Tensor, null_class: int, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training: each label replaced by `null_class` with probability `dropout`."""
    drop = torch.rand(y.shape, generator=generator) < dropout
    return torch.where(drop, torch.full_like(y, null_class), y)


def _fine_tune_start(teacher: Path, data: ImageSet):
    """The UNet and scheduler of an existing ε teacher, to train on (safetensors only)."""
    from redistill.models.pipelines import check_fits, load_pipeline

    pipe = load_pipeline(teacher)
    check_fits(pipe, teacher, data.channels, data.size)
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise PipelineError(
            f"{teacher} predicts {pipe.scheduler.config.prediction_type}; the teacher recipe fine-tunes "
            "ε-prediction teachers only"
        )
    return pipe.unet.train().requires_grad_(True), pipe.scheduler


def flow_sigmas(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels of a flow-matching teacher: σ = sigmoid(u), u ~ N(0, 1) (SD3's logit-normal), then
    the scheduler's shift σ' = s·σ / (1 + (s − 1)·σ)."""
    sigma = torch.sigmoid(torch.randn((n,), generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights for an ε-prediction loss: min(SNR, γ) / SNR (Hang et al. 2023)."""
    abar = alphas_cumprod[timesteps]
    snr = abar / (1.0 - abar)
    return torch.clamp(snr, max=gamma) / snr


def _recipe_hash(p: TeacherParams, data: ImageSet) -> str:
    d = dict(vars(p))
    d.pop("checkpoint_every")
    d.pop("name")
    if p.objective == "ddpm":  # the fingerprint of before flow matching existed, so its checkpoints still resume
        d.pop("objective"), d.pop("shift")
    if p.class_conditional:  # the labels are training data too
        d["labels_sha"] = hashlib.sha256(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes()).hexdigest()
    else:  # unconditional: the fingerprint of before these settings existed, so its checkpoints still resume
        for key in ("class_conditional", "label_dropout", "guidance_scale"):
            d.pop(key)
    d["data_shape"] = list(data.images.shape)
    d["data_sum"] = float(data.images.sum())
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_teacher(
    p: TeacherParams,
    data: ImageSet,
    out: Path,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    keep_checkpoints: int = 2,
    init: Path | None = None,
) -> dict:
    """Train the DDPM teacher on `data` and save it as a DDPMPipeline folder at `out`.

    With `init` (a teacher folder), fine-tune that teacher instead of starting from fresh weights: its UNet
    and scheduler are trained on for `p.train_steps` more steps (the `finetune` stage makes a new teacher
    this way). Resumes from the latest checkpoint in `ckpt_dir` when its recipe matches. Returns a summary
    with the wall time. `out` must not exist yet: a teacher is an input of later stages and is never
    overwritten.
    """
    from diffusers import DDPMPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    out = Path(out)
    if out.exists():
        raise PipelineError(f"{out} already exists; a teacher is never overwritten. Pick a new --out name")
    torch.manual_seed(p.seed)
    x_all = torch.from_numpy(data.images) * 2.0 - 1.0  # [0,1] → [-1,1], the range the scheduler assumes
    if p.objective == "flow_matching" and p.class_conditional:
        raise PipelineError(
            "teacher.objective flow_matching trains unconditional teachers; set teacher.class_conditional to false"
        )
    y_all, num_classes = class_labels(data) if p.class_conditional else (None, None)
    if init is None:
        unet, scheduler = build_unet(p, data.channels, data.size[0], num_classes), build_scheduler(p)
    else:
        if p.objective != "ddpm":
            raise PipelineError("fine-tuning serves DDPM (ε) teachers; train a flow-matching teacher from scratch")
        unet, scheduler = _fine_tune_start(Path(init), data)
        embeds = unet.config.num_class_embeds
        if p.class_conditional and embeds != num_classes + 1:
            raise PipelineError(
                f"{init} has {embeds or 'no'} class embeddings but the data's {num_classes} classes and "
                f"the null class need {num_classes + 1}; fine-tune a class-conditional teacher of "
                "these classes"
            )
        if not p.class_conditional and embeds is not None:
            raise PipelineError(
                f"{init} is class-conditional ({embeds} class embeddings); set teacher.class_conditional "
                "to true and train on labelled data to fine-tune it"
            )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, p.warmup_steps, p.train_steps)
    ema = EMAModel(unet.parameters(), decay=p.ema_decay, use_ema_warmup=True, power=2 / 3)
    gen = torch.Generator().manual_seed(p.seed)
    flow = p.objective == "flow_matching"

    # Resume: the latest checkpoint of the same recipe (a changed recipe starts afresh).
    recipe = _recipe_hash(p, data) + ("" if init is None else "-" + pipeline_sha256(Path(init))[:16])
    ckpt_dir = Path(ckpt_dir)
    step, elapsed = 0, 0.0
    found = checkpoint.latest(ckpt_dir)
    if found and found[1].get("recipe") == recipe:
        last, meta = found
        unet.load_state_dict(checkpoint.load_weights(last, "unet"))
        state = checkpoint.load_state(last)
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        gen.set_state(state["generator"])
        step, elapsed = meta["step"], meta["elapsed_s"]
        log(f"resumed from {last} at step {step}")
    elif found:
        log(f"checkpoints in {ckpt_dir} belong to another recipe; starting afresh")
        shutil.rmtree(ckpt_dir)

    unet.train()
    t_start = time.perf_counter() - elapsed
    losses: list[float] = []
    while step < p.train_steps:
        # 1. A minibatch of clean images, noised to a uniformly drawn timestep (Ho et al. Alg. 1).
        idx = torch.randint(0, len(x_all), (p.batch_size,), generator=gen)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        if flow:  # 1-2 (flow matching). The straight path's point at σ and its velocity ε − x₀, plain MSE.
            sigma = flow_sigmas(p.batch_size, p.shift, gen).view(-1, 1, 1, 1)
            xt = (1 - sigma) * x0 + sigma * noise
            loss = (unet(xt, sigma.flatten() * p.num_train_timesteps).sample - (noise - x0)).pow(2).mean()
        else:
            loss = _ddpm_loss(unet, scheduler, p, x0, noise, idx, y_all, num_classes, gen)
        # 3. Update, then the EMA of the weights that becomes the teacher.
        checkpoint.update(loss, unet, optimizer, ema, lr_sched)
        step += 1
        losses.append(loss.item())
        _progress(log, step, p, losses, lr_sched, t_start)
        # 4. Snapshot: resumable state, model weights, then the meta that marks it complete.
        _snapshot(ckpt_dir, step, p, unet, optimizer, lr_sched, ema, gen, recipe, t_start, keep_checkpoints)

    train_time = time.perf_counter() - t_start
    ema.copy_to(unet.parameters())
    unet.eval()
    summary = {
        "recipe": dict(vars(p)),
        **({"fine_tuned_from": {"path": str(init), "sha256": pipeline_sha256(Path(init))}} if init is not None else {}),
        "train_time_s": round(train_time, 1),
        "train_steps": p.train_steps,
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
        "num_images": len(data),
        **({"num_classes": num_classes} if p.class_conditional else {}),
        **({"objective": p.objective, "shift": p.shift} if flow else {}),
        "threads": torch.get_num_threads(),
    }
    if p.class_conditional:
        from redistill.models.class_pipeline import ClassConditionalPipeline

        pipe = ClassConditionalPipeline(unet, scheduler, null_class=num_classes, guidance_scale=p.guidance_scale)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    save_pipeline(pipe, out, extra={"redistill_teacher.json": summary})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


def _progress(log, step: int, p: TeacherParams, losses: list[float], lr_sched, t_start: float) -> None:
    if step % 200 == 0 or step == p.train_steps:
        log(
            f"step {step}/{p.train_steps} loss {np.mean(losses[-200:]):.4f} "
            f"lr {lr_sched.get_last_lr()[0]:.2e} {time.perf_counter() - t_start:.0f}s"
        )


def _snapshot(
    ckpt_dir: Path,
    step: int,
    p: TeacherParams,
    unet,
    optimizer,
    lr_sched,
    ema,
    gen,
    recipe: str,
    t_start: float,
    keep: int,
) -> None:
    """A resumable checkpoint every `checkpoint_every` steps: state, model weights, then the meta that marks it complete."""
    if step % p.checkpoint_every == 0 and step < p.train_steps:
        checkpoint.save(
            ckpt_dir / f"checkpoint-{step}",
            {"unet": unet.state_dict()},
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "ema": ema.state_dict(),
                "generator": gen.get_state(),
            },
            {"step": step, "order": step, "recipe": recipe, "elapsed_s": time.perf_counter() - t_start},
        )
        checkpoint.prune(ckpt_dir, keep)


def _ddpm_loss(unet, scheduler, p: TeacherParams, x0, noise, idx, y_all, num_classes, gen) -> torch.Tensor:
    """Steps 1-2 of the DDPM objective: x₀ noised to a uniformly drawn timestep (Ho et al. Alg. 1), then the
    ε-prediction loss, Min-SNR-γ weighted so that the easy low-noise steps do not dominate."""
    t = torch.randint(0, p.num_train_timesteps, (p.batch_size,), generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    # 1b. Class-conditional: the batch's labels, some dropped to the null class (drawn after the
    # unconditional draws, from the same generator, so the unconditional recipe and resume stay exact).
    cond = {} if y_all is None else {"class_labels": cfg_labels(y_all[idx], num_classes, p.label_dropout, gen)}
    per_example = (unet(xt, t, **cond).sample - noise).pow(2).mean(dim=(1, 2, 3))
    if p.snr_gamma > 0:
        per_example = per_example * min_snr_weight(scheduler.alphas_cumprod, t, p.snr_gamma)
    return per_example.mean()


def train_in_workspace(
    root: Path,
    recipe: TeacherParams,
    out: Path,
    data: Path,
    log: Callable[[str], None] = print,
    init: Path | None = None,
) -> dict:
    """Train a teacher into `out` with `recipe` on the images in `data` (from `init` when given); its checkpoints
    resume under <root>/runs/teacher/<name>/checkpoints."""
    from redistill.data.images import load_image_folder, safe_name

    ckpt = root / "runs" / "teacher" / safe_name(out.name) / "checkpoints"
    return train_teacher(recipe, load_image_folder(data), out, ckpt, log=log, init=init)
