"""Distribution matching distillation, DMD2 style (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", arXiv:2405.14867; DMD: Yin et al. 2023, arXiv:2311.18828).

The student generator G_θ turns noise into images in a few steps. It is trained to minimise the KL
divergence between its output distribution and the teacher's, whose gradient is the difference of two
scores on the noised generator output (DMD eq. 7):
- the real score: the frozen teacher;
- the fake score: a copy of the teacher trained online, with the ordinary denoising loss, on the
  generator's own samples, so it tracks the generator's distribution.
DMD2's changes, all here: no regression loss; two time-scale updates (`fake_updates` fake-score steps
per generator step, 5 in the paper); an optional GAN term whose discriminator is a head on the fake
score's block features (`gan_weight`); multi-step generation with "backward simulation" replaced by the
simpler real-data noising of the generator's input timesteps (as in its few-step ImageNet setting).

The generator keeps the teacher's prediction type and its output passes through LCM's boundary scalings,
so the export is a stock `DDPMPipeline` + `LCMScheduler` at the timesteps it was trained on.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from redistill.methods.adversarial import Discriminator
from redistill.methods.consistency import consistency_fn, lcm_pipeline, lcm_scheduler
from redistill.methods.student_shape import FeatureMatch
from redistill.methods.training import Phase, Trainer, TrainingConfig, frozen, new_ema, sizes, student_like
from redistill.prediction import alpha_sigma, to_x0_eps


@dataclass
class DMDConfig(TrainingConfig):
    """Settings of one DMD2 run (params.yaml `distill` and `distill.dmd`)."""

    steps: int = 1000  # generator steps
    fake_updates: int = 5  # fake-score (and discriminator) steps per generator step: the two time-scale rule
    fake_lr: float = 3.0e-4
    gan_weight: float = 0.0  # 0 turns the GAN term off (DMD2 uses it; it costs a discriminator step)
    t_min: int = 20  # the DMD loss noises the generator output at t ~ U{t_min..t_max}
    t_max: int = 980
    solver_steps: int = 48  # the LCMScheduler grid of the generator's timesteps (starts at 959)


def distill(teacher, data: torch.Tensor, cfg: DMDConfig, ckpt_dir: Path, log: Callable[[str], None] = print):
    """DMD2-distil `teacher` on images `data` in [0, 1]; returns (stock DDPMPipeline + LCMScheduler, summary)."""
    sched_cfg = teacher.scheduler.config
    ptype = sched_cfg.prediction_type
    sampler = lcm_scheduler(sched_cfg, cfg.solver_steps)
    sampler.set_timesteps(cfg.target_steps)
    run = Trainer(ckpt_dir, {"method": "dmd", "config": asdict(cfg), "teacher_prediction": ptype},
                  cfg.checkpoint_every, log, cfg.mixed_precision, seed=cfg.seed)
    dev = run.device
    gen_t = sampler.timesteps.to(dev)
    alphas_cumprod = teacher.scheduler.alphas_cumprod.float().to(dev)
    x_all = (data.float() * 2.0 - 1.0).to(dev)
    real_score = frozen(copy.deepcopy(teacher.unet)).to(dev)
    # 1. Generator and fake score both start as the teacher (DMD section 3.1).
    student = student_like(real_score, cfg.student_channels, cfg.student_layers)
    fake_score = student_like(real_score)
    disc = Discriminator(fake_score).to(dev) if cfg.gan_weight > 0 else None
    fm = FeatureMatch(real_score, student, cfg.feature_loss)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake_score.parameters(), lr=cfg.fake_lr, weight_decay=0.0)
    models = {"student": student, "fake_score": fake_score}
    optimizers = {"student": opt, "fake_score": opt_fake}
    if disc is not None:
        opt_disc = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.fake_lr, betas=(0.0, 0.99), weight_decay=0.0)
        models["discriminator"], optimizers["discriminator"] = disc.heads, opt_disc
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ph = Phase(0, f"dmd (steps at {gen_t.tolist()}, {cfg.fake_updates} fake updates)", cfg.steps, models,
               optimizers, {"student": ema}, gen)

    def randint(high, low=0):
        return torch.randint(low, high, (cfg.batch_size,), generator=gen).to(dev)

    def noised(x, t):
        a, s = alpha_sigma(alphas_cumprod, t)
        eps = torch.randn(x.shape, generator=gen).to(dev)
        return a * x + s * eps, eps

    def x0_of(unet, z, t):
        a, s = alpha_sigma(alphas_cumprod, t)
        return to_x0_eps(unet(z, t).sample.float(), z, a, s, ptype)[0]

    def generate(x_real):
        # the generator's input: a real image noised to one of its timesteps (few-step DMD2)
        s = gen_t[randint(len(gen_t))]
        z, _ = noised(x_real, s)
        with run.autocast(), fm.student():
            return consistency_fn(student, z, s, ptype, alphas_cumprod).float()

    def step():
        x_real = x_all[randint(len(x_all))]
        # 2. Two time-scale rule: the fake score (and discriminator) take `fake_updates` steps on fresh
        #    generator samples: denoising loss ‖ε̂_fake(x̂_t, t) − ε‖² in the teacher's parametrisation.
        for _ in range(cfg.fake_updates):
            with torch.no_grad():
                x_gen = generate(x_real)
            t = randint(sched_cfg.num_train_timesteps)
            z, eps = noised(x_gen, t)
            a, s = alpha_sigma(alphas_cumprod, t)
            with run.autocast():
                pred = fake_score(z, t).sample.float()
            target = {"epsilon": eps, "v_prediction": a * eps - s * x_gen, "sample": x_gen}[ptype]
            l_fake = (pred - target).pow(2).mean()
            run.backward(l_fake, fake_score, opt_fake)
            if disc is not None:
                t_d = randint(cfg.t_max, cfg.t_min)
                l_disc = (torch.nn.functional.softplus(-disc(noised(x_real, t_d)[0], t_d)).mean()
                          + torch.nn.functional.softplus(disc(noised(x_gen, t_d)[0], t_d)).mean())
                run.backward(l_disc, disc.heads, opt_disc)
        # 3. Generator step: the distribution-matching gradient (p_fake − p_real) / mean|x̂ − p_real|,
        #    applied through the stop-gradient surrogate ½‖x̂ − sg(x̂ − grad)‖² (DMD eq. 7 and 8).
        x_gen = generate(x_real)
        t = randint(cfg.t_max, cfg.t_min)
        z, _ = noised(x_gen, t)
        with torch.no_grad(), run.autocast():
            with fm.teacher():
                p_real = x0_of(real_score, z, t).clamp(-1, 1)
            p_fake = x0_of(fake_score, z, t).clamp(-1, 1)
            norm = (x_gen - p_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)
            grad = (p_fake - p_real) / norm
        l_dmd = 0.5 * (x_gen - (x_gen - grad).detach()).pow(2).mean()
        loss = l_dmd + fm.loss()
        losses = {"dmd": l_dmd.item(), "fake": l_fake.item()}
        # 4. Optional GAN term (DMD2 section 4.2): the generator fools the fake score's discriminator head.
        if disc is not None:
            t_d = randint(cfg.t_max, cfg.t_min)
            l_gan = torch.nn.functional.softplus(-disc(noised(x_gen, t_d)[0], t_d)).mean()
            loss = loss + cfg.gan_weight * l_gan
            losses["gan"] = l_gan.item()
        run.backward(loss, student, opt, ema)
        return losses

    losses = run.phase(ph, step)
    fm.remove()
    if disc is not None:
        disc.features.remove()
    # 5. Export the EMA generator with the stock multistep sampler.
    ema.copy_to(student.parameters())
    summary = {"method": "dmd", "config": asdict(cfg), "final_losses": losses, **sizes(real_score, student),
               "student_timesteps": gen_t.tolist(), "wall_time_s": run.finish(),
               "num_inference_steps": cfg.target_steps}
    return lcm_pipeline(frozen(student).cpu(), sched_cfg, cfg.solver_steps), summary
