"""DMD2-style distribution matching on a tiny real teacher (ε and v): the fake score moves, the real score
does not, the GAN term and two time-scale updates run, the stock export samples, and resume is exact."""

from __future__ import annotations

import pytest
import torch

from redistill.data.images import load_image_folder
from redistill.methods.dmd import DMDConfig, distill
from redistill.models.pipelines import load_pipeline, save_pipeline


@pytest.mark.parametrize("prediction_type,gan", [("epsilon", 0.0), ("v_prediction", 0.1)])
def test_dmd_student_exports_and_samples(digits_ws, tmp_path, prediction_type, gan):
    from diffusers import DiffusionPipeline, LCMScheduler

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type))
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    logs = []
    student, summary = distill(
        teacher,
        data,
        DMDConfig(steps=3, fake_updates=2, gan_weight=gan, batch_size=4),
        tmp_path / "ck",
        log=logs.append,
    )
    assert set(summary["final_losses"]) == ({"dmd", "fake", "mean", "gan", "disc"} if gan else {"dmd", "fake", "mean"})
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in before.items())  # real score frozen
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.parameters(), teacher.unet.parameters()))
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 4):
        img = pipe(batch_size=2, num_inference_steps=steps, output_type="pt").images
        assert torch.isfinite(torch.as_tensor(img)).all()


def test_dmd_resumes_exactly_with_fake_score_and_discriminator(digits_ws, tmp_path):
    from helpers import crash_when, make_tiny_pipeline, resume_matches_unbroken

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = DMDConfig(steps=4, fake_updates=1, gan_weight=0.1, batch_size=4, checkpoint_every=2)
    crash_when(distill, teacher, data, cfg, tmp_path / "ck", "step 4/4")
    assert {p.name for p in next((tmp_path / "ck").glob("checkpoint-*")).glob("*.safetensors")} == {
        "student.safetensors",
        "fake_score.safetensors",
        "discriminator.safetensors",
    }
    resume_matches_unbroken(distill, teacher, data, cfg, tmp_path / "ck", tmp_path / "ck2")


def test_dmd_settings_are_checked_before_training():
    from redistill.config import parse_params
    from redistill.methods import method_config

    with pytest.raises(ValueError, match="t_min < t_max"):
        method_config(parse_params({"distill": {"method": "dmd", "dmd": {"t_min": 900, "t_max": 100}}}).distill)


def test_dmd_regression_on_cached_teacher_pairs_is_for_one_step_generators(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = DMDConfig(
        steps=2,
        fake_updates=1,
        batch_size=4,
        target_steps=1,
        regression_weight=0.5,
        pairs=8,
        pairs_steps=3,
        start="output",
        output_steps=2,
    )
    _, summary = distill(
        teacher, data, cfg, tmp_path / "ck", log=lambda m: None, teacher_sha256="ab" * 32, pairs_dir=tmp_path / "pairs"
    )
    assert "reg" in summary["final_losses"] and summary["student_timesteps"] == [999]
    (cached,) = (tmp_path / "pairs").glob("abababababababab-*.safetensors")  # reused by the next run and by `output`
    # an LCM generator takes no regression (its first step estimates a mean, its later ones add fresh noise)
    _, two = distill(
        teacher,
        data,
        DMDConfig(steps=1, fake_updates=1, batch_size=4, target_steps=2, regression_weight=0.5),
        tmp_path / "ck2",
        log=lambda m: None,
    )
    assert "reg" not in two["final_losses"] and two["config"]["regression_weight"] == 0.0


def test_a_one_step_generator_can_start_from_the_output_distilled_student(digits_ws, tmp_path):
    # DMD1's start: the regression-trained noise → image map (methods/output.py), exported as its one DDIM
    # x₀ step; the DMD gradient then moves it, and the output run's files are cleaned up with the checkpoints
    from diffusers import DDIMScheduler, DiffusionPipeline

    from helpers import make_tiny_pipeline
    from redistill.methods.output import OutputConfig
    from redistill.methods.output import distill as output_distill

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    kw = dict(batch_size=4, pairs=8, pairs_steps=3)
    cfg = DMDConfig(steps=2, fake_updates=1, target_steps=1, start="output", output_steps=3, **kw)
    student, summary = distill(
        teacher, data, cfg, tmp_path / "ck", log=lambda m: None, teacher_sha256="cd" * 32, pairs_dir=tmp_path / "pairs"
    )
    assert summary["student_timesteps"] == [999]
    assert not (tmp_path / "ck-output").exists()
    start, _ = output_distill(
        teacher,
        data,
        OutputConfig(steps=3, target_steps=1, **kw),
        tmp_path / "o",
        log=lambda m: None,
        teacher_sha256="cd" * 32,
        pairs_dir=tmp_path / "pairs",
    )
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.parameters(), start.unet.parameters()))
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(torch.as_tensor(pipe(batch_size=2, num_inference_steps=1, output_type="pt").images)).all()


@pytest.mark.parametrize("start", ["output", "progressive"])
def test_a_few_step_generator_can_be_a_deterministic_chain_started_from_another_method(digits_ws, tmp_path, start):
    # K = 2 from a distilled deterministic student: DDIM on the progressive grid, regression through the
    # chain, and the stock export runs the same chain
    from diffusers import DDIMScheduler, DiffusionPipeline

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = DMDConfig(
        steps=2,
        fake_updates=1,
        batch_size=4,
        target_steps=2,
        start=start,
        regression_weight=0.5,
        output_steps=2,
        progressive_steps=2,
        pairs=8,
        pairs_steps=3,
    )
    student, summary = distill(
        teacher, data, cfg, tmp_path / "ck", log=lambda m: None, teacher_sha256="ab" * 32, pairs_dir=tmp_path / "pairs"
    )
    assert summary["student_timesteps"] == [959, 459] and "reg" in summary["final_losses"]
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [959, 459]
    with pytest.raises(ValueError, match="start must be one of"):
        distill(teacher, data, DMDConfig(steps=1, start="magic"), tmp_path / "ck3", log=lambda m: None)
