"""Smaller students (BK-SDM style): initialisation from the teacher, refusal of shapes that cannot be built,
feature matching, and every method distilling into a smaller stock-diffusers student."""

from __future__ import annotations

import pytest
import torch

from redistill.config import parse_params
from redistill.data.images import load_image_folder
from redistill.methods import distill
from redistill.methods.student_shape import FeatureMatch, ShapeError, build_student
from redistill.models.pipelines import load_pipeline, save_pipeline


def _unet(channels=(16, 32), layers=2):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=layers,
        norm_num_groups=8,
    )


def test_smaller_student_is_initialised_from_the_teacher_where_shapes_allow():
    teacher = _unet()
    student, counts = build_student(teacher, [8, 16], 1)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    assert counts["copied"] > 0 and counts["sliced"] > 0
    # the first resnet of the first down block keeps the teacher's leading channels
    w = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(s_sd[w], t_sd[w][:8, :8])
    # a layer the student no longer has is dropped, the remaining one is the teacher's first
    assert "down_blocks.0.resnets.1.conv1.weight" in t_sd and "down_blocks.0.resnets.1.conv1.weight" not in s_sd
    same = "conv_out.bias"
    assert torch.equal(s_sd[same], t_sd[same])
    out = student(torch.randn(2, 1, 8, 8), torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_shapes_that_cannot_be_built_are_refused_with_the_valid_form():
    teacher = _unet()
    with pytest.raises(ShapeError, match="needs 2 entries"):
        build_student(teacher, [8, 8, 8], 0)
    with pytest.raises(ShapeError, match="multiple of the teacher's norm_num_groups \\(8\\)"):
        build_student(teacher, [12, 16], 0)
    with pytest.raises(ShapeError, match="≥ 1"):
        build_student(teacher, [], -1)


def test_feature_matching_pulls_student_blocks_towards_the_teacher():
    teacher, (student, _) = _unet(), build_student(_unet(), [8, 16], 1)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 900])
    fm = FeatureMatch(teacher, student, weight=0.5)
    with torch.no_grad(), fm.teacher():
        teacher(z, t)
    teacher(z, t)  # calls outside a capture do not overwrite the captured features
    with fm.student():
        student(z, t)
    loss = fm.loss()
    assert loss.item() > 0
    loss.backward()
    assert student.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    fm.remove()
    off = FeatureMatch(teacher, student, weight=0.0)
    with off.student():
        student(z, t)
    assert off.loss() == 0.0


@pytest.mark.parametrize(
    "method,steps,section",
    [
        ("progressive", 2, {"progressive": {"teacher_steps": 4, "steps_per_round": 3}}),
        ("consistency", 2, {"consistency": {"steps": 4, "solver_steps": 10}}),
        ("output", 1, {"output": {"pairs": 16, "pairs_steps": 4, "steps": 4}}),
        ("adversarial", 2, {"adversarial": {"steps": 3}}),
        ("dmd", 2, {"dmd": {"steps": 2, "fake_updates": 1}}),
    ],
)
def test_every_method_distils_into_a_smaller_stock_student(digits_ws, tmp_path, method, steps, section):
    from diffusers import DiffusionPipeline

    from helpers import make_tiny_pipeline

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher")  # channels (8, 16)
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    p = parse_params(
        {
            "distill": {
                "method": method,
                "target_steps": steps,
                "batch_size": 4,
                **section,
                "student": {"block_out_channels": [8, 8], "feature_loss": 0.1},
            }
        }
    ).distill
    student, summary = distill(
        p,
        load_pipeline(teacher_dir),
        data,
        tmp_path / "ck",
        log=lambda m: None,
        teacher_path=teacher_dir,
        workspace=tmp_path,
    )
    assert summary["student_params"] < summary["teacher_params"] and summary["student_param_ratio"] < 1
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert tuple(pipe.unet.config.block_out_channels) == (8, 8)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=steps, output_type="pt").images
    assert torch.isfinite(torch.as_tensor(img)).all()
