"""ADD-style adversarial distillation on a tiny real teacher (ε and v): the stock LCMScheduler export on the
trained timesteps, the frozen teacher under the discriminator, and exact resume of the full state."""

from __future__ import annotations

import pytest
import torch

from redistill.data.images import load_image_folder
from redistill.methods.adversarial import AdversarialConfig, Discriminator, distill
from redistill.models.pipelines import load_pipeline, save_pipeline


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_adversarial_student_exports_and_samples_on_its_trained_timesteps(digits_ws, tmp_path, prediction_type):
    from diffusers import DiffusionPipeline, LCMScheduler

    from helpers import make_tiny_pipeline

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type))
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    student, summary = distill(
        teacher, data, AdversarialConfig(steps=4, batch_size=4), tmp_path / "ck", log=lambda m: None
    )
    assert summary["student_timesteps"] == [959, 719, 479, 239]
    assert set(summary["final_losses"]) == {"distill", "adv", "disc"}
    # the discriminator trains heads only: the teacher it stands on is unchanged
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in before.items())
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        pipe.scheduler.set_timesteps(steps)
        assert set(pipe.scheduler.timesteps.tolist()) <= set(summary["student_timesteps"])
        img = pipe(batch_size=2, num_inference_steps=steps, output_type="pt").images
        assert torch.isfinite(torch.as_tensor(img)).all()


def test_discriminator_scores_each_image_from_the_teachers_features(tiny_pipeline):
    from redistill.models import adapter_for

    pipe = load_pipeline(tiny_pipeline)
    unet = pipe.unet.eval().requires_grad_(False)
    d = Discriminator(unet, adapter_for(pipe).output)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    score = d(x, torch.tensor([1, 100, 400]))
    assert score.shape == (3,)
    score.sum().backward()
    assert x.grad.abs().sum() > 0  # the generator's gradient flows through the frozen teacher
    assert all(p.grad is None for p in unet.parameters())


def test_adversarial_resumes_exactly(digits_ws, tmp_path):
    from helpers import crash_when, make_tiny_pipeline, resume_matches_unbroken

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = AdversarialConfig(steps=6, batch_size=4, checkpoint_every=3)
    crash_when(distill, teacher, data, cfg, tmp_path / "ck", "step 6/6")
    logs = resume_matches_unbroken(distill, teacher, data, cfg, tmp_path / "ck", tmp_path / "ck2")
    assert any("resumed from checkpoint-00-0000003" in m for m in logs)
