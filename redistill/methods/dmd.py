"""Distribution matching distillation, DMD2 style (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", arXiv:2405.14867; DMD: Yin et al. 2023, arXiv:2311.18828).

The student generator G_θ turns noise into images in a few steps. It is trained to minimise the KL
divergence between its output distribution and the teacher's, whose gradient is the difference of two
scores on the noised generator output (DMD eq. 7):
- the real score: the frozen teacher;
- the fake score: a copy of the teacher trained online, with the ordinary denoising loss, on the
  generator's own samples, so it tracks the generator's distribution.

DMD2's changes, all here:
- two time-scale updates: `fake_updates` fake-score steps per generator step;
- the generator's first step starts from pure noise, as it does when sampling; the input of a later step
  i is either made by running the generator itself through steps 0..i−1 ("backward simulation", DMD2
  section 4.3, `backward_simulation: true`), re-noising each clean estimate with fresh noise as
  `LCMScheduler` does, or a real image noised to step i's timestep (DMD2's few-step ImageNet setting, the
  default: measured on the digits teacher it keeps the class mix, where backward simulation on a CPU
  budget drifted to 3× more sixes than eights, README "Measured figures");
- an optional GAN term on **real** images (DMD2 section 4.2): a discriminator head on the fake score's
  block features tells noised real images from noised generator images (`gan_weight`);
- optionally DMD1's regression loss on cached (noise, teacher output) pairs (`regression_weight`, one-step
  generators only: the first of several steps estimates a mean, not the teacher's ODE end point).

The generator keeps the teacher's prediction type and its output passes through LCM's boundary scalings,
so the export is the teacher kind's stock pipeline + `LCMScheduler` on the timesteps it was trained on.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from redistill.methods.adversarial import Discriminator
from redistill.methods.consistency import lora_export, lora_student
from redistill.methods.dmd_generator import (
    DMDConfig,
    Generator,
    _first_student,
    _output_dir,
    check_settings,
    disc_logits,
    generator_timesteps,
    lcm_sampler,
)
from redistill.methods.student_shape import FeatureMatch, with_sampling
from redistill.methods.training import Draws, Phase, Trainer, frozen, new_ema, sizes, student_like, warm
from redistill.models import adapter_for
from redistill.models.lora import add_lora
from redistill.models.prediction import alpha_sigma, to_x0_eps


def dmd_gradient(x_gen: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """DMD's KL gradient in x-space, normalised per image (DMD eq. 8): (p_fake − p_real) / mean|x − p_real|."""
    norm = (x_gen - p_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)
    return (p_fake - p_real) / norm


def dmd_loss(x_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The stop-gradient surrogate ½‖x̂ − sg(x̂ − grad)‖², whose gradient in x̂ is `grad` (DMD eq. 7)."""
    return 0.5 * (x_gen - (x_gen - grad).detach()).pow(2).mean()


def fake_score_loss(
    pred: torch.Tensor,
    eps: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The fake score's denoising loss on generator samples `x0` noised with `eps`, in the teacher's parametrisation."""
    target = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0, "flow": eps - x0}[prediction_type]
    return (pred - target).pow(2).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN loss of the discriminator: real images score high, generated ones low."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating GAN loss: its noised samples should pass the discriminator as real."""
    return F.softplus(-fake_logits).mean()


def x0_estimate(
    output: torch.Tensor, z: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x̂₀ of a score network's output on z_t."""
    a, s = alpha_sigma(alphas_cumprod, t)
    return to_x0_eps(output.float(), z, a, s, prediction_type)[0]


def distill(
    teacher,
    data: torch.Tensor,
    cfg: DMDConfig,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    init: dict | None = None,
    teacher_sha256: str | None = None,
    pairs_dir: Path | None = None,
    teacher_uri: str | None = None,
    samples_dir: Path | None = None,
):
    """DMD2-distil `teacher` on images `data` in [0, 1]; returns (the teacher kind's stock pipeline + its
    scheduler, summary)."""
    model = adapter_for(teacher)  # every network call, condition, noising and the export go through it
    sched_cfg = teacher.scheduler.config
    ptype = model.prediction_type  # "flow" for a flow-matching teacher: its velocity, on the straight path
    T, K = model.num_train_timesteps, cfg.target_steps
    check_settings(cfg, model)
    clip = (lambda x: x.clamp(-1, 1)) if model.clips else (lambda x: x)  # a latent x̂₀ is not clipped
    chain = cfg.start != "teacher"  # a deterministic sampler: noise → image, paired with the teacher's output
    x0_call = chain and K == 1 and cfg.start == "output"  # the output method's 1-step student: x₀ at T−1
    # the regression needs a deterministic generator: an LCM generator's first step estimates a mean image
    # and its later steps add fresh noise, so no noise has one "teacher output" to regress onto
    cfg = replace(cfg, regression_weight=cfg.regression_weight if chain else 0.0)
    if chain and K > 1:
        from redistill.methods.progressive import check_grid

        check_grid(K, T, cfg.first_timestep)
    keyed = cfg.regression_weight > 0 or cfg.start == "output"  # the teacher's pairs enter the run
    run = Trainer(
        ckpt_dir,
        {
            "method": "dmd",
            "config": asdict(cfg),
            "teacher_prediction": ptype,
            **({"teacher": teacher_sha256} if keyed else {}),
        },
        cfg.checkpoint_every,
        log,
        cfg.mixed_precision,
        seed=cfg.seed,
    )
    dev = run.device
    gen_t = generator_timesteps(sched_cfg, cfg, chain, x0_call, flow=model.family == "flow").to(dev)
    path = model.noise_path().to(dev)  # the ᾱ schedule, or a flow teacher's straight path
    x_all = model.to_model_space(data).to(dev)  # pixels in [−1, 1], or a latent teacher's VAE latents
    shape = tuple(x_all.shape[1:])
    pairs = None
    if cfg.regression_weight > 0:
        from redistill.methods.output import OutputConfig, load_or_make_pairs, unkeyed_sha256

        pcfg = OutputConfig(pairs=cfg.pairs, pairs_steps=cfg.pairs_steps, seed=cfg.seed)
        with run.main_first():  # the main process makes the cache, the others then read it
            noise, x0, cond, _, _ = load_or_make_pairs(
                teacher,
                teacher_sha256 or unkeyed_sha256(teacher),
                pcfg,
                shape,
                dev,
                Path(pairs_dir or "data/pairs"),
                log,
                samples_dir,
            )
        pairs = (noise.to(dev), x0.to(dev), None if cond is None else cond.to(dev))
    real_score = frozen(copy.deepcopy(model.unet)).to(dev)
    # Generator and fake score both start as the teacher (DMD section 3.1); or the generator starts as a
    # deterministic few-step student distilled first (DMD1 starts from a regression-trained generator): the
    # output-distilled one, or the progressive one.
    if chain and init is None and not run.resume_path:
        init = _first_student(teacher, data, cfg, ckpt_dir, log, teacher_sha256, pairs_dir, run.main, samples_dir)
    # A LoRA student (DMD2 on SDXL trains adapters too): the generator and the fake score are each the teacher plus
    # an adapter of their own.
    if cfg.lora_rank:
        student = lora_student(real_score, cfg, init)
        fake_score = add_lora(copy.deepcopy(real_score), cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets)
    else:
        student = warm(student_like(real_score, cfg.student_channels, cfg.student_layers), init)  # or the champion
        fake_score = student_like(real_score)
    disc = Discriminator(fake_score, model.output).to(dev) if cfg.gan_weight > 0 else None
    fm = FeatureMatch(real_score, student, cfg.feature_loss)
    opt = torch.optim.AdamW([w for w in student.parameters() if w.requires_grad], lr=cfg.lr, weight_decay=0.0)
    opt_fake = torch.optim.AdamW(
        [w for w in fake_score.parameters() if w.requires_grad], lr=cfg.fake_lr, weight_decay=0.0
    )
    models = {"student": student, "fake_score": fake_score}
    optimizers = {"student": opt, "fake_score": opt_fake}
    if disc is not None:
        opt_disc = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.fake_lr, betas=(0.0, 0.99), weight_decay=0.0)
        models["discriminator"], optimizers["discriminator"] = disc.heads, opt_disc
    ema = new_ema(student, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ph = Phase(
        0,
        f"dmd (steps at {gen_t.tolist()}, {cfg.fake_updates} fake updates)",
        cfg.steps,
        models,
        optimizers,
        {"student": ema},
        gen,
    )
    draw = Draws(gen, run, cfg.batch_size, shape, dev)
    g = Generator(
        run,
        model,
        student,
        gen_t,
        path,
        ptype,
        K,
        chain,
        x0_call,
        cfg.backward_simulation,
        real_score,
        fm,
        cfg.feature_loss,
    )

    def step():
        # 1. A real batch and its conditions (the batch's captions, or drawn conditions; else None).
        i_real = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x_real = x_all[i_real.to(dev)]
        c = model.conditions_at(i_real, cfg.batch_size, gen, dev)
        x_real, c = run.shard(x_real, c)
        # 2. Two time-scale rule: the fake score (and the discriminator) take `fake_updates` steps on fresh
        #    generator samples: the denoising loss in the teacher's parametrisation.
        for _ in range(cfg.fake_updates):
            x_gen = g.sample(draw, False, x_real, c)
            t = draw.integers(T)
            eps = draw.noise()
            z = model.add_noise(x_gen, eps, t)
            a, s = alpha_sigma(path, t)
            with run.autocast():
                pred = model.output(fake_score, z, t, c).float()
            l_fake = fake_score_loss(pred, eps, x_gen, a, s, ptype)
            run.backward(l_fake, fake_score, opt_fake)
            if disc is not None:  # real images against generated ones, both noised to t ~ U{t_min..t_max}
                t_d = draw.integers(cfg.t_max, cfg.t_min)
                real = disc_logits(run, disc, model, draw, x_real, t_d, c)
                l_disc = discriminator_loss(real, disc_logits(run, disc, model, draw, x_gen, t_d, c))
                run.backward(l_disc, disc.heads, opt_disc)
        # 3. The generator's output on a fresh input, with gradients.
        x_gen = g.sample(draw, True, x_real, c)
        # 4. Distribution matching: the real and the fake score's x̂₀ on the noised output give the gradient
        #    (p_fake − p_real) / mean|x̂ − p_real|, applied through the stop-gradient surrogate (DMD eq. 7 and 8).
        t = draw.integers(cfg.t_max, cfg.t_min)
        z = model.add_noise(x_gen.detach(), draw.noise(), t)
        with torch.no_grad(), run.autocast():
            # both x̂₀ clipped to the data range, as the teacher's sampler clips them: unclipped, the ε models'
            # x̂₀ at high t (÷ α_t ≈ 0.03) made the gradient noisy and the class mix drifted
            # the real score is the teacher as its sampler uses it (guidance folded in); the fake score is plain
            p_real = clip(x0_estimate(model.teacher_output(real_score, z, t, c), z, t, path, ptype))
            p_fake = clip(x0_estimate(model.output(fake_score, z, t, c), z, t, path, ptype))
            grad = dmd_gradient(x_gen.detach(), p_real, p_fake)
        l_dmd = dmd_loss(x_gen, grad)
        l_feat = fm.loss()
        loss = l_dmd + l_feat
        losses = {
            "dmd": l_dmd.item(),
            "fake": l_fake.item(),
            # the generator's mean, watched: DMD's gradient is known to drift it on v/flow teachers
            "mean": x_gen.detach().float().mean().item(),
            **(
                {"feature": float(l_feat.detach() if torch.is_tensor(l_feat) else l_feat)}
                if cfg.feature_loss > 0
                else {}
            ),
        }
        # 5. GAN term on real images: the generator's noised samples should pass the discriminator as real.
        if disc is not None:
            t_d = draw.integers(cfg.t_max, cfg.t_min)
            l_gan = generator_gan_loss(disc_logits(run, disc, model, draw, x_gen, t_d, c))
            loss = loss + cfg.gan_weight * l_gan
            losses["gan"], losses["disc"] = l_gan.item(), l_disc.item()
        # 6. DMD1's regression: from a cached noise, the deterministic generator should land on the teacher's output.
        if pairs is not None:
            idx = draw.integers(len(pairs[0]))
            l_reg = (g.chain(pairs[0][idx], None if pairs[2] is None else pairs[2][idx]) - pairs[1][idx]).pow(2).mean()
            loss = loss + cfg.regression_weight * l_reg
            losses["reg"] = l_reg.item()
        # 7. One generator update and its EMA (the Trainer checkpoints and logs around each step).
        run.backward(loss, student, opt, ema)
        return losses

    losses = run.phase(ph, step)
    fm.remove()
    if disc is not None:
        disc.features.remove()
    # Export the EMA generator with the stock sampler that runs it: LCM's multistep sampler; the output method's
    # one DDIM step that returns its x₀; or DDIM on the deterministic chain's grid.
    ema.copy_to(student.parameters())
    summary = {
        "method": "dmd",
        "config": asdict(cfg),
        "final_losses": losses,
        **sizes(real_score, student),
        "student_timesteps": [t for t in gen_t.tolist() if t >= 0],
        "wall_time_s": run.finish(),
        "num_inference_steps": K,
    }
    if run.main:
        shutil.rmtree(_output_dir(ckpt_dir), ignore_errors=True)
    if cfg.lora_rank:  # start: teacher (a LoRA generator is an LCM one)
        return lora_export(
            model,
            frozen(student),
            lcm_sampler(model, sched_cfg, cfg),
            cfg,
            teacher_sha256,
            summary,
            teacher_uri,
        )
    student = frozen(student).cpu()
    if not chain:
        return with_sampling(model.export(student, lcm_sampler(model, sched_cfg, cfg)), model, K), summary
    if x0_call:
        from redistill.methods.output import one_step_scheduler

        return model.export(student, one_step_scheduler(sched_cfg)), summary
    from redistill.methods.progressive import student_scheduler

    return model.export(student, student_scheduler(sched_cfg, ptype, cfg.first_timestep, K)), summary
