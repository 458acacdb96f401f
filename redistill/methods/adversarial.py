"""Adversarial diffusion distillation, ADD style (Sauer et al. 2023, "Adversarial Diffusion Distillation",
arXiv:2311.17042), with the teacher as the discriminator's frozen feature network as in its latent
follow-up (LADD, Sauer et al. 2024, arXiv:2403.12015).

The student x̂_θ(x_s, s) generates a clean image from a noised real image at one of its few sampling
timesteps s. Two losses train it (ADD's eq. 4, L = L_adv + λ·L_distill):
- adversarial: a discriminator, small trainable heads on the frozen teacher UNet's block features of
  lightly noised images, tells real images from the student's; hinge loss (ADD section 3.2);
- distillation: the student's image, re-noised to a random t, is denoised by the teacher, and the
  student is pulled towards the teacher's x̂₀ with weight c(t) = ᾱ_t (ADD section 3.3, the
  "exponential" weighting).

The student keeps the teacher's prediction type and its output passes through LCM's c_skip/c_out
boundary scalings, so the export is the teacher kind's stock pipeline + `LCMScheduler`: each step predicts the clean
image and re-noises it to the next timestep, which is ADD's multistep sampler. It is trained on exactly
the timesteps that `LCMScheduler` uses for `target_steps` (and therefore for every power of two below it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from redistill.config import AdversarialParams, settings
from redistill.methods.consistency import consistency_fn, lcm_scheduler
from redistill.methods.student_shape import FeatureMatch, feature_blocks, with_sampling
from redistill.methods.training import (
    Draws,
    Phase,
    Trainer,
    TrainingConfig,
    batch_conditions,
    frozen,
    new_ema,
    sizes,
    student_like,
    warm,
)
from redistill.models import adapter_for
from redistill.models.prediction import alpha_sigma, to_x0_eps


@settings("AdversarialConfig")
class AdversarialConfig(AdversarialParams, TrainingConfig):
    """Settings of one ADD run: params.yaml `distill` (TrainingConfig) plus `distill.adversarial`
    (AdversarialParams). Every field and its default is declared there, once; `method_config` fills it in."""


class Discriminator(nn.Module):
    """Trainable heads on the frozen teacher's down, mid and up block features (a transformer's: each block's image
    tokens); one logit per image."""

    def __init__(self, teacher_unet, call):
        super().__init__()
        self.call = call  # the adapter's network call: the teacher under its conditioning
        self.features = FeatureMatch(teacher_unet, teacher_unet, weight=1.0)  # reuses its block hooks
        if hasattr(teacher_unet, "down_blocks"):  # conv heads on (N, C, H, W) maps
            widths = [b.resnets[-1].conv2.out_channels for b in teacher_unet.down_blocks]
            widths += [teacher_unet.mid_block.resnets[-1].conv2.out_channels]
            widths += [b.resnets[-1].conv2.out_channels for b in teacher_unet.up_blocks]
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, 1, 1))
                for c in widths
            )
        else:  # token heads on (N, L, D) image tokens
            d = int(teacher_unet.config.num_attention_heads * teacher_unet.config.attention_head_dim)
            self.heads = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
                for _ in feature_blocks(teacher_unet)
            )
        self.teacher = teacher_unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        with self.features.teacher():
            self.call(self.teacher, x_t, t, cond)
        feats = self.features.feats["teacher"]
        return sum(head(f).flatten(1).mean(dim=1) for head, f in zip(self.heads, feats))


def distill(
    teacher,
    data: torch.Tensor,
    cfg: AdversarialConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    init: dict | None = None,
):
    """ADD-distil `teacher` on images `data` in [0, 1]; returns (the teacher kind's stock pipeline + LCMScheduler,
    summary)."""
    model = adapter_for(teacher)  # every network call, condition and the export go through it
    sched_cfg = teacher.scheduler.config
    ptype = model.prediction_type  # "flow" for a flow-matching teacher: its velocity, on the straight path
    T = model.num_train_timesteps
    sampler = student_sampler(model, sched_cfg, cfg)
    sampler.set_timesteps(cfg.target_steps)
    run = Trainer(
        ckpt_dir,
        {"method": "adversarial", "config": asdict(cfg), "teacher_prediction": ptype},
        cfg.checkpoint_every,
        log,
        cfg.mixed_precision,
        seed=cfg.seed,
    )
    dev = run.device
    student_t = sampler.timesteps.to(dev)  # the student's sampling timesteps, e.g. 959, 719, 479, 239
    alphas_cumprod = model.noise_path().to(dev)  # the ᾱ schedule, or a flow teacher's straight path
    x_all = model.to_model_space(data).to(dev)  # pixels in [−1, 1], or a latent teacher's VAE latents
    teacher_unet = frozen(copy.deepcopy(model.unet)).to(dev)
    # 1. The student starts from the teacher; the discriminator's heads start fresh on the frozen teacher.
    student = warm(student_like(teacher_unet, cfg.student_channels, cfg.student_layers), init)  # or the champion
    disc = Discriminator(teacher_unet, model.output).to(dev)
    fm = FeatureMatch(teacher_unet, student, cfg.feature_loss)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.disc_lr, betas=(0.0, 0.99), weight_decay=0.0)
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ph = Phase(
        0,
        f"adversarial (steps at {student_t.tolist()})",
        cfg.steps,
        {"student": student, "discriminator": disc.heads},
        {"student": opt, "discriminator": opt_d},
        {"student": ema},
        gen,
    )

    draw = Draws(gen, run, cfg.batch_size, tuple(x_all.shape[1:]), dev)  # every draw, of the global batch

    def step():
        # 2. A real batch x₀, noised to a student timestep s; the student's clean image x̂_θ(x_s, s).
        i = draw.integers(len(x_all))
        x, c = x_all[i], batch_conditions(model, run, i, cfg.batch_size, gen, dev)  # their captions, or drawn
        s = student_t[draw.integers(len(student_t))]
        x_s = model.add_noise(x, draw.noise(), s)
        with run.autocast(), fm.student():
            x_fake = consistency_fn(model, student, x_s, s, c, ptype, alphas_cumprod).float()
        if cfg.feature_loss > 0:  # the teacher's block features on the same (x_s, s) as the student's
            with torch.no_grad(), run.autocast(), fm.teacher():
                model.output(teacher_unet, x_s, s, c)
        # 3. Distillation: re-noise x̂ to t, the teacher's x̂₀ there (no gradient), weight c(t) = ᾱ_t.
        t = draw.integers(T)
        x_fake_t = model.add_noise(x_fake, draw.noise(), t)
        with torch.no_grad(), run.autocast():
            a_t, s_t = alpha_sigma(alphas_cumprod, t)
            x_teacher, _ = to_x0_eps(
                model.teacher_output(teacher_unet, x_fake_t, t, c).float(), x_fake_t, a_t, s_t, ptype
            )
            x_teacher = x_teacher.clamp(-1, 1) if model.clips else x_teacher  # latents are not clipped
        weight = (a_t**2).view(-1)
        l_distill = (weight * (x_fake - x_teacher).pow(2).mean(dim=(1, 2, 3))).mean()
        # 4. Adversarial generator loss on lightly noised student images: −D(x̂_t′).
        t_d = draw.integers(cfg.disc_max_t)
        l_adv = -disc(model.add_noise(x_fake, draw.noise(), t_d), t_d, c).mean()
        l_feat = fm.loss()
        loss = l_adv + cfg.distill_weight * l_distill + l_feat
        run.backward(loss, student, opt, ema)
        # 5. Discriminator step, hinge loss: real images against the (detached) student images.
        t_d = draw.integers(cfg.disc_max_t)
        real = disc(model.add_noise(x, draw.noise(), t_d), t_d, c)
        fake = disc(model.add_noise(x_fake.detach(), draw.noise(), t_d), t_d, c)
        l_disc = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
        run.backward(l_disc, disc.heads, opt_d)
        return {
            "distill": l_distill.item(),
            "adv": l_adv.item(),
            "disc": l_disc.item(),
            **(
                {"feature": float(l_feat.detach() if torch.is_tensor(l_feat) else l_feat)}
                if cfg.feature_loss > 0
                else {}
            ),
        }

    losses = run.phase(ph, step)
    fm.remove()
    disc.features.remove()
    # 6. Export the EMA student with the stock multistep sampler (predict x₀, re-noise, repeat).
    ema.copy_to(student.parameters())
    summary = {
        "method": "adversarial",
        "config": asdict(cfg),
        "final_losses": losses,
        **sizes(teacher_unet, student),
        "student_timesteps": student_t.tolist(),
        "wall_time_s": run.finish(),
        "num_inference_steps": cfg.target_steps,
    }
    return with_sampling(
        model.export(frozen(student).cpu(), student_sampler(model, sched_cfg, cfg)), model, cfg.target_steps
    ), summary


def student_sampler(model, sched_cfg, cfg: AdversarialConfig):
    """The stock multistep sampler the student is trained for and exported with: LCM's on the teacher's ᾱ schedule
    (e.g. 959, 719, 479, 239), or, for a flow teacher, the flow-matching LCM scheduler at σ = 1, (K−1)/K, …, 1/K."""
    if model.family == "flow":
        from redistill.models.flow import lcm_flow_scheduler

        return lcm_flow_scheduler(model.num_train_timesteps, cfg.target_steps)
    return lcm_scheduler(sched_cfg, cfg.solver_steps, clip=model.clips)
