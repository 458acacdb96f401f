"""One-step output distillation: the pair cache keyed on the teacher's sha256, the stock 1-step export, ε and v."""

from __future__ import annotations

import pytest
import torch

from redistill.config import parse_params
from redistill.data import load_image_folder
from redistill.methods import distill, method_config
from redistill.teacher import load_pipeline, pipeline_sha256, save_pipeline


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_student_samples_in_one_stock_step_and_reuses_the_pairs(digits_ws, tmp_path, prediction_type):
    from conftest import make_tiny_pipeline
    from diffusers import DDIMScheduler, DiffusionPipeline

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type)
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    p = parse_params({"distill": {"method": "output", "target_steps": 1, "batch_size": 8,
                                  "output": {"pairs": 24, "pairs_steps": 5, "steps": 6}}}).distill
    student, summary = distill(p, load_pipeline(teacher_dir), data, tmp_path / "ck", log=lambda m: None,
                               teacher_path=teacher_dir, workspace=tmp_path)
    pairs = list((tmp_path / "data" / "pairs").glob("*.safetensors"))
    assert len(pairs) == 1 and pairs[0].name.startswith(pipeline_sha256(teacher_dir)[:16])
    assert summary["pairs_reused"] is False
    # a second run (another cycle) reuses the cached pairs instead of sampling the teacher again
    _, again = distill(p, load_pipeline(teacher_dir), data, tmp_path / "ck2", log=lambda m: None,
                       teacher_path=teacher_dir, workspace=tmp_path)
    assert again["pairs_reused"] is True and again["pairs_file"] == summary["pairs_file"]

    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    # one stock step returns exactly the student's single call on the noise (clipped to the image range)
    g = torch.Generator().manual_seed(3)
    img = pipe(batch_size=2, num_inference_steps=1, generator=g, output_type="pt").images
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = pipe.unet(noise, torch.tensor([999, 999])).sample.clamp(-1, 1)
    assert torch.allclose(img.permute(0, 3, 1, 2) if img.shape[-1] == 1 else img, (direct / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_output_method_refuses_more_than_one_step():
    with pytest.raises(ValueError, match="exactly 1 sampling step"):
        method_config(parse_params({"distill": {"method": "output", "target_steps": 4}}).distill)
