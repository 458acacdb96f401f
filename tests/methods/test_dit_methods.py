"""Distilling a DiT teacher (a class-conditional latent transformer): the consistency and DMD students come back as
stock DiTPipelines sampled at guidance 1 with the teacher's guidance folded in; the methods and student shapes the
kind does not serve (rectified) are refused before training, saying what to use."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.config import parse_params
from redistill.methods import distill as distill_with
from redistill.models.pipelines import load_pipeline, save_pipeline
from redistill.teachers.dit_parts import build_dit_pipeline, save_dit


def settings_of(**distill):
    """The `distill` section as params.yaml would give it."""
    return parse_params({"distill": distill}).distill


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "teacher"
    return save_dit(build_dit_pipeline(), folder, num_classes=10, guidance_scale=3.0)


@pytest.mark.parametrize(
    "method, settings",
    [
        ("consistency", {"consistency": {"steps": 3, "solver_steps": 48}}),
        ("dmd", {"dmd": {"steps": 3, "start": "teacher", "regression_weight": 0.0}}),
    ],
)
def test_a_dit_student_is_a_stock_dit_pipeline_sampled_at_guidance_one(teacher, tmp_path, method, settings):
    from diffusers import DiffusionPipeline, DiTPipeline

    pipe = load_pipeline(teacher)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    p = settings_of(method=method, target_steps=2, batch_size=8, **settings)
    images = torch.rand(32, 1, 8, 8)
    student, summary = distill_with(p, pipe, images, tmp_path / "ckpt", log=lambda m: None, teacher_path=teacher)
    assert summary["method"] == method
    moved = max((student.transformer.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    sampling = json.loads((tmp_path / "student" / "redistill_sampling.json").read_text())
    assert sampling["guidance_scale"] == 1.0 and sampling["distilled_guidance_scale"] == 3.0
    assert sampling["num_classes"] == 10 and sampling["num_inference_steps"] == 2
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(stock, DiTPipeline)
    stock.set_progress_bar_config(disable=True)
    img = stock(class_labels=[3, 7], guidance_scale=1.0, num_inference_steps=2, output_type="pt").images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()


def test_the_method_a_dit_teacher_is_not_served_by_is_refused_naming_those_that_are(teacher, tmp_path):
    with pytest.raises(ValueError, match="consistency, dmd, output, progressive or adversarial"):
        distill_with(settings_of(method="rectified"), load_pipeline(teacher), torch.rand(8, 1, 8, 8), tmp_path)


def test_a_smaller_student_of_a_dit_is_refused_before_training(teacher, tmp_path):
    small = settings_of(method="consistency", consistency={"steps": 1}, student={"block_out_channels": [8, 8]})
    with pytest.raises(ValueError, match="UNet2DModel"):
        distill_with(small, load_pipeline(teacher), torch.rand(8, 1, 8, 8), tmp_path)
