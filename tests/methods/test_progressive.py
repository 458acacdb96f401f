"""Tier 2: progressive distillation on a tiny real teacher (ε and v), exported as a stock diffusers pipeline."""

from __future__ import annotations

import pytest
import torch

from redistill.data.images import load_image_folder
from redistill.methods.progressive import ProgressiveConfig, distill
from redistill.models.pipelines import load_pipeline, save_pipeline


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_distilled_student_exports_and_samples_in_stock_diffusers(digits_ws, tmp_path, prediction_type):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:256])
    cfg = ProgressiveConfig(teacher_steps=16, target_steps=4, steps_per_round=6, batch_size=8, checkpoint_every=4)
    logs = []
    student, summary = distill(teacher, data, cfg, tmp_path / "ckpt", log=logs.append)
    assert [r["student_steps"] for r in summary["rounds"]] == [8, 4]
    assert all(r["final_loss"] is not None and r["final_loss"] >= 0 for r in summary["rounds"])
    assert not (tmp_path / "ckpt").exists()
    # the student really is a new network: training moved it away from the teacher
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.parameters(), teacher.unet.parameters()))
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    # the default first timestep 959 keeps the teacher's prediction type
    assert pipe.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [959, 709, 459, 209]  # the grid the last round trained on
    img = pipe(batch_size=3, num_inference_steps=4, output_type="pt").images
    assert img.shape == (3, 1, 8, 8) and torch.isfinite(img).all()


def test_trailing_grid_gives_a_v_student(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = ProgressiveConfig(teacher_steps=4, target_steps=2, steps_per_round=2, batch_size=4, first_timestep=999)
    student, _ = distill(teacher, data, cfg, tmp_path / "ckpt", log=lambda m: None)
    assert student.scheduler.config.prediction_type == "v_prediction"
    student.scheduler.set_timesteps(2)
    assert student.scheduler.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="must divide 1000"):
        distill(teacher, data, ProgressiveConfig(teacher_steps=24, target_steps=3), tmp_path / "c2", log=lambda m: None)


def test_distillation_resumes_from_its_checkpoint(digits_ws, tmp_path):
    """A run stopped part-way resumes mid-round from its checkpoint and ends like an unbroken run."""
    from helpers import crash_when, make_tiny_pipeline, resume_matches_unbroken

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:256])
    cfg = ProgressiveConfig(teacher_steps=8, target_steps=2, steps_per_round=10, batch_size=8, checkpoint_every=5)
    ckpt = tmp_path / "ckpt"
    # the log line at round 2's last step comes after its step-5 checkpoint: crash there
    crash_when(distill, teacher, data, cfg, ckpt, "round 2/2")
    assert any(ckpt.glob("checkpoint-01-*/meta.json")), "a round-2 checkpoint should exist before the crash"
    logs = resume_matches_unbroken(distill, teacher, data, cfg, ckpt, tmp_path / "ckpt2")
    assert any("resumed from checkpoint-01" in m for m in logs)


def test_a_warm_start_is_one_round_from_the_champion_against_the_teachers_k_step_ddim(digits_ws, tmp_path):
    """Warm: the champion already takes the target's steps, so one round trains it, each of its steps towards where
    the teacher's DDIM lands in teacher_steps/target_steps steps of its finest grid. A champion that already lands
    there (the k-step teacher sampled exactly) gets a near-zero loss from the first step; another start does not."""
    from helpers import make_tiny_pipeline
    from redistill.methods.progressive import ddim_step, distillation_target, student_grid

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = ProgressiveConfig(teacher_steps=8, target_steps=2, steps_per_round=3, batch_size=8, checkpoint_every=100)
    cold, _ = distill(teacher, data, cfg, tmp_path / "cold", log=lambda m: None)
    init = {k: v.clone() for k, v in cold.unet.state_dict().items()}
    logs: list[str] = []
    warm, summary = distill(teacher, data, cfg, tmp_path / "warm", log=logs.append, init=init)
    assert [r["student_steps"] for r in summary["rounds"]] == [2]  # one round, no halving
    assert any("round 1/1 (8→2 steps), warm from the champion" in m for m in logs)
    moved = max((a - b).abs().max().item() for a, b in zip(warm.unet.state_dict().values(), init.values()))
    assert (
        0 < moved < max((a - b).abs().max().item() for a, b in zip(init.values(), teacher.unet.state_dict().values()))
    )
    # the k-step target: one DDIM step to it from z_t lands on the teacher's 4-step result over the same span
    T, fine = 1000, student_grid(8, 1000, 959)
    ac = teacher.scheduler.alphas_cumprod
    a = lambda t: ac[t].sqrt() if t >= 0 else torch.tensor(1.0)  # noqa: E731
    s = lambda t: (1 - ac[t]).sqrt() if t >= 0 else torch.tensor(0.0)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    z_t, x0s = torch.randn(1, 1, 8, 8, generator=g), [torch.rand(1, 1, 8, 8, generator=g) for _ in range(4)]
    z = z_t
    for j in range(4):  # any x̂₀ per step: the identity holds for whatever the teacher predicts
        t_j, t_k = int(fine[j]), int(fine[j + 1])
        z = ddim_step(x0s[j], z, a(t_j), s(t_j), a(t_k), s(t_k))
    t, t_next = int(fine[0]), int(fine[4])
    target = distillation_target(z_t, z, a(t), s(t), a(t_next), s(t_next))
    assert torch.allclose(ddim_step(target, z_t, a(t), s(t), a(t_next), s(t_next)), z, atol=1e-5)
    assert int(student_grid(2, T, 959)[1]) == t_next  # the student's next step is the teacher's 4th
