"""The suite's pure maths: FID (torchmetrics' and a fast equal one), its paired bootstrap and real-against-real floor,
KID over seeded subsets, bootstrap intervals, and PSNR/SSIM between paired images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


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


def paired_fid(
    real: torch.Tensor, cand: torch.Tensor, ref: torch.Tensor, resamples: int, seed: int, level: float = 0.95
) -> dict:
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
        gaps.append(
            fid_from_stats(*real_stats, *gaussian_stats(cand[ic]))
            - fid_from_stats(*real_stats, *gaussian_stats(ref[jr]))
        )
        # and resampled too
        ir = torch.randint(0, len(real), (len(real),), generator=gen)
        cs.append(fid_fast(real[ir], cand[ic]))
        rs.append(fid_fast(real[ir], ref[jr]))
    cs, rs = np.array(cs), np.array(rs)
    gap = point_c - point_r
    out = {
        "fid": point_c,
        "fid_ci95": _recentred(cs, point_c, level),
        "reference_fid": point_r,
        "reference_fid_ci95": _recentred(rs, point_r, level),
        "fid_gap": gap,
        "fid_gap_ci95": _recentred(gaps, gap, level),
        "fid_gap_ci95_data": _recentred(cs - rs, gap, level),
        "paired": paired,
    }
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
        vals.append(fid_fast(real[perm[:half]], real[perm[half : 2 * half]]))
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
