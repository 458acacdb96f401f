"""The evaluation suite: quality, fidelity to a reference pipeline, speed and memory, measured together.

- Quality: FID and KID (torchmetrics) in the feature space of the project's classifier (or a local
  Inception), ≥ 2,000 generated samples against the reference set, each with a bootstrap 95% CI; plus the
  share of samples recognisable as a digit.
- Fidelity: PSNR and SSIM (torchmetrics) between the candidate and the reference pipeline started from
  the same initial noise.
- Speed: latency per image at batch 1 (p50, p95) and throughput at batch 64, candidate and reference
  timed in the same process, interleaved, after warm-up; speedups as ratios.
- Memory: peak memory while sampling, parameter count, checkpoint size on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from redistill.config import EvaluateParams
from redistill.evaluation.gate import decided, gap_bound
from redistill.data.images import ImageSet
from redistill.models.pipelines import (
    PipelineError,
    check_fits,
    folder_size_bytes,
    load_pipeline,
    pipeline_sha256,
)

SCHEDULER_CHOICES = ("auto", "saved", "ddim", "ddpm")


# ---------------------------------------------------------------------------------------------------
# Pure maths: FID/KID with bootstrap CIs, PSNR/SSIM
# ---------------------------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID run on features computed once."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (torchmetrics FID on precomputed features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def gaussian_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of a feature set, in double precision (as torchmetrics' FID keeps them)."""
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.t() @ d / (len(f) - 1)


def fid_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with the trace of the root from the eigenvalues (torchmetrics' formula)."""
    root = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * root)


def fid_fast(real: torch.Tensor, fake: torch.Tensor) -> float:
    """`fid` without torchmetrics' module overhead: the same number, cheap enough to bootstrap thousands of times."""
    return fid_from_stats(*gaussian_stats(real), *gaussian_stats(fake))


def _recentred(values: list[float], point: float, level: float = 0.95) -> list[float]:
    # the spread of the bootstrap distribution around its median, placed around the point estimate (see bootstrap_ci)
    lo, med, hi = np.percentile(values, [100 * (1 - level) / 2, 50, 100 * (1 + level) / 2])
    return [float(point - (med - lo)), float(point + (hi - med))]


def paired_fid(real: torch.Tensor, cand: torch.Tensor, ref: torch.Tensor, resamples: int, seed: int,
               level: float = 0.95) -> dict:
    """FIDs of a candidate and a reference against the same real set, their gap and ratio, with a paired bootstrap.

    Candidate and reference were sampled from the same initial noises (row i of each shares its noise), so
    each bootstrap replicate resamples the generated rows with the same indices for both: what they share
    cancels in the gap. Two intervals come out:
    - `fid_gap_ci95`: the generated samples resampled, the real set held fixed. The gate compares two models
      against one versioned reference set, so this is the precision of the gated figure, and it narrows
      as more samples are drawn;
    - `fid_gap_ci95_data`: the real set resampled as well (once per replicate, for both sides): how far the
      gap would move with another draw of reference data of the same size. Generating more samples does not
      narrow this part.
    Each side's own interval comes from the data-resampled replicates (ordinary bootstrap replicates).
    """
    gen = torch.Generator().manual_seed(seed)
    paired = len(cand) == len(ref)
    point_c, point_r = fid_fast(real, cand), fid_fast(real, ref)
    real_stats = gaussian_stats(real)
    cs, rs, gaps = [], [], []
    for _ in range(resamples):
        ic = torch.randint(0, len(cand), (len(cand),), generator=gen)
        jr = ic if paired else torch.randint(0, len(ref), (len(ref),), generator=gen)
        # the real set held fixed
        gaps.append(fid_from_stats(*real_stats, *gaussian_stats(cand[ic])) - fid_from_stats(*real_stats, *gaussian_stats(ref[jr])))
        # and resampled too
        ir = torch.randint(0, len(real), (len(real),), generator=gen)
        cs.append(fid_fast(real[ir], cand[ic]))
        rs.append(fid_fast(real[ir], ref[jr]))
    cs, rs = np.array(cs), np.array(rs)
    gap = point_c - point_r
    out = {"fid": point_c, "fid_ci95": _recentred(cs, point_c, level), "reference_fid": point_r,
           "reference_fid_ci95": _recentred(rs, point_r, level), "fid_gap": gap,
           "fid_gap_ci95": _recentred(gaps, gap, level), "fid_gap_ci95_data": _recentred(cs - rs, gap, level),
           "paired": paired}
    if point_r > 0:
        out["fid_ratio"] = point_c / point_r
        out["fid_ratio_ci95"] = _recentred(cs / np.maximum(rs, 1e-12), point_c / point_r, level)
    else:
        out["fid_ratio"], out["fid_ratio_ci95"] = None, None
    return out


def fid_floor(real: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    """The real-against-real floor: FID between two random halves of the real set, mean and sd over `splits`.

    Two samples of the same data are this far apart at this sample size, so a gap between two pipelines
    that is small next to it is within what resampling the data itself does."""
    gen = torch.Generator().manual_seed(seed)
    half = len(real) // 2
    vals = []
    for _ in range(splits):
        perm = torch.randperm(len(real), generator=gen)
        vals.append(fid_fast(real[perm[:half]], real[perm[half:2 * half]]))
    return float(np.mean(vals)), float(np.std(vals))


def kid_subsets(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int, seed: int) -> list[float]:
    """KID of `subsets` seeded random subsets drawn without replacement (torchmetrics' `poly_mmd`).

    This is exactly what torchmetrics' KernelInceptionDistance averages, with the draws seeded so that a
    run is repeatable, and with the per-subset values kept for the interval.
    """
    from torchmetrics.image.kid import poly_mmd

    m = min(subset_size, len(real), len(fake))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=gen)[:m]]
        f = fake[torch.randperm(len(fake), generator=gen)[:m]]
        values.append(float(poly_mmd(r.double(), f.double())))
    return values


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = 100, seed: int = 0) -> float:
    """Kernel inception distance: the mean over seeded subsets (torchmetrics' estimator)."""
    return float(np.mean(kid_subsets(real, fake, subset_size, subsets, seed)))


def kid_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Interval of KID from its per-subset values: their percentiles.

    KID's unbiased MMD is wrecked by bootstrap duplicates (a duplicated point pairs with itself), so
    its spread is taken over subsets drawn without replacement. That is the spread of a single
    subset's estimate, so the interval is conservative for the mean over subsets.
    """
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    stat: Callable[[torch.Tensor, torch.Tensor], float],
    real: torch.Tensor,
    fake: torch.Tensor,
    resamples: int,
    seed: int,
    level: float = 0.95,
    point: float | None = None,
) -> tuple[float, float]:
    """Bootstrap CI of `stat(real, fake)`, resampling both sets with replacement.

    FID and KID are biased upward by finite samples, and a resample (with its duplicated points) adds
    that bias again, so the raw percentiles sit above the point estimate and can miss it entirely. The
    interval is therefore the bootstrap distribution re-centred on the point estimate: its spread
    around the bootstrap median, placed around `point` (computed when not given).
    """
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        ir = torch.randint(0, len(real), (len(real),), generator=gen)
        jf = torch.randint(0, len(fake), (len(fake),), generator=gen)
        values.append(stat(real[ir], fake[jf]))
    lo, med, hi = np.percentile(values, [100 * (1 - level) / 2, 50, 100 * (1 + level) / 2])
    point = stat(real, fake) if point is None else point
    return float(point - (med - lo)), float(point + (hi - med))


def psnr_ssim(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float | None, float]:
    """Mean per-image PSNR (dB) and SSIM between paired images in [0, 1]; PSNR is None if identical."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    psnr = peak_signal_noise_ratio(candidate, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    finite = torch.isfinite(psnr)
    # The Gaussian window must fit the image: 11 (the paper's) for ≥ 11 px, else the largest odd size.
    k = min(11, min(candidate.shape[-2:]) - (1 - min(candidate.shape[-2:]) % 2))
    ssim = structural_similarity_index_measure(candidate, reference, data_range=1.0, kernel_size=k)
    psnr_mean = float(psnr[finite].mean()) if finite.all() else None
    return psnr_mean, float(ssim)


# ---------------------------------------------------------------------------------------------------
# Sampling, speed and memory
# ---------------------------------------------------------------------------------------------------


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
        raise ValueError(f"a {type(current).__name__} pipeline (flow matching) has no DDPM schedule to sample with "
                         f"{choice}; use the scheduler it was saved with (auto or saved)")
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
    if name == "LCMScheduler":
        return f"LCMScheduler at {steps} steps re-noises its x0 estimate between steps (multistep consistency sampling)"
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


def _cache_file(cache_dir: Path, pipe, sha256: str, scheduler: str, steps: int, seed: int, size: int) -> tuple[Path, str]:
    # One file per generation batch: the key covers the folder's bytes (weights and configs), the sampler and
    # the batch's draw (its seed and size), so a larger sample reuses every batch a smaller one drew.
    from redistill.models import adapter_for

    draw = getattr(adapter_for(pipe), "draw_key", None)  # a text-to-image model: its prompt set and guidance
    key = json.dumps([sha256, scheduler, steps, seed, size, pipe.device.type, str(pipe.unet.dtype)] + ([draw()] if draw else []))
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors", key


def _batches(n: int, seed: int, batch: int) -> list[tuple[int, int]]:
    """(seed, size) of each generation batch of an n-image sample: batch i uses seed `seed + i`."""
    return [(seed + i, min(batch, n - start)) for i, start in enumerate(range(0, n, batch))]


def cache_samples(images: torch.Tensor, cache_dir: Path | None, pipe, path: Path | None, scheduler: str, n: int,
                  steps: int, seed: int, batch: int, sha256: str | None = None) -> None:
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
            save_file({"images": images[start:start + size].contiguous()}, tmp, metadata={"key": key})
            os.replace(tmp, f)
        start += size


def sample_cached(pipe, path: Path | None, scheduler: str, n: int, steps: int, seed: int, batch: int,
                  cache_dir: Path | None, sha256: str | None = None) -> tuple[torch.Tensor, bool]:
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


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above the start while the block runs: CUDA allocator stats, else RSS polled every 1 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = (peak - self._base) / 2**20
        return False


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure_speed(cand, cand_steps: int, ref, ref_steps: int, p: EvaluateParams, warmup: int = 2) -> dict:
    """Latency at batch 1 and throughput at batch `p.throughput_batch`, candidate and reference interleaved."""
    dev = cand.device

    from redistill.models import adapter_for

    def run(pipe, steps, b, seed):
        g = torch.Generator(device=pipe.device).manual_seed(seed)
        model = adapter_for(pipe)
        return lambda: model.sample(b, steps, g)

    lat_c, lat_r, thr_c, thr_r = [], [], [], []
    for i in range(warmup + p.latency_repeats):
        tc = _timed(run(cand, cand_steps, 1, i), dev)
        tr = _timed(run(ref, ref_steps, 1, i), dev)
        if i >= warmup:
            lat_c.append(tc)
            lat_r.append(tr)
    for i in range(1 + p.throughput_repeats):
        tc = _timed(run(cand, cand_steps, p.throughput_batch, i), dev)
        tr = _timed(run(ref, ref_steps, p.throughput_batch, i), dev)
        if i >= 1:
            thr_c.append(tc)
            thr_r.append(tr)
    b = p.throughput_batch
    c50, r50 = np.median(lat_c), np.median(lat_r)
    return {
        "latency_ms_p50": 1000 * float(c50),
        "latency_ms_p95": 1000 * float(np.percentile(lat_c, 95)),
        "throughput_img_s": float(b / np.median(thr_c)),
        "reference_latency_ms_p50": 1000 * float(r50),
        "reference_latency_ms_p95": 1000 * float(np.percentile(lat_r, 95)),
        "reference_throughput_img_s": float(b / np.median(thr_r)),
        "speedup_latency": float(r50 / c50),
        "speedup_throughput": float(np.median(thr_r) / np.median(thr_c)),
        "throughput_batch": b,
        "latency_repeats": p.latency_repeats,
        "throughput_repeats": p.throughput_repeats,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        **_latent_costs(cand, ref, dev, p.latency_repeats),
    }


def _latent_costs(cand, ref, dev, repeats: int) -> dict:
    """For text-to-image pipelines: UNet passes per step (2 under classifier-free guidance: the doubled batch
    the teacher pays and a distilled student does not) and the VAE decode's latency at batch 1, which the
    latencies above include."""
    from redistill.models import adapter_for

    mc, mr = adapter_for(cand), adapter_for(ref)
    if not hasattr(mc, "decode"):
        return {}
    z = torch.randn((1, mc.channels, *mc.sample_size), generator=torch.Generator().manual_seed(0)).to(dev)
    mc.decode(z)  # warm-up
    decode = sorted(_timed(lambda: mc.decode(z), dev) for _ in range(max(1, repeats)))
    return {"unet_passes_per_step": mc.unet_passes_per_step(), "reference_unet_passes_per_step": mr.unet_passes_per_step(),
            "vae_decode_ms_p50": 1000 * float(np.median(decode)), "vae_decode_included": True}


def save_grid(candidate: torch.Tensor, reference: torch.Tensor, path: Path, per_row: int = 16, scale: int = 4,
              max_width: int = 1024, max_tile: int = 256) -> None:
    """PNG: the candidate's samples (top rows) above the reference's on the same noise (bottom rows).

    A readable size at any resolution: tiles larger than `max_tile` are shrunk (area average), fewer tiles go
    in a row as they grow, and small images are enlarged by up to `scale` (nearest), all within `max_width`."""
    import torch.nn.functional as F
    from PIL import Image

    h, w = candidate.shape[-2:]
    shrink = max(h, w) / max_tile
    if shrink > 1:
        size = (max(1, round(h / shrink)), max(1, round(w / shrink)))
        candidate, reference = (F.interpolate(x.float(), size=size, mode="area") for x in (candidate, reference))
        h, w = size
    per_row = max(1, min(per_row, max_width // w, len(candidate)))
    scale = max(1, min(scale, max_width // (per_row * w)))

    def rows(x: torch.Tensor) -> np.ndarray:
        x = x[: 2 * per_row]
        img = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (N, C, H, W)
        n, c, hh, ww = img.shape
        pad = -n % per_row  # a last row that is not full is padded black
        img = np.concatenate([img, np.zeros((pad, c, hh, ww), np.uint8)]) if pad else img
        return img.reshape(-1, per_row, c, hh, ww).transpose(0, 3, 1, 4, 2).reshape(-1, per_row * ww, c)

    top, bottom = rows(candidate), rows(reference)
    sep = np.full((2, top.shape[1], top.shape[2]), 128, dtype=np.uint8)
    grid = np.concatenate([top, sep, bottom])
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One pipeline under evaluation: where it is, how many steps, which sampler."""

    path: Path
    steps: int
    scheduler: str = "auto"


@dataclass
class _Unnamed:
    """A bare feature module passed to `evaluate` (tests, one-off checks): one space named "features"."""

    extractor: nn.Module
    name: str = "features"
    sha256: str = ""


def quality_in_space(extractor: nn.Module, real_images: np.ndarray, fake: torch.Tensor, ref_fake: torch.Tensor,
                     identical: bool, p: EvaluateParams) -> dict:
    """FID of candidate and reference, their gap and ratio (paired bootstrap CIs), KID, and the split-half
    floor, all in one feature space."""
    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([extractor(x[i : i + 1000].float()) for i in range(0, len(x), 1000)]).double()

    real_f = embed(torch.from_numpy(real_images))
    fake_f = embed(fake)
    ref_f = fake_f if identical else embed(ref_fake)
    q = paired_fid(real_f, fake_f, ref_f, p.bootstrap, p.seed)
    kids = kid_subsets(real_f, fake_f, p.kid_subset_size, p.bootstrap, p.seed)
    ref_kids = kids if identical else kid_subsets(real_f, ref_f, p.kid_subset_size, p.bootstrap, p.seed)
    floor, floor_sd = fid_floor(real_f, p.floor_splits, p.seed)
    lo, hi = q["fid_gap_ci95"]
    q.update({
        "kid": float(np.mean(kids)), "kid_ci95": list(kid_ci(kids)),
        "reference_kid": float(np.mean(ref_kids)), "reference_kid_ci95": list(kid_ci(ref_kids)),
        "fid_floor": floor, "fid_floor_sd": floor_sd,
        # the gated figure: how much further from the data than the teacher, in units of the floor
        "fid_gap_floors": q["fid_gap"] / floor if floor > 0 else None,
        "fid_gap_halfwidth": (hi - lo) / 2,
        "fid_gap_halfwidth_floors": (hi - lo) / 2 / floor if floor > 0 else None,
        "num_features": int(real_f.shape[1]),
        "dead_features": int((real_f.std(0) < 1e-8).sum()),
    })
    return q


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
        return torch.cat([model.draw_indices(size, torch.Generator(device=pipe.device).manual_seed(b_seed))
                          for b_seed, size in _batches(n, seed, batch)])

    return asked


def evaluate(
    candidate: Side,
    reference: Side,
    data: ImageSet,
    extractor,
    p: EvaluateParams,
    classifier: nn.Module | None = None,
    confidence: float = 0.9,
    out_dir: Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda m: None,
    data_path: Path | None = None,
    cache_dir: Path | None = None,
    bounds: dict[str, float | None] | float | None = None,
    clip_score=None,
) -> dict:
    """Run the whole suite on `candidate` against `reference` and `data`; returns one JSON-able dict.

    `extractor` is a list of `feature_spaces.FeatureSpace` (the first one's figures also sit at the top of
    `quality`), or one bare feature module. With `cache_dir`, the reference's samples are reused across runs
    (same bytes, same draw), so evaluating many candidates against the teacher at 50 steps samples the
    teacher once.
    """
    from redistill.evaluation.features import classify

    if candidate.steps <= 0 or reference.steps <= 0:
        raise ValueError(f"step counts must be ≥ 1, got {candidate.steps} and {reference.steps}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    cand = load_pipeline(candidate.path, dev)
    check_fits(cand, candidate.path, data.channels, data.size, data_path)
    same = Path(candidate.path).resolve() == Path(reference.path).resolve()
    ref = cand if same else load_pipeline(reference.path, dev)
    check_fits(ref, reference.path, data.channels, data.size, data_path)
    if same and candidate.steps != reference.steps:
        ref = load_pipeline(reference.path, dev)  # a second copy: each may need its own scheduler
    prompted = use_data_prompts([cand, ref], data)  # a text-to-image pair draws the data's captions, the same for both
    cand_sha, ref_sha = pipeline_sha256(candidate.path), pipeline_sha256(reference.path)  # once: folders are large
    cand_sched = configure_scheduler(cand, candidate.steps, candidate.scheduler)
    ref_sched = configure_scheduler(ref, reference.steps, reference.scheduler) if ref is not cand else cand_sched
    identical = ref is cand

    # 1. Samples from the same initial noise; memory measured while the candidate samples.
    # 2. Quality in each feature space: FIDs with a paired bootstrap (gap, ratio), KID, the real-data floor.
    #    With the gate's `bounds` (in floors, per space), the sample grows (doubling, up to evaluate.max_samples)
    #    until no space's FID-gap interval contains its bound, so the verdict is not left to sampling noise: a
    #    student far from its bound (either side) is decided at evaluate.num_samples, a deterministic student paired
    #    with its teacher narrows fast, one near its bound or a stochastic sampler needs more.
    spaces = list(extractor) if isinstance(extractor, (list, tuple)) else [_Unnamed(extractor)]
    n, fake, ref_cached, ref_fake, ref_mem = p.num_samples, None, False, None, None
    while True:
        log(f"sampling {n} images from the candidate at {candidate.steps} steps ({cand_sched})")
        if fake is None:
            with PeakMemory(dev) as mem:
                fake = sample(cand, n, candidate.steps, p.seed, p.sample_batch_size)
        else:  # the first len(fake) images are the same draw: only the new batches are sampled
            more = _batches(n, p.seed, p.sample_batch_size)[len(_batches(len(fake), p.seed, p.sample_batch_size)):]
            fake = torch.cat([fake] + [sample(cand, size, candidate.steps, b_seed, size) for b_seed, size in more])
        if not torch.isfinite(fake).all():
            raise PipelineError(f"pipeline at {candidate.path} produced non-finite images; its weights are broken")
        if identical:
            ref_fake, ref_mem = fake, mem
            cache_samples(fake, cache_dir, cand, candidate.path, cand_sched, n, candidate.steps, p.seed,
                          p.sample_batch_size, sha256=cand_sha)
        else:
            log(f"sampling {n} images from the reference at {reference.steps} steps ({ref_sched})")
            first = ref_fake is None
            with PeakMemory(dev) as measured:
                ref_fake, ref_cached = sample_cached(ref, reference.path, ref_sched, n, reference.steps,
                                                     p.seed, p.sample_batch_size, cache_dir, sha256=ref_sha)
            if first:  # the peak of the first draw, unless it came from the cache (then not measured)
                ref_mem = None if ref_cached else measured
            if ref_cached:
                log("  (reused cached reference samples; reference peak memory not re-measured)")
        log("computing FID/KID with paired bootstrap CIs")
        per_space = {sp.name: quality_in_space(sp.extractor, data.images, fake, ref_fake, identical, p) for sp in spaces}
        open_ = {s: b for s, q in per_space.items() if not decided(q, b := gap_bound(bounds, s))}
        if not open_ or n >= p.max_samples:
            break
        log("  the FID-gap CI contains the gate's bound (" + ", ".join(
            f"{s}: {per_space[s]['fid_gap_floors']:+.3f} ±{per_space[s]['fid_gap_halfwidth_floors']:.3f} floors, bound {b}"
            for s, b in open_.items()) + "): more samples")
        n = min(2 * n, p.max_samples)
    primary = spaces[0].name
    recog = {}
    if classifier is not None:
        c = classify(classifier, fake, confidence)
        r = c if identical else classify(classifier, ref_fake, confidence)
        recog = {**c, "reference_recognisable_share": r["recognisable_share"]}
        if prompted is not None and data.labels is not None:
            # 2b. prompt adherence: does each image show the class its prompt asked for (the label of the image
            #     the caption came from)?
            from redistill.evaluation.features import adherence

            asked = torch.as_tensor(np.asarray(data.labels))[prompted(cand, n, p.seed, p.sample_batch_size)]
            a, ra = adherence(classifier, fake, asked), adherence(classifier, ref_fake, asked)
            recog.update(a, reference_prompt_adherence=ra["prompt_adherence"],
                         prompt_adherence_gap_points=100 * (ra["prompt_adherence"] - a["prompt_adherence"]))
    if prompted is not None and clip_score is not None:  # 2c. CLIP score of each image against its own prompt
        words = [data.captions[i] for i in prompted(cand, n, p.seed, p.sample_batch_size).tolist()]
        cs, rcs = float(clip_score(fake, words).mean()), float(clip_score(ref_fake, words).mean())
        recog.update(clip_score=cs, reference_clip_score=rcs)

    # 3. Fidelity to the reference on the same noise.
    psnr, ssim = psnr_ssim(fake, ref_fake)

    # 4. Speed, interleaved in this process.
    log("timing latency and throughput (interleaved)")
    speed = measure_speed(cand, candidate.steps, ref, reference.steps, p)

    cand_params = sum(x.numel() for x in cand.unet.parameters())
    result = {
        "pipeline": str(candidate.path),
        "sha256": cand_sha,
        "steps": candidate.steps,
        "scheduler": cand_sched,
        "reference": {
            "pipeline": str(reference.path),
            "sha256": ref_sha,
            "steps": reference.steps,
            "scheduler": ref_sched,
        },
        "num_samples": n,
        "num_real": len(data),
        "gap_bounds_floors": {s: gap_bound(bounds, s) for s in per_space},
        "decided": all(decided(q, gap_bound(bounds, s)) for s, q in per_space.items()),
        "seed": p.seed,
        "feature_spaces": {sp.name: sp.sha256 for sp in spaces},
        # the first space's figures at the top level (the bench's FID ratio), every space's under "spaces"
        "quality": {**per_space[primary], "feature_space": primary, **recog, "spaces": per_space},
        "fidelity": {"psnr_db": psnr, "ssim": ssim, "identical_to_reference": psnr is None,
                     "fresh_noise": None if identical else fresh_noise(cand.scheduler, candidate.steps)},
        "speed": speed,
        "memory": {
            "peak_sampling_mb": mem.peak_mb,
            "reference_peak_sampling_mb": ref_mem.peak_mb if ref_mem is not None else None,
            "sampling_batch": p.sample_batch_size,
            "params": cand_params,
            "reference_params": sum(x.numel() for x in ref.unet.parameters()),
            "checkpoint_mb": folder_size_bytes(candidate.path) / 2**20,
            "reference_checkpoint_mb": folder_size_bytes(reference.path) / 2**20,
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_grid(fake, ref_fake, out_dir / "grid.png")
        result["grid"] = str(out_dir / "grid.png")
    result["wall_time_s"] = time.perf_counter() - t0
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_student(student: Path, steps: int, teacher: Path, data: Path, features: Path, p,
                     out_dir: Path | None = None, cache_dir: Path | None = None,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    """The suite on a student folder (its saved scheduler, `steps`) against its teacher at
    `evaluate.reference_steps`, in the `evaluate.features` spaces; `p` is the whole `Params`.

    The one way a cycle, the champion's fit check and `reproduce` evaluate a student, so their figures
    stay comparable.
    """
    from redistill.evaluation import spaces as feature_spaces
    from redistill.data.images import load_image_folder

    classifier = feature_spaces.classifier_for(p.evaluate.features, features)  # recognisability: labelled data only
    data_set = load_image_folder(data)
    clip = feature_spaces.clip_scorer(p.evaluate.features, features) if data_set.captions else None
    return evaluate(
        Side(student, steps, "saved"), Side(teacher, p.evaluate.reference_steps), data_set,
        feature_spaces.load_all(p.evaluate.features, features), p.evaluate, classifier=classifier,
        confidence=p.features.confidence, out_dir=out_dir, cache_dir=cache_dir, log=log,
        bounds=p.gate.fid_gap_max, clip_score=clip,
    )
