"""Tier 2: the feature classifier and the teacher recipe on real data, with tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from redistill.config import TeacherParams
from redistill.data.images import load_image_folder
from redistill.evaluation.features import classify, load_classifier, not_a_digit_examples
from redistill.models.pipelines import (
    PipelineError,
    check_pipeline_folder,
    load_pipeline,
    pipeline_sha256,
)


def test_classifier_recognises_held_out_digits_and_rejects_noise(digits_ws):
    clf = load_classifier(digits_ws / "data" / "features")
    meta = json.loads((digits_ws / "data" / "features" / "classifier.json").read_text())
    assert meta["metrics"]["heldout_accuracy"] > 0.85  # 12 epochs already separate the digits
    holdout = torch.from_numpy(load_image_folder(digits_ws / "data" / "holdout").images)
    fakes = not_a_digit_examples(holdout, 300, torch.Generator().manual_seed(123))
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    # real digits are recognisable far more often than noise, shuffles and blends
    assert classify(clf, holdout, 0.9)["recognisable_share"] > 0.5
    assert classify(clf, fakes, 0.9)["recognisable_share"] < 0.15
    assert classify(clf, noise, 0.9)["recognisable_share"] < 0.05
    # the feature space is scaled so the reference has mean ‖f‖²/d = 1 (the scale KID's kernel expects)
    ref = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images)
    with torch.no_grad():
        f = clf.features(ref)
    assert (f.pow(2).sum(1) / f.shape[1]).mean().item() == pytest.approx(1.0, rel=1e-3)


def tiny_recipe(**kw) -> TeacherParams:
    base = dict(
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=8,
        train_steps=30,
        batch_size=16,
        warmup_steps=5,
        checkpoint_every=10,
    )
    base.update(kw)
    return TeacherParams(**base)


def test_label_free_encoder_tells_digits_from_non_digits(digits_ws, tmp_path):
    # trained on the reference images alone (no labels): held-out digits sit closer to the reference in its
    # space than not-a-digit images do, every unit is alive, and the features are standardised
    from redistill.evaluation.encoder import EncoderFeatures, load_encoder, save_encoder, train_encoder
    from redistill.evaluation.features import not_a_digit_examples
    from redistill.evaluation.fid import fid_fast

    ref = load_image_folder(digits_ws / "data" / "reference")
    hold = torch.from_numpy(load_image_folder(digits_ws / "data" / "holdout").images)
    enc, metrics = train_encoder(ref.images, epochs=8, log=lambda m: None)
    save_encoder(enc, tmp_path / "f", {"metrics": metrics})
    ext = EncoderFeatures(load_encoder(tmp_path / "f"))
    f_ref = ext(torch.from_numpy(ref.images)).double()
    assert torch.allclose(f_ref.mean(0), torch.zeros(128, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(f_ref.std(0), torch.ones(128, dtype=torch.float64), atol=1e-3)
    noise = not_a_digit_examples(hold, len(hold), torch.Generator().manual_seed(0))
    assert fid_fast(f_ref, ext(hold).double()) < fid_fast(f_ref, ext(noise).double()) / 3


def test_teacher_trains_and_saves_a_stock_safetensors_pipeline(digits_ws, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

    from redistill.teachers.train import train_teacher

    data = load_image_folder(digits_ws / "data" / "reference")
    out = tmp_path / "teachers" / "t1"
    summary = train_teacher(tiny_recipe(), data, out, tmp_path / "ckpt", log=lambda m: None)
    assert summary["train_steps"] == 30 and summary["train_time_s"] > 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    assert not (tmp_path / "ckpt").exists()  # checkpoints are cleaned up once the teacher is saved
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    img = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
    # no temporary folder is left beside the teacher (the save is atomic)
    assert [p.name for p in out.parent.iterdir()] == ["t1"]
    with pytest.raises(PipelineError, match="never overwritten"):
        train_teacher(tiny_recipe(), data, out, tmp_path / "ckpt", log=lambda m: None)


def test_teacher_sha256_covers_weights_and_config(tiny_pipeline, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline, copy)
    assert pipeline_sha256(copy) == pipeline_sha256(tiny_pipeline)
    cfg = copy / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"epsilon"', '"v_prediction"'))
    assert pipeline_sha256(copy) != pipeline_sha256(tiny_pipeline)


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    """A pipeline with .bin weights is refused before anything reads them."""
    from helpers import make_tiny_pipeline

    pipe_dir = make_tiny_pipeline(tmp_path / "p")
    weights = pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (pipe_dir / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PipelineError, match="pickle-based format"):
        check_pipeline_folder(pipe_dir)
    with pytest.raises(PipelineError):
        load_pipeline(pipe_dir)
    assert not marker.exists()


@pytest.mark.trials  # a kill trial, about 50 s: `make trials` (.ci/run runs it)
def test_killed_teacher_training_resumes_to_the_same_weights(digits_ws, tmp_path):
    """SIGKILL part-way, run again: it resumes from the last checkpoint and ends where an unbroken run ends."""
    from safetensors.torch import load_file

    from redistill.teachers.train import train_teacher

    steps, every = 1200, 100
    params = tmp_path / "params.yaml"
    params.write_text(
        "teacher: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, "
        f"train_steps: {steps}, batch_size: 8, warmup_steps: 5, checkpoint_every: {every}}}\n"
    )
    out = tmp_path / "teachers" / "resumed"
    cmd = [
        sys.executable,
        "-m",
        "redistill",
        "teacher",
        "train",
        "--out",
        str(out),
        "--workspace",
        str(digits_ws),
        "--params",
        str(params),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ckpts = digits_ws / "runs" / "teacher" / "resumed" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("checkpoint-*/meta.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed; raise train_steps"
    assert not out.exists()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr

    torch.set_num_threads(1)  # same thread count as the subprocesses, for bitwise-comparable maths
    try:
        from redistill.config import load_params

        ref = tmp_path / "teachers" / "unbroken"
        train_teacher(
            load_params(params).teacher,
            load_image_folder(digits_ws / "data" / "reference"),
            ref,
            tmp_path / "ckpt-ref",
            log=lambda m: None,
        )
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(ref / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"resumed run differs from the unbroken one by {worst}"


def test_teacher_validation_accepts_a_good_teacher(tiny_pipeline):
    from redistill.models.pipelines import validate_teacher

    facts = validate_teacher(tiny_pipeline, 1, (8, 8))
    assert facts["sha256"] == pipeline_sha256(tiny_pipeline)
    assert facts["prediction_type"] == "epsilon" and facts["num_train_timesteps"] == 1000


def test_teacher_validation_refuses_broken_teachers_with_reasons(tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers import make_tiny_pipeline
    from redistill.models.pipelines import validate_teacher

    truncated = make_tiny_pipeline(tmp_path / "truncated")
    w = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(PipelineError, match="diffusion_pytorch_model.safetensors.*truncated"):
        validate_teacher(truncated, 1, (8, 8))

    nan = make_tiny_pipeline(tmp_path / "nan")
    w = nan / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(w)
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, w)
    with pytest.raises(PipelineError, match="non-finite weights"):
        validate_teacher(nan, 1, (8, 8))

    rgb = make_tiny_pipeline(tmp_path / "rgb", channels=3)
    with pytest.raises(PipelineError, match="has 3 input channels but the reference data has 1"):
        validate_teacher(rgb, 1, (8, 8))
