"""Output distillation: the pair cache keyed on the teacher's sha256, the stock 1-step export, and few-step
students trained through the chain their stock sampler runs, ε and v."""

from __future__ import annotations

import pytest
import torch

from redistill.config import parse_params
from redistill.data.images import load_image_folder
from redistill.methods import distill
from redistill.models.pipelines import load_pipeline, pipeline_sha256, save_pipeline


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_student_samples_in_one_stock_step_and_reuses_the_pairs(digits_ws, tmp_path, prediction_type):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from helpers import make_tiny_pipeline

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type)
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    p = parse_params(
        {
            "distill": {
                "method": "output",
                "target_steps": 1,
                "batch_size": 8,
                "output": {"pairs": 24, "pairs_steps": 5, "steps": 6},
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
    # a pixel teacher's pairs are its DDIM samples, in the workspace's store of drawn samples (one file per batch)
    assert not list((tmp_path / "data" / "pairs").glob("*.safetensors"))
    assert len(list((tmp_path / "data" / "samples").glob("*.safetensors"))) == 1
    assert summary["pairs_reused"] is False and summary["pairs_file"] == str(tmp_path / "data" / "samples")
    # a second run (another cycle) reuses the cached pairs instead of sampling the teacher again
    _, again = distill(
        p,
        load_pipeline(teacher_dir),
        data,
        tmp_path / "ck2",
        log=lambda m: None,
        teacher_path=teacher_dir,
        workspace=tmp_path,
    )
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
    assert torch.allclose(
        img.permute(0, 3, 1, 2) if img.shape[-1] == 1 else img, (direct / 2 + 0.5).clamp(0, 1), atol=1e-5
    )


def test_a_pixel_teachers_pairs_are_its_stored_samples_on_noise_the_evaluation_never_draws(tmp_path):
    """A pixel teacher's pairs are the stock pipeline's DDIM samples, drawn in the evaluation's generation batches
    (batch i seeded pair_seed + i) into the same store, so every method and cycle shares one draw of them; each is the
    teacher's ODE output from its pair's noise. That noise is never the evaluation's (seeded evaluate.seed + i): a
    student must not be judged on the noises it was trained on."""
    from helpers import make_tiny_pipeline
    from redistill.config import GENERATION_BATCH
    from redistill.evaluation.sampling import configure_scheduler, sample_cached
    from redistill.methods.output import OutputConfig, load_or_make_pairs, pair_seed
    from redistill.models import adapter_for

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher")
    teacher, store = load_pipeline(teacher_dir), tmp_path / "samples"
    n = GENERATION_BATCH + 7  # two generation batches, the second short
    cfg = OutputConfig(pairs=n, pairs_steps=4, seed=3)
    noise, x0, cond, where, reused = load_or_make_pairs(
        teacher, pipeline_sha256(teacher_dir), cfg, (1, 8, 8), "cpu", tmp_path / "pairs", lambda m: None, store
    )
    assert cond is None and where == store and reused is False and noise.shape == x0.shape == (n, 1, 8, 8)
    ode = adapter_for(teacher).ode_sample(teacher.unet, noise[-9:], 4).clamp(-1, 1)  # across the batch boundary
    assert torch.allclose(x0[-9:], ode, atol=1e-5)
    pipe = load_pipeline(teacher_dir)
    sched = configure_scheduler(pipe, 4, "auto")
    images, cached = sample_cached(pipe, teacher_dir, sched, n, 4, pair_seed(cfg), GENERATION_BATCH, store)
    assert cached is True and torch.allclose(images * 2 - 1, x0, atol=1e-6)  # the stored draw, shared
    # an evaluation with the distill seed (evaluate.seed and distill.seed are both 0 by default) draws other noise
    for s in range(cfg.seed, cfg.seed + 64):  # every batch seed of an evaluation up to 32,000 samples
        g = torch.randn((GENERATION_BATCH, 1, 8, 8), generator=torch.Generator().manual_seed(s))
        assert not torch.isclose(g[:1].flatten(), noise[:1].flatten()).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_few_step_output_student_is_trained_through_the_chain_the_stock_sampler_runs(
    digits_ws, tmp_path, prediction_type
):
    # K = 2: the stock DDIMScheduler export on the trained grid must reproduce the chain the loss went through
    from diffusers import DDIMScheduler, DiffusionPipeline

    from helpers import make_tiny_pipeline
    from redistill.methods.output import OutputConfig
    from redistill.methods.output import distill as output_distill

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type)
    teacher = load_pipeline(teacher_dir)
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:64])
    cfg = OutputConfig(target_steps=2, pairs=16, pairs_steps=4, steps=4, batch_size=4, lr=1e-3)
    student, summary = output_distill(
        teacher, data, cfg, tmp_path / "ck", log=lambda m: None, teacher_sha256="ef" * 32, pairs_dir=tmp_path / "pairs"
    )
    assert summary["num_inference_steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(student.unet.parameters(), teacher.unet.parameters()))
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [959, 459]
    img = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    # the training chain, by hand: DDIM with x̂₀ clipped and the model's own ε, then the clean end
    from redistill.models.prediction import alpha_sigma, to_x0_eps

    z = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    ac = pipe.scheduler.alphas_cumprod.float()
    with torch.no_grad():
        for t, nxt in ((959, 459), (459, -1)):
            tt, nn_ = torch.tensor([t, t]), torch.tensor([nxt, nxt])
            (a, s), (a2, s2) = alpha_sigma(ac, tt), alpha_sigma(ac, nn_)
            x0, eps = to_x0_eps(pipe.unet(z, tt).sample, z, a, s, prediction_type)
            z = a2 * x0.clamp(-1, 1) + s2 * eps
    assert torch.allclose(torch.as_tensor(img).reshape(2, 1, 8, 8), (z / 2 + 0.5).clamp(0, 1), atol=1e-4)


def test_output_grid_that_steps_below_zero_is_refused(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    teacher_dir = make_tiny_pipeline(tmp_path / "teacher")
    data = torch.from_numpy(load_image_folder(digits_ws / "data" / "reference").images[:8])
    p = parse_params({"distill": {"method": "output", "target_steps": 4, "output": {"first_timestep": 600}}}).distill
    with pytest.raises(ValueError, match="too low for 4 steps"):
        distill(p, load_pipeline(teacher_dir), data, tmp_path / "ck", teacher_path=teacher_dir, workspace=tmp_path)
