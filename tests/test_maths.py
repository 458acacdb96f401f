"""Tier 1: pure maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from redistill.metrics import bootstrap_ci, fid, kid, psnr_ssim
from redistill.teacher_train import min_snr_weight


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


def test_kid_separates_equal_and_shifted_distributions():
    a, a2, b = gaussian(600, [0, 0], 5), gaussian(600, [0, 0], 6), gaussian(600, [2, 0], 7)
    same, shifted = kid(a, a2, subset_size=200), kid(a, b, subset_size=200)
    assert abs(same) < 0.05 < shifted


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
