"""Consistency and DMD on flow-matching teachers: the straight path's conversions, students exported with the
flow-matching LCM scheduler on their training grid, and DMD's generator keeping the teacher's mean (DMD's gradient
is known to drift on v/flow teachers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redistill.config import parse_params
from redistill.methods import distill
from redistill.methods.consistency import ddim_solver_step, solver_grid
from redistill.models.prediction import StraightPath, alpha_sigma, from_x0_eps, to_x0_eps

FLOW_TEACHER = Path(__file__).resolve().parents[2] / "data" / "flow-teachers" / "digits-flow"


def settings_of(**distill_section):
    return parse_params({"distill": distill_section}).distill


def test_on_the_straight_path_a_ddim_step_is_the_flow_schedulers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    path, x0, eps = StraightPath(1000), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t, s = torch.full((3,), 750.0), torch.full((3,), 500.0)
    a_t, s_t = alpha_sigma(path, t)
    assert torch.allclose(a_t + s_t, torch.ones_like(a_t)) and s_t.flatten()[0].item() == pytest.approx(0.75)
    assert alpha_sigma(path, torch.tensor([-1.0]))[1].item() == 0.0  # the clean end
    z = a_t * x0 + s_t * eps
    v = from_x0_eps(x0, eps, a_t, s_t, "flow")
    back_x0, back_eps = to_x0_eps(v, z, a_t, s_t, "flow")
    assert torch.allclose(back_x0, x0, atol=1e-5) and torch.allclose(back_eps, eps, atol=1e-5)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=[0.75, 0.5])
    euler = sched.step(v, sched.timesteps[0], z).prev_sample
    a_s, s_s = alpha_sigma(path, s)
    assert torch.allclose(ddim_solver_step(back_x0, z, a_t, s_t, a_s, s_s), euler, atol=1e-5)
    grid, k = solver_grid(48, 1000, flow=True)
    assert k == pytest.approx(1000 / 48) and grid[-1].item() == pytest.approx(1000.0)
    assert {750.0, 500.0, 250.0} <= {round(x, 3) for x in grid.tolist()}  # a 4-step student's σ lie on it


@pytest.mark.parametrize(
    "method, section",
    [
        ("consistency", {"consistency": {"steps": 3, "solver_steps": 48}}),
        ("dmd", {"dmd": {"steps": 3}}),
        ("adversarial", {"adversarial": {"steps": 3}}),
    ],
)
def test_a_flow_teachers_student_samples_in_stock_diffusers_on_its_training_grid(tmp_path, method, section):
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler

    from helpers import make_tiny_flow_pipeline
    from redistill.models.pipelines import load_pipeline, save_pipeline

    folder = make_tiny_flow_pipeline(tmp_path / "teacher", shift=3.0)
    teacher = load_pipeline(folder)
    p = settings_of(method=method, target_steps=4, batch_size=8, **section)
    student, summary = distill(p, teacher, torch.rand(32, 1, 8, 8), tmp_path / "ckpt", log=lambda m: None)
    assert summary["method"] == method
    save_pipeline(student, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.scheduler.config.shift == 1.0
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    img = pipe(batch_size=2, num_inference_steps=4, output_type="pt").images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()


def test_every_method_takes_a_flow_teacher_and_dmd_refuses_the_starts_it_cannot_chain(tmp_path):
    from helpers import make_tiny_flow_pipeline
    from redistill.config.tables import METHODS
    from redistill.methods import FAMILIES_SERVED, refuses
    from redistill.models.pipelines import load_pipeline

    assert all(refuses(m, "flow", "flow-matching-pixel") is None for m in METHODS)
    assert all("flow" in FAMILIES_SERVED[m] for m in METHODS)
    teacher = load_pipeline(make_tiny_flow_pipeline(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="start: teacher"):
        distill(settings_of(method="dmd", dmd={"start": "output"}), teacher, torch.rand(8, 1, 8, 8), tmp_path / "d")


def test_a_progressive_student_of_a_flow_teacher_halves_its_euler_steps(tmp_path):
    """Two rounds, 4 → 2 → 1 Euler steps: each round's student learns one step of the last one's two on the
    straight path (a DDIM step there is the Euler step), exported with the Euler scheduler at its own σ."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from helpers import make_tiny_flow_pipeline
    from redistill.models.pipelines import load_pipeline, save_pipeline

    folder = make_tiny_flow_pipeline(tmp_path / "teacher", shift=3.0)
    p = settings_of(
        method="progressive", target_steps=1, batch_size=8, progressive={"teacher_steps": 4, "steps_per_round": 2}
    )
    rounds = []
    student, summary = distill(
        p,
        load_pipeline(folder),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        on_round=lambda n, pipe: rounds.append((n, type(pipe.scheduler).__name__)),
    )
    assert [r["student_steps"] for r in summary["rounds"]] == [2, 1]
    assert rounds == [(2, "FlowMatchEulerDiscreteScheduler"), (1, "FlowMatchEulerDiscreteScheduler")]
    save_pipeline(student, tmp_path / "student")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler)
    stock.set_progress_bar_config(disable=True)
    img = stock(batch_size=2, num_inference_steps=1, output_type="pt").images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()


def test_dmd_on_the_embedded_flow_teacher_keeps_its_mean(tmp_path):
    """DMD from the trained digits flow teacher: the generator's watched mean and its 4-step samples stay at the
    teacher's mean. Reading the velocity as ε makes everything NaN; as v, the samples' mean moves by 0.02."""
    from sklearn.datasets import load_digits

    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline

    teacher = load_pipeline(FLOW_TEACHER)
    data = torch.from_numpy(load_digits().images[:512] / 16.0).float().unsqueeze(1)
    means: list[float] = []
    p = settings_of(method="dmd", target_steps=4, batch_size=16, dmd={"steps": 40})
    student, summary = distill(
        p, teacher, data, tmp_path / "ckpt", log=lambda m: means.append(float(m.split(" mean ")[1].split()[0]))
    )
    teacher_mean = (adapter_for(teacher).sample(512, 8, torch.Generator().manual_seed(0)) * 2 - 1).mean().item()
    student_mean = (adapter_for(student).sample(512, 4, torch.Generator().manual_seed(0)) * 2 - 1).mean().item()
    assert summary["student_timesteps"] == [1000.0, 750.0, 500.0, 250.0]
    assert abs(student_mean - teacher_mean) < 0.012, (student_mean, teacher_mean)
    assert means and abs(summary["final_losses"]["mean"] - teacher_mean) < 0.1


@pytest.mark.parametrize("steps", [1, 2])
def test_an_output_student_of_a_flow_teacher_samples_in_stock_euler_exactly_its_trained_chain(tmp_path, steps):
    """Output distillation on a flow teacher: the student's chain (Euler at σ = 1, …, 1/K on its own velocity, no
    clipping) is what the exported FlowMatchEulerDiscreteScheduler runs, so the stock pipeline's images from the
    same noise equal the chain's output."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from helpers import make_tiny_flow_pipeline
    from redistill.methods.output import student_chain
    from redistill.methods.progressive import flow_grid
    from redistill.methods.training import Trainer
    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline, save_pipeline

    folder = make_tiny_flow_pipeline(tmp_path / "teacher", shift=3.0)
    p = settings_of(
        method="output", target_steps=steps, batch_size=8, output={"steps": 3, "pairs": 16, "pairs_steps": 4}
    )
    student, summary = distill(
        p,
        load_pipeline(folder),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=folder,
        workspace=tmp_path,
    )
    assert summary["method"] == "output"
    save_pipeline(student, tmp_path / "student")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler)
    stock.set_progress_bar_config(disable=True)
    images = stock(
        batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type="pt"
    )
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    model = adapter_for(stock)
    run = Trainer(tmp_path / "chain", {}, 100, lambda m: None, "no")
    with torch.no_grad():
        x0 = student_chain(
            run, model, stock.unet, noise, None, flow_grid(steps, 1000), model.noise_path(), "flow", clip=False
        )
    assert torch.allclose((x0 / 2 + 0.5).clamp(0, 1), images.images, atol=1e-5)
