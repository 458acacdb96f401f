"""Drawing samples for the suite: the sampler a pipeline uses, seeded generation batches, and the workspace's sample
store that keeps every drawn batch under a content key so the same draw is never sampled twice."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from redistill.data.images import ImageSet
from redistill.models.pipelines import pipeline_sha256

SCHEDULER_CHOICES = ("auto", "saved", "ddim", "ddpm")


def configure_scheduler(pipe, steps: int, choice: str = "auto") -> str:
    """Set the pipeline's sampler; returns its class name.

    `saved` keeps the scheduler saved in the folder (what a stock user gets); `ddim`/`ddpm` replace it
    from the same config; `auto` is `saved`, except that a DDPMScheduler asked for fewer steps than it
    was trained with becomes DDIM (strided ancestral DDPM at few steps is not how anyone samples).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if choice not in SCHEDULER_CHOICES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_CHOICES)}, got {choice!r}")
    current = pipe.scheduler
    if choice in ("ddim", "ddpm") and not hasattr(current, "alphas_cumprod"):
        raise ValueError(
            f"a {type(current).__name__} pipeline (flow matching) has no DDPM schedule to sample with "
            f"{choice}; use the scheduler it was saved with (auto or saved)"
        )
    if choice == "ddim" or (
        choice == "auto" and isinstance(current, DDPMScheduler) and steps < current.config.num_train_timesteps
    ):
        pipe.scheduler = DDIMScheduler.from_config(current.config)
    elif choice == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(current.config)
    return type(pipe.scheduler).__name__


def fresh_noise(scheduler, steps: int) -> str | None:
    """Why a sampler's output is not a function of its initial noise alone (it draws fresh noise between steps),
    or None for a deterministic one. PSNR "on the same noise" measures fidelity to the teacher's noise-to-image
    map only for a deterministic sampler."""
    name = type(scheduler).__name__
    if steps <= 1:
        return None  # one step: noise to image, nothing drawn in between
    if name in ("LCMScheduler", "FlowMatchLCMScheduler"):  # the flow one: (1 − σ′)·x̂₀ + σ′·fresh noise
        return f"{name} at {steps} steps re-noises its x0 estimate between steps (multistep consistency sampling)"
    if name == "DDPMScheduler" or "Ancestral" in name or name in ("DPMSolverSDEScheduler", "ScoreSdeVeScheduler"):
        return f"{name} is an ancestral (stochastic) sampler"
    return None


@torch.no_grad()
def sample(pipe, n: int, steps: int, seed: int, batch: int) -> torch.Tensor:
    """`n` images in [0, 1] from the pipeline's own sampler (its adapter's `sample`); batch i uses generator seed `seed + i`.

    Two pipelines sampled with the same (n, seed, batch) start from the same initial noise.
    """
    from redistill.models import adapter_for

    model, out = adapter_for(pipe), []
    for i, start in enumerate(range(0, n, batch)):
        g = torch.Generator(device=pipe.device).manual_seed(seed + i)
        b = min(batch, n - start)
        out.append(model.sample(b, steps, g).cpu())
    return torch.cat(out)


def sample_store(root: Path) -> Path:
    """The workspace's store of drawn samples, `data/samples/`: one safetensors file per generation batch, named by
    what drew it (the pipeline folder's sha256, the sampler, the steps, the batch's seed and size), so every method,
    cycle and evaluation that asks for the same draw reads it instead of sampling again. The draws of the committed
    teachers are committed there (force-added past its .gitignore), so a fresh clone does not draw them again."""
    return Path(root) / "data" / "samples"


def _cache_file(
    cache_dir: Path, pipe, sha256: str, scheduler: str, steps: int, seed: int, size: int
) -> tuple[Path, str]:
    # One file per generation batch: the key covers the folder's bytes (weights and configs), the sampler and
    # the batch's draw (its seed and size), so a larger sample reuses every batch a smaller one drew.
    from redistill.models import adapter_for

    model = adapter_for(pipe)
    draw = getattr(model, "draw_key", None)  # a conditional latent model: its prompts or classes, and guidance
    key = json.dumps(
        [sha256, scheduler, steps, seed, size, pipe.device.type, str(model.unet.dtype)] + ([draw()] if draw else [])
    )
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors", key


def _batches(n: int, seed: int, batch: int) -> list[tuple[int, int]]:
    """(seed, size) of each generation batch of an n-image sample: batch i uses seed `seed + i`."""
    return [(seed + i, min(batch, n - start)) for i, start in enumerate(range(0, n, batch))]


def cache_samples(
    images: torch.Tensor,
    cache_dir: Path | None,
    pipe,
    path: Path | None,
    scheduler: str,
    n: int,
    steps: int,
    seed: int,
    batch: int,
    sha256: str | None = None,
) -> None:
    """Store samples drawn by `sample(pipe, n, steps, seed, batch)`, one file per batch under its content key
    (the folder at `path` hashed, unless its `sha256` is given)."""
    from safetensors.torch import save_file

    if cache_dir is None:
        return
    sha, start = sha256 or pipeline_sha256(path), 0
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for b_seed, size in _batches(n, seed, batch):
        f, key = _cache_file(cache_dir, pipe, sha, scheduler, steps, b_seed, size)
        if not f.is_file():
            tmp = f.with_suffix(f".tmp{os.getpid()}")  # written aside, then renamed: never half a file
            save_file({"images": images[start : start + size].contiguous()}, tmp, metadata={"key": key})
            os.replace(tmp, f)
        start += size


def sample_cached(
    pipe,
    path: Path | None,
    scheduler: str,
    n: int,
    steps: int,
    seed: int,
    batch: int,
    cache_dir: Path | None,
    sha256: str | None = None,
) -> tuple[torch.Tensor, bool]:
    """`sample`, reusing the batches an earlier run drew when the pipeline's bytes and the draw are the same.

    The cache holds safetensors written by `cache_samples`, nothing else. The folder at `path` is hashed once,
    unless its `sha256` is given. Returns (images, all cached?).
    """
    from safetensors.torch import load_file

    if cache_dir is None:
        return sample(pipe, n, steps, seed, batch), False
    sha, out, all_cached = sha256 or pipeline_sha256(path), [], True
    for b_seed, size in _batches(n, seed, batch):
        f, _ = _cache_file(cache_dir, pipe, sha, scheduler, steps, b_seed, size)
        if f.is_file():
            out.append(load_file(f)["images"])
            continue
        all_cached = False
        images = sample(pipe, size, steps, b_seed, size)
        cache_samples(images, cache_dir, pipe, path, scheduler, size, steps, b_seed, size, sha256=sha)
        out.append(images)
    return torch.cat(out), all_cached


def use_data_prompts(pipes: list, data: ImageSet):
    """Give text-to-image pipelines the data's captions as their prompt set (each sample draws one, the same
    for every pipeline at the same seed). Returns a function (pipe, n, seed, batch) → which caption each of the
    `n` samples `sample(pipe, n, seed, batch)` draws was asked for (indices into `data.captions`), or None for
    other pipelines or data without captions."""
    from redistill.models import adapter_for

    captions = getattr(data, "captions", None)
    models = [adapter_for(q) for q in pipes]
    if not captions or not all(hasattr(m, "use_prompts") for m in models):
        return None
    for m in models:
        m.use_prompts(list(captions))

    def asked(pipe, n: int, seed: int, batch: int) -> torch.Tensor:
        model = adapter_for(pipe)
        return torch.cat(
            [
                model.draw_indices(size, torch.Generator(device=pipe.device).manual_seed(b_seed))
                for b_seed, size in _batches(n, seed, batch)
            ]
        )

    return asked
