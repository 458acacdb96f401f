"""Tier 1: pure maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from redistill.evaluation.fid import (
    bootstrap_ci,
    fid,
    fid_fast,
    fid_floor,
    kid,
    kid_ci,
    kid_subsets,
    paired_fid,
    psnr_ssim,
)
from redistill.teachers.train import min_snr_weight


def gaussian(n: int, mean: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_fid_of_a_set_against_itself_is_zero():
    x = gaussian(500, [0.0] * 8, 0)
    assert abs(fid(x, x)) < 1e-6


def test_fid_matches_the_closed_form_for_shifted_gaussians():
    # Σ1 = Σ2 = I  ⇒  FID = ||μ1 − μ2||² + tr(I + I − 2I) = ||Δμ||² = 1² + 2² = 5
    a = gaussian(20000, [0, 0, 0], 1)
    b = gaussian(20000, [1, 2, 0], 2)
    assert fid(a, b) == pytest.approx(5.0, abs=0.1)


def test_bootstrap_ci_covers_the_known_fid():
    # true FID = 1; the 95% CI from 2,000 samples a side must contain it
    a = gaussian(2000, [0, 0, 0, 0], 3)
    b = gaussian(2000, [1, 0, 0, 0], 4)
    lo, hi = bootstrap_ci(fid, a, b, resamples=100, seed=0)
    assert lo < 1.0 < hi
    assert hi - lo < 0.5  # and it is informative, not a trivially wide interval


def test_bootstrap_ci_contains_the_point_estimate_even_when_biased():
    # few samples in many dimensions: plug-in FID is biased upward and resampling adds the bias again;
    # the raw bootstrap percentiles then miss the point estimate, the re-centred interval must not
    a = gaussian(200, [0.0] * 32, 8)
    b = gaussian(200, [0.3] + [0.0] * 31, 9)
    point = fid(a, b)
    lo, hi = bootstrap_ci(fid, a, b, resamples=60, seed=1, point=point)
    assert lo < point < hi


def test_fast_fid_is_torchmetrics_fid():
    a, b = gaussian(600, [0.0] * 6, 11), gaussian(400, [0.5, 0, 0, 0, 0, 0.2], 12) * 1.3
    assert fid_fast(a, b) == pytest.approx(fid(a, b), rel=1e-6, abs=1e-9)


def test_paired_gap_of_two_shared_noise_samples_is_tighter_than_independent_intervals():
    # generated features cluster by digit, as the real ones do; a "teacher" and a "student" drawn from the
    # same noises land in the same clusters, the student a little broader within each. Which clusters a
    # sample happens to hit moves each FID a lot, and that cancels in the paired bootstrap of the gap.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=g, dtype=torch.float64) * 3

    def draw(n):
        return centres[torch.randint(0, 10, (n,), generator=g)], torch.randn(n, 8, generator=g, dtype=torch.float64)

    c, e = draw(1500)
    real = c + e
    c, e = draw(2000)
    teacher, student = c + e, c + 1.15 * e
    q = paired_fid(real, student, teacher, resamples=100, seed=0)
    assert q["paired"] and q["fid_gap"] == pytest.approx(q["fid"] - q["reference_fid"])
    lo, hi = q["fid_gap_ci95"]
    assert lo < q["fid_gap"] < hi
    r_lo, r_hi = q["fid_ratio_ci95"]
    assert r_lo < q["fid_ratio"] < r_hi
    # the same two sets with the row pairing broken: each side's cluster draw now varies on its own
    shuffled = student[torch.randperm(len(student), generator=g)]
    u_lo, u_hi = paired_fid(real, shuffled, teacher, resamples=100, seed=0)["fid_gap_ci95"]
    assert hi - lo < (u_hi - u_lo) / 4


def test_paired_gap_of_a_pipeline_against_itself_is_exactly_zero():
    real, x = gaussian(300, [0.0] * 3, 15), gaussian(300, [0.1, 0, 0], 16)
    q = paired_fid(real, x, x, resamples=20, seed=0)
    assert q["fid_gap"] == 0 and q["fid_gap_ci95"] == [0.0, 0.0] and q["fid_ratio"] == 1.0


def test_real_against_real_floor_shrinks_with_more_data():
    # two halves of one distribution are only finite-sample apart: the floor falls as the set grows
    small, _ = fid_floor(gaussian(200, [0.0] * 8, 17), splits=10, seed=0)
    large, sd = fid_floor(gaussian(4000, [0.0] * 8, 18), splits=10, seed=0)
    assert 0 < large < small / 5 and sd >= 0


def test_kid_separates_equal_and_shifted_distributions():
    a, a2, b = gaussian(600, [0, 0], 5), gaussian(600, [0, 0], 6), gaussian(600, [2, 0], 7)
    same, shifted = kid(a, a2, subset_size=200), kid(a, b, subset_size=200)
    assert abs(same) < 0.05 < shifted


def test_kid_is_torchmetrics_estimator_and_repeatable():
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    from redistill.evaluation.fid import _Precomputed

    a, b = gaussian(400, [0, 0, 0], 10), gaussian(400, [1, 0, 0], 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = KernelInceptionDistance(feature=_Precomputed(3), subsets=200, subset_size=100)
    m.update(a, real=True)
    m.update(b, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # torchmetrics draws its subsets from the global generator
        theirs = float(m.compute()[0])
    ours = kid(a, b, subset_size=100, subsets=200, seed=3)
    assert ours == pytest.approx(theirs, rel=1e-9)  # the same estimator on the same subsets
    assert kid(a, b, 100, 50, seed=3) == kid(a, b, 100, 50, seed=3)


def test_kid_interval_covers_zero_for_one_distribution_and_not_for_two():
    a, a2, b = gaussian(1000, [0, 0], 12), gaussian(1000, [0, 0], 13), gaussian(1000, [1, 0], 14)
    lo, hi = kid_ci(kid_subsets(a, a2, 200, 100, seed=0))
    assert lo < 0 < hi
    lo, hi = kid_ci(kid_subsets(a, b, 200, 100, seed=0))
    assert lo > 0


def test_psnr_of_a_constant_offset_is_20_db():
    # MSE = 0.1² = 0.01 with data range 1  ⇒  PSNR = 10·log10(1/0.01) = 20 dB
    x = torch.full((4, 1, 8, 8), 0.4)
    psnr, _ = psnr_ssim(x + 0.1, x)
    assert psnr == pytest.approx(20.0, abs=1e-4)


def test_ssim_of_constant_images_matches_the_formula():
    # constant images: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1), with C1 = (0.01 · 1)²
    a, b, c1 = 0.5, 0.25, 0.01**2
    _, ssim = psnr_ssim(torch.full((2, 1, 8, 8), a), torch.full((2, 1, 8, 8), b))
    assert ssim == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-4)


def test_identical_images_have_no_finite_psnr_and_ssim_one():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    psnr, ssim = psnr_ssim(x, x.clone())
    assert psnr is None
    assert ssim == pytest.approx(1.0, abs=1e-6)


def test_min_snr_weight_by_hand():
    # ᾱ = 0.8 ⇒ SNR = 4 < γ=5 ⇒ weight 1;  ᾱ = 0.9 ⇒ SNR = 9 ⇒ weight 5/9
    abar = torch.tensor([0.8, 0.9])
    w = min_snr_weight(abar, torch.tensor([0, 1]), gamma=5.0)
    assert w[0].item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(5 / 9)
    assert not math.isnan(w.sum().item())
