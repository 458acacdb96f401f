"""Tier 1: the progressive-distillation and prediction-type maths against hand-derived identities."""

from __future__ import annotations

import pytest
import torch

from redistill.methods.progressive import (
    check_grid,
    ddim_grid,
    ddim_step,
    distillation_target,
    halving_schedule,
    student_grid,
    student_scheduler,
)
from redistill.models.prediction import PREDICTION_TYPES, alpha_sigma, from_x0_eps, to_x0_eps


def test_halving_schedule():
    assert halving_schedule(64, 4) == [32, 16, 8, 4]
    assert halving_schedule(8, 1) == [4, 2, 1]
    with pytest.raises(ValueError, match="power of two"):
        halving_schedule(50, 4)
    with pytest.raises(ValueError):
        halving_schedule(4, 4)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_grid_is_ddim_trailing_and_nested(n):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    s.set_timesteps(n)
    grid = ddim_grid(n, 1000)
    assert grid[:-1].tolist() == s.timesteps.tolist() and grid[-1] == -1
    # the teacher's 2n grid holds the student's n grid at its even positions (so rounds chain exactly)
    assert ddim_grid(2 * n, 1000)[::2].tolist() == grid.tolist()


def test_target_recovers_x0_when_the_teacher_is_consistent():
    # a teacher that predicts the same x0 at t and t′ walks one DDIM trajectory; the one-step target is that x0
    ac = torch.linspace(0.999, 0.01, 1000)
    x0 = torch.randn(3, 1, 4, 4)
    z_t = torch.randn(3, 1, 4, 4)
    t, tm, tn = torch.tensor([900] * 3), torch.tensor([700] * 3), torch.tensor([500] * 3)
    (a_t, s_t), (a_m, s_m), (a_n, s_n) = (alpha_sigma(ac, x) for x in (t, tm, tn))
    z_next = ddim_step(x0, ddim_step(x0, z_t, a_t, s_t, a_m, s_m), a_m, s_m, a_n, s_n)
    assert torch.allclose(distillation_target(z_t, z_next, a_t, s_t, a_n, s_n), x0, atol=1e-4)


def test_target_at_the_clean_end_is_the_teachers_result():
    # t″ = −1: α = 1, σ = 0, so x̃ = z_t″ (the teacher's final image)
    ac = torch.linspace(0.999, 0.01, 1000)
    a_t, s_t = alpha_sigma(ac, torch.tensor([250]))
    a_n, s_n = alpha_sigma(ac, torch.tensor([-1]))
    assert a_n.item() == 1.0 and s_n.item() == 0.0
    z_t, z_n = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    assert torch.allclose(distillation_target(z_t, z_n, a_t, s_t, a_n, s_n), z_n)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_prediction_types_round_trip(kind):
    from redistill.models.prediction import StraightPath

    # a flow model's velocity lives on the straight path (α + σ = 1), the others on an ᾱ schedule (α² + σ² = 1)
    path = StraightPath(1000) if kind == "flow" else torch.linspace(0.999, 0.01, 1000)
    a, s = alpha_sigma(path, torch.tensor([100, 500, 900]))
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    z = a * x0 + s * eps
    out = from_x0_eps(x0, eps, a, s, kind)
    x0_back, eps_back = to_x0_eps(out, z, a, s, kind)
    assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, eps, atol=1e-4)


def test_v_is_not_epsilon():
    # a v-prediction output read as ε gives a wrong x0 (the LCM scripts' known failure); here it cannot happen
    ac = torch.linspace(0.999, 0.01, 1000)
    a, s = alpha_sigma(ac, torch.tensor([800]))
    x0, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    z = a * x0 + s * eps
    v = from_x0_eps(x0, eps, a, s, "v_prediction")
    assert not torch.allclose(to_x0_eps(v, z, a, s, "epsilon")[0], x0, atol=1e-2)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        to_x0_eps(v, z, a, s, "velocity")


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_student_grid_is_what_the_exported_scheduler_samples_and_nests(n):
    """The exported DDIM scheduler (leading + steps_offset) reproduces the training grid; grids nest across rounds."""
    from diffusers import DDIMScheduler

    grid = student_grid(n, 1000, 959)
    assert grid[0].item() == 959 and grid[-1].item() == -1
    assert torch.equal(student_grid(2 * n, 1000, 959)[::2], grid)
    cfg = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").config
    sched = student_scheduler(cfg, "epsilon", 959, n)
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == grid[:-1].tolist()
    assert sched.config.prediction_type == "epsilon"


def test_a_first_timestep_whose_teacher_grid_goes_below_zero_is_refused():
    check_grid(4, 1000, 959, 16)  # the default: the 16-step teacher grid ends at t=22
    with pytest.raises(
        ValueError, match=r"too low for teacher_steps 16: the teacher's last step would be at t=-8.*≥ 937"
    ):
        check_grid(4, 1000, 929, 16)
    check_grid(4, 1000, 929, 8)  # fewer teacher steps fit: 929 − 7·125 = 54


def test_snr_weighted_loss_truncates_the_weight_at_one():
    from redistill.methods.progressive import snr_weighted_loss

    x, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # per-image squared error 1
    a, s = torch.tensor([0.8, 0.6]).view(-1, 1, 1, 1), torch.tensor([0.6, 0.8]).view(-1, 1, 1, 1)
    # weights max(α²/σ², 1): 0.64/0.36 = 16/9 for the first image, 1 (not 0.5625) for the second
    assert snr_weighted_loss(x, target, a, s).item() == pytest.approx((16 / 9 + 1) / 2)
