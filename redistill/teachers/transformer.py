"""The embedded transformer teachers, trained by the project on its own captioned digits (16×16, as the embedded
text-to-image teacher): a class-conditional DiT (Peebles & Xie 2023, arXiv:2212.09748) in a stock `DiTPipeline`, and
a text-to-image MMDiT in the Stable Diffusion 3 layout (Esser et al. 2024, arXiv:2403.03206) in a stock
`StableDiffusion3Pipeline` without T5.

The recipe, in the order it runs:
1. The VAE: the embedded text-to-image teacher's trained `AutoencoderKL` (16×16×1 → 4×8×8), reused as DiT reuses
   Stable Diffusion's. Its latents of every image (the posterior means) are measured: DiT keeps its scaling factor
   (1 / std); SD3 also shifts, z = (latent − mean)·(1 / std), as SD3's VAE config does.
2. The transformer on 2×2 patches of the scaled latents (16 tokens):
   - DiT: ε-prediction on the cosine schedule with Min-SNR-γ weighting; the label embedding drops 10% of the labels
     to the null class itself in training mode (DiT's recipe), so one network learns both terms of guidance.
   - SD3: rectified flow, x_σ = (1 − σ)·x₀ + σ·ε with σ = sigmoid(n), n ~ N(0, 1) (SD3's logit-normal timesteps);
     the transformer predicts ε − x₀ at timestep σ·1000. Two small CLIP text encoders with projection are trained
     with it, and each caption is replaced by the empty prompt with probability `caption_dropout`. Prompts are
     encoded as `StableDiffusion3Pipeline.encode_prompt` encodes them (`sd3_prompt_embeds`, differentiable).
   The EMA of the trained weights is exported.
3. Guidance: each w of `guidance_sweep` is measured with the digits classifier (adherence to the class asked for,
   and recognisability; `t2i_judge.prompt_adherence`), and the best is written to `redistill_sampling.json`.
4. Saved with `save_pipeline` (safetensors) with a `redistill_teacher.json` summary. Training writes resumable
   checkpoints: a killed run, run again, continues from the last one.
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

from redistill.core import checkpoint
from redistill.models.pipelines import PipelineError, save_pipeline
from redistill.teachers.t2i_judge import choose_guidance
from redistill.teachers.t2i_parts import EMPTY_PROMPT, drop_captions, tokenize
from redistill.teachers.train import min_snr_weight

LAYOUTS = ("dit", "sd3")


def _recipe_hash(layout: str, p, images: np.ndarray, captions: list[str], vae_sha: str) -> str:
    d = dict(vars(p))
    for key in ("checkpoint_every", "name", "guidance_scale", "guidance_sweep", "eval_samples", "eval_steps", "vae"):
        d.pop(key)  # they do not change the trained weights (the VAE counts by its content)
    d.update(layout=layout, data_shape=list(images.shape), data_sum=float(images.sum()), vae=vae_sha)
    d["captions_sha"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_vae(folder: Path):
    """The trained AutoencoderKL at `folder` (safetensors), or PipelineError saying where to get one."""
    from diffusers import AutoencoderKL

    if not (Path(folder) / "config.json").is_file():
        raise PipelineError(
            f"no trained VAE at {folder}; restore the embedded text-to-image teacher "
            "(`git checkout -- data/t2i-teachers`) or point the teacher's `vae` setting at an AutoencoderKL folder"
        )
    return AutoencoderKL.from_pretrained(str(folder), use_safetensors=True).eval().requires_grad_(False)


def sd3_prompt_embeds(pipe, ids: torch.Tensor, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`StableDiffusion3Pipeline.encode_prompt` of token ids `ids` without T5, differentiable: each CLIP's penultimate
    hidden states side by side, zero-padded to joint_attention_dim, then `max_sequence_length` zero tokens; and
    both CLIPs' pooled projections side by side."""
    hidden, pooled = [], []
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    d = int(pipe.transformer.config.joint_attention_dim)
    clip = torch.nn.functional.pad(clip, (0, d - clip.shape[-1]))
    t5 = torch.zeros(len(ids), max_sequence_length, d, dtype=clip.dtype, device=clip.device)
    return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)


def build(layout: str, p, vae, tokenizer_dir: Path):
    """The untrained pipeline of `layout` around the trained `vae` (DiT: a DDIM sampler on the cosine schedule;
    SD3: a FlowMatchEulerDiscreteScheduler at `p.shift`)."""
    if layout == "dit":
        from diffusers import DDIMScheduler, DiTPipeline

        from redistill.teachers.dit_parts import build_dit_pipeline

        pipe = build_dit_pipeline(
            image_channels=vae.config.in_channels,
            image_size=vae.config.sample_size,
            latent_channels=vae.config.latent_channels,
            vae_channels=tuple(vae.config.block_out_channels),
            heads=p.width // p.head_dim,
            head_dim=p.head_dim,
            layers=p.layers,
            patch_size=p.patch_size,
            learned_sigma=False,
            seed=p.seed,
        )
        sched = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule=p.beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = DiTPipeline(transformer=pipe.transformer, vae=vae, scheduler=sched)
    elif layout == "sd3":
        from redistill.teachers.sd3_parts import build_sd3_pipeline

        pipe = build_sd3_pipeline(
            tokenizer_dir,
            image_channels=vae.config.in_channels,
            image_size=vae.config.sample_size,
            text_width=p.text_width,
            text_layers=p.text_layers,
            heads=p.width // p.head_dim,
            head_dim=p.head_dim,
            layers=p.layers,
            patch_size=p.patch_size,
            shift=p.shift,
            model_max_length=p.model_max_length,
            seed=p.seed,
            vae=vae,
        )
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(layout: str, vae, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Step 1: the posterior means of every image, and the VAE config that scales (and shifts) them to unit
    variance; returns (scaled latents, the config values set)."""
    with torch.no_grad():
        raw = torch.cat([vae.encode(b).latent_dist.mean for b in x.split(256)])
    shift = float(raw.mean()) if layout == "sd3" else None
    scale = float(1.0 / (raw - (shift or 0.0)).std())
    return (raw - (shift or 0.0)) * scale, {"scaling_factor": scale, "shift_factor": shift}


def train_transformer_teacher(
    layout: str,
    p,
    images: np.ndarray,
    labels: np.ndarray,
    captions: list[str],
    vae_dir: Path,
    out: Path,
    ckpt_dir: Path,
    classifier=None,
    confidence: float = 0.9,
    log: Callable[[str], None] = print,
    keep_checkpoints: int = 2,
) -> dict:
    """Train the `layout` ("dit" or "sd3") teacher on `images` (float (N, C, H, W) in [0, 1]) with their `labels`
    (DiT) or `captions` (SD3) in the latent space of the VAE at `vae_dir`, and save it at `out` (which must not
    exist). Resumes from the latest checkpoint in `ckpt_dir` of the same recipe. Returns the summary also written as
    redistill_teacher.json."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from redistill.models.folders import pipeline_sha256

    out, ckpt_dir = Path(out), Path(ckpt_dir)
    if out.exists():
        raise PipelineError(
            f"{out} already exists; a teacher is never overwritten. Pick a new name ({layout}_teacher.name)"
        )
    if len(captions) != len(images) or len(labels) != len(images):
        raise ValueError(f"{len(images)} images need as many labels and captions ({len(labels)}, {len(captions)})")
    vae = load_vae(vae_dir)
    if tuple(images.shape[1:]) != (vae.config.in_channels, vae.config.sample_size, vae.config.sample_size):
        raise ValueError(
            f"the images are {tuple(images.shape[1:])} but the VAE at {vae_dir} takes "
            f"{vae.config.in_channels}×{vae.config.sample_size}×{vae.config.sample_size}; write the data at its size"
        )
    torch.manual_seed(p.seed)
    recipe = _recipe_hash(layout, p, images, captions, pipeline_sha256(Path(vae_dir)))
    x_all = torch.from_numpy(images).float() * 2.0 - 1.0
    latents, vae_cfg = _latents(layout, vae, x_all)
    vae.register_to_config(**{k: v for k, v in vae_cfg.items() if v is not None})
    pipe = build(layout, p, vae, ckpt_dir / "tokenizer")
    y_all = torch.from_numpy(np.asarray(labels)).long()
    if layout == "sd3":
        trained = torch.nn.ModuleDict(
            {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        )
        ids_all, empty_ids = tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer, [EMPTY_PROMPT])
    else:
        trained = torch.nn.ModuleDict({"transformer": pipe.transformer})
    alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
    gen = torch.Generator().manual_seed(p.seed)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=p.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, p.warmup_steps, p.train_steps)
    ema = EMAModel(trained.parameters(), decay=p.ema_decay, use_ema_warmup=True, power=2 / 3)

    found, step, elapsed = checkpoint.latest(ckpt_dir), 0, 0.0
    if found and found[1].get("recipe") == recipe:
        last, meta = found
        state = checkpoint.load_state(last)
        trained.load_state_dict(checkpoint.load_weights(last, "trained"))
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed = meta["step"], meta["elapsed_s"]
        log(f"resumed from {last} (step {step})")
    elif found:
        log(f"checkpoints in {ckpt_dir} belong to another recipe; starting afresh")
        for old in checkpoint.complete(ckpt_dir):
            shutil.rmtree(old)
    t_start, losses = time.perf_counter() - elapsed, []
    trained.train()
    while step < p.train_steps:
        idx = torch.randint(0, len(latents), (p.batch_size,), generator=gen)
        z0, noise = latents[idx], torch.randn((p.batch_size, *latents.shape[1:]), generator=gen)
        if layout == "dit":  # ε at a uniform timestep, Min-SNR-γ weighted (labels dropped inside the model)
            t = torch.randint(0, len(alphas), (p.batch_size,), generator=gen)
            pred = pipe.transformer(pipe.scheduler.add_noise(z0, noise, t), timestep=t, class_labels=y_all[idx]).sample
            per_example = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            if p.snr_gamma > 0:
                per_example = per_example * min_snr_weight(alphas, t, p.snr_gamma)
        else:  # velocity ε − x₀ on the straight path at a logit-normal σ
            sigma = torch.sigmoid(torch.randn((p.batch_size,), generator=gen))
            s = sigma[:, None, None, None]
            embeds, pooled = sd3_prompt_embeds(
                pipe, drop_captions(ids_all[idx], empty_ids, p.caption_dropout, gen), p.max_sequence_length
            )
            pred = pipe.transformer(
                hidden_states=(1 - s) * z0 + s * noise,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=sigma * 1000,
            ).sample
            per_example = (pred - (noise - z0)).pow(2).mean(dim=(1, 2, 3))
        loss = per_example.mean()
        checkpoint.update(loss, trained, optimizer, ema, lr_sched)
        step += 1
        losses.append(loss.item())
        if step % 100 == 0 or step == p.train_steps:
            log(
                f"{layout} step {step}/{p.train_steps} loss {np.mean(losses[-100:]):.4f} "
                f"lr {lr_sched.get_last_lr()[0]:.2e} {time.perf_counter() - t_start:.0f}s"
            )
        if step % p.checkpoint_every == 0 or step == p.train_steps:
            checkpoint.save(
                ckpt_dir / f"checkpoint-{step}",
                {"trained": trained.state_dict()},
                {
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_sched.state_dict(),
                    "ema": ema.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
                {"step": step, "order": step, "recipe": recipe, "elapsed_s": time.perf_counter() - t_start},
            )
            checkpoint.prune(ckpt_dir, keep_checkpoints)
    train_time = time.perf_counter() - t_start
    ema.copy_to(trained.parameters())
    trained.eval().requires_grad_(False)
    sampling = {"num_classes": 10} if layout == "dit" else {"max_sequence_length": p.max_sequence_length}

    # 3. The guidance scale: the measured best of the sweep, else the configured one.
    pipe.redistill_sampling = {**sampling, "guidance_scale": p.guidance_scale}
    w, sweep = choose_guidance(pipe, classifier, p, confidence, log)

    # 4. Save: a stock pipeline folder, its sampling file and the summary.
    summary = {
        "recipe": {**dict(vars(p)), "layout": layout},
        "train_time_s": round(train_time, 1),
        "train_steps": p.train_steps,
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
        "parameters": int(sum(w_.numel() for w_ in pipe.transformer.parameters())),
        "vae": str(vae_dir),
        "vae_scaling_factor": vae_cfg["scaling_factor"],
        "vae_shift_factor": vae_cfg["shift_factor"],
        "num_images": len(images),
        "guidance_scale": w,
        **({"guidance_sweep": sweep} if sweep else {}),
        "threads": torch.get_num_threads(),
    }
    pipe.redistill_sampling = {**sampling, "guidance_scale": w}
    save_pipeline(pipe, out, extra={"redistill_teacher.json": summary})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


def train_embedded(
    layout: str, root: Path, params, out: Path | None = None, log: Callable[[str], None] = print
) -> dict:
    """The embedded `layout` teacher as it was made: the captioned digits written to data/t2i/ unless present, then
    the `<layout>_teacher` recipe into `out` (default data/<layout>-teachers/<name>), its guidance chosen with the
    workspace's digits classifier (data/features) where there is one; resumes from runs/<layout>-teacher/<name>."""
    from redistill.data.base import DataError
    from redistill.data.captions import prepare_t2i
    from redistill.data.images import load_image_folder
    from redistill.evaluation.features import load_classifier

    p = getattr(params, f"{layout}_teacher")
    data_dir = root / "data" / "t2i"
    if not (data_dir / "reference").is_dir():
        counts = prepare_t2i(
            params.prepare, data_dir, seed=params.t2i_teacher.seed, image_size=params.t2i_teacher.image_size
        )
        log(f"captioned data written to {data_dir}: {counts}")
    data = load_image_folder(data_dir / "reference")
    if data.captions is None or data.labels is None:
        raise DataError(f"{data_dir / 'reference'} has no labels or captions; delete {data_dir} and run again")
    try:
        classifier = load_classifier(root / "data" / "features")
    except FileNotFoundError as e:
        log(f"{e}; writing guidance_scale {p.guidance_scale} unmeasured")
        classifier = None
    vae_dir = Path(p.vae) if Path(p.vae).is_absolute() else root / p.vae
    return train_transformer_teacher(
        layout,
        p,
        data.images,
        data.labels,
        data.captions,
        vae_dir,
        out or root / "data" / f"{layout}-teachers" / p.name,
        root / "runs" / f"{layout}-teacher" / p.name / "checkpoints",
        classifier,
        params.features.confidence,
        log=log,
    )
