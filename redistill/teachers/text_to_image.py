"""The embedded text-to-image teacher: a tiny latent diffusion model (Rombach et al. 2022, arXiv:2112.10752) in
the Stable Diffusion layout, trained by the project on its own captioned digits (redistill/data/captions.py).

The recipe, in the order it runs:
1. Tokenizer: CLIP's byte-level BPE with merges that make each word of the class prompts one token
   (`write_clip_tokenizer`), 16 tokens long.
2. Text encoder: a small `CLIPTextModel` from config, trained jointly with the UNet (its EMA exported with the
   UNet's). A random frozen one (`train_text_encoder: false`) still gives distinct hidden states to distinct
   prompts, but at an equal pilot budget (1,200 steps of 64, this UNet) the jointly trained one followed the
   prompt better: 32% of samples of the prompt's class at w = 3 against 20% (chance: 10%), for 4% more time
   per step.
3. VAE: an `AutoencoderKL` (16×16×1 → 4×8×8, f = 2) trained alone on the images, per-pixel L1 reconstruction
   plus a small KL term; then, as Stable Diffusion does, `scaling_factor` = 1 / std of the latents, so the
   scaled latents the UNet sees have unit variance.
4. UNet: a `UNet2DConditionModel` on the scaled latents: a cross-attention level, then a plain one, and the
   attention-pooled prompt also added to the time embedding (`addition_embed_type="text"`), so that it
   modulates every ResNet block as the class labels of the digits teacher do. ε-prediction on the cosine
   schedule (Nichol & Dhariwal 2021) with Min-SNR-γ weighting (Hang et al. 2023, arXiv:2303.09556), as the
   digits teacher; each caption is replaced by the empty prompt with probability `caption_dropout`, so one
   network learns both terms of classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598). The EMA of
   the weights is exported.
5. Guidance: each w of `guidance_sweep` is measured with the digits classifier (prompt adherence and
   recognisability of samples downsampled to 8×8), and the best is written to `redistill_sampling.json`.
6. Saved with `save_pipeline` as a stock `StableDiffusionPipeline` folder (safetensors) with a
   `redistill_teacher.json` summary. Both training phases write resumable checkpoints: a killed run, run again,
   continues from the last one.

`python -m redistill.teachers.text_to_image` writes the captioned data (data/t2i/) and trains the teacher into
data/t2i-teachers/<t2i_teacher.name>.
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

from redistill.config import T2ITeacherParams
from redistill.core import checkpoint
from redistill.models.pipelines import PipelineError, save_pipeline
from redistill.teachers.t2i_judge import choose_guidance
from redistill.teachers.t2i_parts import (
    EMPTY_PROMPT,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    drop_captions,
    latent_scaling_factor,
    tokenize,
    vae_loss,
)
from redistill.teachers.train import min_snr_weight


def _recipe_hash(p: T2ITeacherParams, images: np.ndarray, captions: list[str]) -> str:
    d = dict(vars(p))
    for key in ("checkpoint_every", "name", "guidance_scale", "guidance_sweep", "eval_samples", "eval_steps"):
        d.pop(key)  # they do not change the trained weights
    d["data_shape"] = list(images.shape)
    d["data_sum"] = float(images.sum())
    d["captions_sha"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------


def train_t2i_teacher(
    p: T2ITeacherParams,
    images: np.ndarray,
    captions: list[str],
    out: Path,
    ckpt_dir: Path,
    classifier=None,
    confidence: float = 0.9,
    log: Callable[[str], None] = print,
    keep_checkpoints: int = 2,
) -> dict:
    """Train the text-to-image teacher on `images` (float (N, C, H, W) in [0, 1]) with one caption each, and save it
    as a StableDiffusionPipeline folder at `out` (which must not exist: a teacher is never overwritten).

    With `classifier` (the digits classifier of redistill/features.py) the guidance scale is chosen by measuring
    `p.guidance_sweep`; without one `p.guidance_scale` is written. Resumes from the latest checkpoint in `ckpt_dir`
    when its recipe matches. Returns the summary also written as redistill_teacher.json."""
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    out, ckpt_dir = Path(out), Path(ckpt_dir)
    if out.exists():
        raise PipelineError(f"{out} already exists; a teacher is never overwritten. Pick a new name (t2i_teacher.name)")
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; the teacher needs one caption per image")
    if tuple(images.shape[2:]) != (p.image_size, p.image_size):
        raise ValueError(
            f"the images are {images.shape[2]}×{images.shape[3]} but t2i_teacher.image_size is "
            f"{p.image_size}; write the data at that size (redistill.t2i_data.prepare_t2i) or change it"
        )
    torch.manual_seed(p.seed)
    recipe = _recipe_hash(p, images, captions)
    x_all = torch.from_numpy(images).float() * 2.0 - 1.0  # the VAE's range, as StableDiffusionPipeline feeds it

    # 1-2. Tokenizer and text encoder (random; frozen unless p.train_text_encoder).
    tok_dir = ckpt_dir / "tokenizer"
    tokenizer = build_tokenizer(p, tok_dir)
    text_encoder = build_text_encoder(p, tokenizer).requires_grad_(p.train_text_encoder)
    ids_all, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [EMPTY_PROMPT])
    vae, unet, scheduler = build_vae(p, images.shape[1]), build_unet(p), build_scheduler(p)
    gen = torch.Generator().manual_seed(p.seed)

    # Resume: the latest checkpoint of the same recipe (a changed recipe starts afresh).
    found = checkpoint.latest(ckpt_dir)
    meta, state = {"phase": "vae", "step": 0, "elapsed_s": 0.0}, None
    if found and found[1].get("recipe") == recipe:
        last, meta = found
        state = checkpoint.load_state(last)
        for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
            if (last / f"{name}.safetensors").is_file():
                model.load_state_dict(checkpoint.load_weights(last, name))
        gen.set_state(state["generator"])
        log(f"resumed from {last} ({meta['phase']} step {meta['step']})")
    elif found:
        log(f"checkpoints in {ckpt_dir} belong to another recipe; starting afresh")
        for old in checkpoint.complete(ckpt_dir):
            shutil.rmtree(old)
    t_start = time.perf_counter() - meta["elapsed_s"]

    def snapshot(phase: str, step: int, weights: dict, opt_state: dict, extra: dict | None = None) -> None:
        order = step if phase == "vae" else p.vae_steps + step
        checkpoint.save(
            ckpt_dir / f"checkpoint-{order}",
            {k: m.state_dict() for k, m in weights.items()},
            {**opt_state, "generator": gen.get_state()},
            {
                "phase": phase,
                "step": step,
                "order": order,
                "recipe": recipe,
                "elapsed_s": time.perf_counter() - t_start,
                **(extra or {}),
            },
        )
        checkpoint.prune(ckpt_dir, keep_checkpoints)

    # 3. The VAE, alone: reconstruction + a small KL, from posterior samples.
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    vae_sched = get_cosine_schedule_with_warmup(vae_opt, min(50, p.vae_steps // 10), p.vae_steps)
    step, l1s = (meta["step"], []) if meta["phase"] == "vae" else (p.vae_steps, [])
    if meta["phase"] == "vae" and state is not None:
        vae_opt.load_state_dict(state["optimizer"])
        vae_sched.load_state_dict(state["lr_scheduler"])
    vae.train()
    while step < p.vae_steps:
        idx = torch.randint(0, len(x_all), (p.vae_batch_size,), generator=gen)
        loss, l1 = vae_loss(vae, x_all[idx], p.kl_weight, gen)
        checkpoint.update(loss, vae, vae_opt, None, vae_sched)
        step += 1
        l1s.append(l1.item())
        if step % 100 == 0 or step == p.vae_steps:
            log(
                f"vae step {step}/{p.vae_steps} l1 {np.mean(l1s[-100:]) / 2:.4f} (pixels in [0, 1]) "
                f"{time.perf_counter() - t_start:.0f}s"
            )
        if step % p.checkpoint_every == 0 or step == p.vae_steps:
            snapshot(
                "vae", step, {"vae": vae}, {"optimizer": vae_opt.state_dict(), "lr_scheduler": vae_sched.state_dict()}
            )
    vae.eval().requires_grad_(False)

    # 3b. The latents of every image (the posterior means, as the adapter encodes) and their scaling factor.
    with torch.no_grad():
        raw = torch.cat([vae.encode(x).latent_dist.mean for x in x_all.split(256)])
        recon = torch.cat([vae.decode(z).sample for z in raw.split(256)])
    vae_l1 = float(((recon.clamp(-1, 1) - x_all).abs().mean() / 2).item())  # in [0, 1] pixel units
    scale = latent_scaling_factor(raw)
    vae.register_to_config(scaling_factor=scale)
    latents = raw * scale
    log(f"vae reconstruction L1 {vae_l1:.4f} (pixels in [0, 1]); scaling_factor {scale:.4f}")

    # 4. The UNet (and a trained text encoder), ε-prediction with Min-SNR-γ, captions dropped for guidance.
    trained = torch.nn.ModuleDict({"unet": unet, **({"text_encoder": text_encoder} if p.train_text_encoder else {})})
    optimizer = torch.optim.AdamW([w for w in trained.parameters() if w.requires_grad], lr=p.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, p.warmup_steps, p.train_steps)
    ema = EMAModel(trained.parameters(), decay=p.ema_decay, use_ema_warmup=True, power=2 / 3)
    step = 0
    if meta["phase"] == "unet":
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        step = meta["step"]
    frozen_states = None
    if not p.train_text_encoder:  # a frozen encoder: each distinct prompt's hidden states, computed once
        distinct = torch.cat([ids_all.unique(dim=0), empty_ids])
        with torch.no_grad():
            frozen_states = dict(zip(map(tuple, distinct.tolist()), text_encoder(distinct)[0]))
    trained.train()
    text_encoder.train(p.train_text_encoder)
    losses: list[float] = []
    unet_start = time.perf_counter()
    while step < p.train_steps:
        # 4a. A minibatch of latents and their captions, some replaced by the empty prompt.
        idx = torch.randint(0, len(latents), (p.batch_size,), generator=gen)
        z0 = latents[idx]
        ids = drop_captions(ids_all[idx], empty_ids, p.caption_dropout, gen)
        cond = (
            text_encoder(ids)[0]
            if p.train_text_encoder
            else torch.stack([frozen_states[tuple(r)] for r in ids.tolist()])
        )
        # 4b. Noised to a uniformly drawn timestep (Ho et al. Alg. 1); ε-loss, Min-SNR-γ weighted.
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, p.num_train_timesteps, (p.batch_size,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        per_example = (unet(zt, t, encoder_hidden_states=cond).sample - noise).pow(2).mean(dim=(1, 2, 3))
        if p.snr_gamma > 0:
            per_example = per_example * min_snr_weight(scheduler.alphas_cumprod, t, p.snr_gamma)
        loss = per_example.mean()
        # 4c. Update, then the EMA of the weights that becomes the teacher.
        checkpoint.update(loss, trained, optimizer, ema, lr_sched)
        step += 1
        losses.append(loss.item())
        if step % 100 == 0 or step == p.train_steps:
            rate = (time.perf_counter() - unet_start) / max(1, len(losses))
            log(
                f"unet step {step}/{p.train_steps} loss {np.mean(losses[-100:]):.4f} lr {lr_sched.get_last_lr()[0]:.2e} "
                f"{1000 * rate:.0f} ms/step {time.perf_counter() - t_start:.0f}s"
            )
        # 4d. Snapshot: resumable state, model weights, then the meta that marks it complete.
        if step % p.checkpoint_every == 0 or step == p.train_steps:
            snapshot(
                "unet",
                step,
                {"vae": vae, "unet": unet, "text_encoder": text_encoder},
                {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict()},
                {"loss": float(np.mean(losses[-200:]))},
            )
    train_time = time.perf_counter() - t_start
    ema.copy_to(trained.parameters())
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    # 5. The guidance scale: the measured best of the sweep, else the configured one.
    w, sweep = choose_guidance(pipe, classifier, p, confidence, log)

    # 6. Save: a stock StableDiffusionPipeline folder, its sampling file and the summary.
    summary = {
        "recipe": dict(vars(p)),
        "train_time_s": round(train_time, 1),
        "vae_steps": p.vae_steps,
        "train_steps": p.train_steps,
        "final_loss": float(np.mean(losses[-200:]))
        if losses
        else meta.get("loss"),  # resumed after the last step: the checkpoint's
        "vae_reconstruction_l1": round(vae_l1, 5),
        "vae_scaling_factor": scale,
        "num_images": len(images),
        "text_encoder": "trained jointly" if p.train_text_encoder else "random, frozen",
        "guidance_scale": w,
        **({"guidance_sweep": sweep} if sweep else {}),
        "threads": torch.get_num_threads(),
    }
    pipe.redistill_sampling = {"guidance_scale": w}
    save_pipeline(pipe, out, extra={"redistill_teacher.json": summary})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------------------------------------
# The measurement: does a sample show the digit its prompt asks for?
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# main: data, teacher, measurement
# ---------------------------------------------------------------------------------------------------


def train_embedded(root: Path, params, out: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The embedded teacher as it was made: the captioned digits written to data/t2i/ unless present, then the
    `t2i_teacher` recipe into `out` (default data/t2i-teachers/<name>), its guidance w chosen with the workspace's
    digits classifier (data/features) where there is one; resumes from runs/t2i-teacher/<name>/checkpoints."""
    from redistill.data.base import DataError
    from redistill.data.captions import prepare_t2i
    from redistill.data.images import load_image_folder
    from redistill.evaluation.features import load_classifier

    p = params.t2i_teacher
    data_dir = root / "data" / "t2i"
    if not (data_dir / "reference").is_dir():
        counts = prepare_t2i(params.prepare, data_dir, seed=p.seed, image_size=p.image_size)
        log(f"captioned data written to {data_dir}: {counts}")
    data = load_image_folder(data_dir / "reference")
    if data.captions is None:
        raise DataError(f"{data_dir / 'reference'} has no captions.csv; delete {data_dir} and run again to rewrite it")
    try:
        classifier = load_classifier(root / "data" / "features")
    except FileNotFoundError as e:
        log(f"{e}; writing guidance_scale {p.guidance_scale} unmeasured")
        classifier = None
    out = out or root / "data" / "t2i-teachers" / p.name
    return train_t2i_teacher(
        p,
        data.images,
        data.captions,
        out,
        root / "runs" / "t2i-teacher" / p.name / "checkpoints",
        classifier,
        params.features.confidence,
        log=log,
    )


def main(argv: list[str] | None = None) -> None:
    """Train the embedded text-to-image teacher (`redistill teacher text-to-image` does the same): the captioned
    digits in data/t2i/, the teacher in data/t2i-teachers/<t2i_teacher.name>."""
    import argparse

    from redistill.config import load_params, workspace

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--workspace", type=Path, default=None, help="workspace folder (default: $REDISTILL_HOME or .)")
    ap.add_argument("--params", type=Path, default=None, help="settings file (default: the workspace's params.yaml)")
    ap.add_argument("--out", type=Path, default=None, help="teacher folder (default: data/t2i-teachers/<name>)")
    args = ap.parse_args(argv)
    root = workspace(args.workspace)
    params = load_params(args.params, root)
    out = args.out or root / "data" / "t2i-teachers" / params.t2i_teacher.name
    summary = train_embedded(root, params, out, log=lambda m: print(m, flush=True))
    print(
        f"teacher saved to {out} ({summary['train_steps']} UNet steps in {summary['train_time_s']:.0f}s, "
        f"guidance_scale {summary['guidance_scale']})"
    )


if __name__ == "__main__":
    main()
