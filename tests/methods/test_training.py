"""The machinery every method shares: mixed-precision steps (an fp16 overflow is skipped, the gradient is
clipped unscaled), feature matching on the same inputs, and resume of a smaller progressive student."""

from __future__ import annotations

import pytest
import torch

from redistill.data.images import load_image_folder
from redistill.methods.training import Trainer, new_ema
from redistill.models.pipelines import load_pipeline


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))


def _step(precision: str, tmp_path, scale_loss: float = 1.0, max_grad_norm: float = 1e9):
    model = _model()
    run = Trainer(tmp_path / precision, {"t": precision}, 10**6, log=lambda m: None, mixed_precision=precision)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = new_ema(model, 0.5, warmup=False)
    x = torch.linspace(-1, 1, 32).view(4, 8)
    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [p.clone() for p in ema.shadow_params]
    with run.autocast():
        y = model(x)
    stepped = run.backward(y.float().pow(2).mean() * scale_loss, model, opt, ema, max_grad_norm)
    moved = [(p.detach() - b) for p, b in zip(model.parameters(), before)]
    ema_moved = max((a - b).abs().max().item() for a, b in zip(ema.shadow_params, ema_before))
    return stepped, moved, ema_moved, run


def test_an_fp16_step_that_overflows_is_skipped_and_the_scale_falls(tmp_path):
    # a loss of 1e30 overflows fp16 once scaled: the step must not touch the weights or the EMA
    stepped, moved, ema_moved, run = _step("fp16", tmp_path, scale_loss=1e30)
    assert stepped is False and run.skipped_steps == 1
    assert all(m.abs().max() == 0 for m in moved) and ema_moved == 0
    (scaler,) = run.scalers.values()
    assert scaler.get_scale() < 2.0**16  # halved from the initial scale


@pytest.mark.parametrize("precision,tol", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_a_mixed_precision_step_matches_the_fp32_step(tmp_path, precision, tol):
    # the same step in fp32 and in mixed precision moves the weights alike; under fp16 the gradient is
    # unscaled before the clip (a clip of the scaled gradient would shrink the step ~65,000 times)
    _, ref, _, _ = _step("no", tmp_path, max_grad_norm=0.5)
    stepped, moved, ema_moved, _ = _step(precision, tmp_path, max_grad_norm=0.5)
    assert stepped and ema_moved > 0
    for a, b in zip(moved, ref):
        assert torch.allclose(a, b, atol=tol * b.abs().max().item() + 1e-6), (a - b).abs().max()


def test_unknown_mixed_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no, bf16, fp16"):
        Trainer(tmp_path, {}, 10, mixed_precision="fp8")


@pytest.mark.parametrize("method", ["adversarial", "dmd"])
def test_feature_matching_compares_student_and_teacher_on_the_same_inputs(digits_ws, tmp_path, method):
    # a same-shape student starts as an exact copy of the teacher, so on the same (z, t) the two see
    # identical block features and the first step's feature loss is exactly 0; on different inputs it is not
    from helpers import make_tiny_pipeline
    from redistill.config import parse_params
    from redistill.methods import method_config

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    section = {"adversarial": {"steps": 1}, "dmd": {"steps": 1, "fake_updates": 1}}[method]
    p = parse_params(
        {
            "distill": {
                "method": method,
                "target_steps": 2,
                "batch_size": 4,
                method: section,
                "student": {"feature_loss": 1.0},
            }
        }
    ).distill
    cfg, run = method_config(p)
    _, summary = run(teacher, data, cfg, tmp_path / "ck", log=lambda m: None)
    assert summary["final_losses"]["feature"] == 0.0


def test_a_smaller_progressive_student_resumes_after_round_one(digits_ws, tmp_path):
    from helpers import crash_when, make_tiny_pipeline, resume_matches_unbroken
    from redistill.methods.progressive import ProgressiveConfig, distill

    teacher = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))  # channels (8, 16)
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = ProgressiveConfig(
        teacher_steps=8,
        target_steps=2,
        steps_per_round=4,
        batch_size=4,
        checkpoint_every=2,
        student_channels=(8, 8),
        student_layers=1,
    )
    crash_when(distill, teacher, data, cfg, tmp_path / "ck", "round 2/2 (4→2 steps) step 4/4")
    logs = resume_matches_unbroken(distill, teacher, data, cfg, tmp_path / "ck", tmp_path / "ck2")
    assert any("resumed from checkpoint-01-0000002" in m for m in logs)
