"""Consistency distillation (LCM style): its maths against diffusers' LCMScheduler, the method on a tiny real
teacher (ε and v), its stock-diffusers export, resume, and the settings it refuses before training."""

from __future__ import annotations

import pytest
import torch

from redistill.data.images import load_image_folder
from redistill.methods.consistency import ConsistencyConfig, boundary_scalings, distill, pseudo_huber, solver_grid
from redistill.models.pipelines import load_pipeline, save_pipeline


def test_boundary_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 1, 19, 259, 959])
    c_skip, c_out = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        want_skip, want_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(want_skip, rel=1e-5)
        assert c_out[i].item() == pytest.approx(want_out, rel=1e-5, abs=1e-7)
    # the clean end is the boundary: f(z, 0) = z
    c_skip, c_out = boundary_scalings(torch.tensor([-1]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


@pytest.mark.parametrize("n", [4, 48, 50])
def test_solver_grid_is_the_one_lcm_scheduler_samples_from(n):
    from diffusers import LCMScheduler

    grid, k = solver_grid(n, 1000)
    assert k == 1000 // n and grid[0].item() == k - 1 and grid[-1].item() == n * k - 1
    sched = LCMScheduler(num_train_timesteps=1000, original_inference_steps=n)
    for steps in (1, 2, 4):
        sched.set_timesteps(steps)
        assert set(sched.timesteps.tolist()) <= set(grid.tolist())


def test_pseudo_huber_is_zero_at_equality_and_l2_without_c():
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert pseudo_huber(a, a, 0.001).item() == 0.0
    assert pseudo_huber(a, b, 0.0).item() == pytest.approx((a - b).pow(2).mean().item())
    assert 0 < pseudo_huber(a, b, 0.001).item() < (a - b).abs().mean().item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_student_exports_and_samples_with_lcm_scheduler(digits_ws, tmp_path, prediction_type):
    from diffusers import DiffusionPipeline, LCMScheduler

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:256])
    cfg = ConsistencyConfig(steps=6, solver_steps=48, batch_size=8, checkpoint_every=4)
    student, summary = distill(teacher, data, cfg, tmp_path / "ckpt", log=lambda m: None)
    assert summary["method"] == "consistency" and summary["solver_skip"] == 20 and summary["final_loss"] >= 0
    assert not (tmp_path / "ckpt").exists()
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.parameters(), teacher.unet.parameters()))
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.timesteps[0].item() == 959  # 48 × 20 − 1: where the student was trained
        img = pipe(batch_size=2, num_inference_steps=steps, output_type="pt").images
        assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()


def test_consistency_resumes_exactly(digits_ws, tmp_path):
    """Killed after a checkpoint, the run resumes with student, target, EMAs, optimiser and RNG restored."""
    from helpers import crash_when, make_tiny_pipeline, resume_matches_unbroken

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:256])
    cfg = ConsistencyConfig(steps=10, solver_steps=10, batch_size=8, checkpoint_every=5)
    crash_when(distill, teacher, data, cfg, tmp_path / "ckpt", "step 10/10")  # at the end, after step 5's checkpoint
    logs = resume_matches_unbroken(distill, teacher, data, cfg, tmp_path / "ckpt", tmp_path / "ckpt2")
    assert any("resumed from checkpoint-00-0000005" in m for m in logs)


def test_settings_a_method_cannot_serve_fail_before_training():
    from redistill.config import ConfigError, parse_params
    from redistill.methods import method_config

    with pytest.raises(ConfigError, match="valid methods are: progressive, consistency, output, adversarial, dmd"):
        parse_params({"distill": {"method": "dmd3"}})
    with pytest.raises(ValueError, match="1 to solver_steps"):
        method_config(
            parse_params(
                {"distill": {"method": "consistency", "target_steps": 8, "consistency": {"solver_steps": 4}}}
            ).distill
        )
    with pytest.raises(ValueError, match="power of two"):
        method_config(parse_params({"distill": {"target_steps": 3}}).distill)
    with pytest.raises(ConfigError, match="unknown key distill.consistency.skip"):
        parse_params({"distill": {"consistency": {"skip": 3}}})
    cfg, _ = method_config(
        parse_params({"distill": {"method": "consistency", "lr": 0.001, "consistency": {"steps": 7}}}).distill
    )
    assert (cfg.steps, cfg.lr, cfg.target_steps) == (7, 0.001, 4)


def test_consistency_exports_the_target_network_or_a_deterministic_sampler(digits_ws, tmp_path):
    from diffusers import DDIMScheduler, LCMScheduler

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    base = dict(steps=4, batch_size=4, solver_steps=10, target_steps=2, target_ema=0.5)
    ema_student, _ = distill(teacher, data, ConsistencyConfig(**base), tmp_path / "a", log=lambda m: None)
    target_student, _ = distill(
        teacher, data, ConsistencyConfig(**base, export="target"), tmp_path / "b", log=lambda m: None
    )
    assert isinstance(ema_student.scheduler, LCMScheduler)
    assert any(not torch.equal(a, b) for a, b in zip(ema_student.unet.parameters(), target_student.unet.parameters()))
    det, _ = distill(teacher, data, ConsistencyConfig(**base, sampler="ddim"), tmp_path / "c", log=lambda m: None)
    assert isinstance(det.scheduler, DDIMScheduler)
    det.scheduler.set_timesteps(2)
    assert det.scheduler.timesteps.tolist() == [999, 499]  # the top of the solver grid (N = 10: k = 100), T/2 apart
    det.set_progress_bar_config(disable=True)
    first = det(
        batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    again = det(
        batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(again))


def test_the_consistency_solver_step_is_ddim():
    from redistill.methods.consistency import ddim_solver_step

    x0, z_t = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 1.0)
    # ε̂ = (1 − 0.6·0.5)/0.8 = 0.875; ẑ_s = 0.8·0.5 + 0.6·0.875 = 0.925
    assert torch.allclose(ddim_solver_step(x0, z_t, 0.6, 0.8, 0.8, 0.6), torch.full_like(z_t, 0.925))
    from redistill.methods.progressive import ddim_step

    assert torch.allclose(ddim_step(x0, z_t, 0.6, 0.8, 0.8, 0.6), ddim_solver_step(x0, z_t, 0.6, 0.8, 0.8, 0.6))
