"""Rectified flow (issue 14): flow-matching teachers as a kind, and the `rectified` method (reflow, then
distillation to few Euler steps) on flow-matching and diffusion teachers.

Teachers are tiny and untrained (a real UNet2DModel with a FlowMatchEulerDiscreteScheduler or a DDPMScheduler);
what is tested is the method's and the pipeline's behaviour, not sample quality (that is the bench's job).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import crash_when, make_tiny_flow_pipeline, make_tiny_pipeline, resume_matches_unbroken
from redistill.config import parse_params
from redistill.methods import distill, method_config
from redistill.models.pipelines import load_pipeline, pipeline_sha256, save_pipeline

TINY = {
    "method": "rectified",
    "target_steps": 2,
    "batch_size": 8,
    "checkpoint_every": 3,
    "rectified": {"couplings": 24, "couplings_steps": 4, "reflow_steps": 7, "reflow_ode_steps": 4, "distill_steps": 7},
}


def _params(**over):
    d = json.loads(json.dumps(TINY))
    for k, v in over.items():
        if k in d["rectified"]:
            d["rectified"][k] = v
        else:
            d[k] = v
    return parse_params({"distill": d}).distill


def _data(n: int = 16) -> torch.Tensor:
    return torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory) -> Path:
    return make_tiny_flow_pipeline(tmp_path_factory.mktemp("flow") / "teacher", shift=3.0)


# --- the kind -------------------------------------------------------------------------------------------------


def test_a_flow_matching_pipeline_is_its_own_kind_with_the_teachers_shift(flow_teacher):
    from redistill.models import adapter_for
    from redistill.models.pipelines import validate_teacher

    pipe = load_pipeline(flow_teacher)
    model = adapter_for(pipe)
    assert model.kind == "flow-matching-pixel" and model.family == "flow" and model.solver == "euler"
    facts = validate_teacher(flow_teacher, 1, (8, 8))
    assert facts["kind"] == "flow-matching-pixel" and facts["shift"] == 3.0 and facts["prediction_type"] == "flow"
    # its own sampler: Euler on the scheduler's shifted grid, exactly what DDPMPipeline + the scheduler run
    g = torch.Generator().manual_seed(4)
    img = model.sample(2, 5, g)
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(img, (model.ode_sample(pipe.unet, noise, 5) / 2 + 0.5).clamp(0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="no ᾱ schedule"):
        model.alphas_cumprod  # noqa: B018 (reading it is what raises)


def test_a_diffusion_teachers_velocity_is_its_probability_flow_ode():
    # Euler on the converted velocity and DDIM (the PF-ODE's own solver) agree as both converge: a teacher whose
    # ε is exact for data N(0, c²·I) (so no clipping is involved) gives the same x₀ from the same noise
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from redistill.methods.rectified import euler
    from redistill.models.pixel import UnconditionalPixel

    c = 0.5
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ac = sched.alphas_cumprod.double()

    class Exact(torch.nn.Module):  # ε̂(z, t) = E[ε | z_t] for x₀ ~ N(0, c²): σ_t·z / (α_t²c² + σ_t²)
        def forward(self, z, t):
            t = torch.as_tensor(t, dtype=torch.float64).expand(len(z))
            lo, hi = t.floor().long().clamp(0, 999), t.ceil().long().clamp(0, 999)
            lam = torch.log(ac / (1 - ac))
            lam_t = lam[lo] + (t - lo) * (lam[hi] - lam[lo])
            abar = torch.sigmoid(lam_t).view(-1, 1, 1, 1)
            a, s = abar.sqrt(), (1 - abar).sqrt()
            return type("Out", (), {"sample": (s * z.double() / (a**2 * c**2 + s**2)).float()})()

    model = UnconditionalPixel(SimpleNamespace(unet=Exact(), scheduler=sched))  # the adapter of a DDPM teacher
    z = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    by_ddim = model.ode_sample(Exact(), z, 500)
    by_velocity = euler(model.velocity, Exact(), z, torch.linspace(1.0, 0.0, 501))
    assert torch.allclose(by_velocity, by_ddim, atol=0.02), (by_velocity - by_ddim).abs().max()
    assert abs(float(by_ddim.std()) - c) < 0.1  # both land on the data's scale (c·z)


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one():
    from redistill.methods.rectified import straightness

    z = torch.randn((8, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    target = torch.zeros_like(z)
    straight = lambda net, x, s: z - target  # noqa: E731 - the constant velocity of a straight path to 0
    curved = lambda net, x, s: x * (1 + 3 * s.view(-1, 1, 1, 1)) - 2.0  # noqa: E731
    assert straightness(straight, None, z, 8) == pytest.approx(0.0, abs=1e-10)
    assert straightness(curved, None, z, 8) > 0.1


@pytest.mark.trials  # a whole cycle (or every key through DVC): `make test` stays under 12 minutes
def test_a_flow_matching_teacher_runs_the_whole_cycle_with_rectified(tmp_path, prefect_harness):
    # an empty workspace, a flow-matching teacher folder and unlabelled images: validated, distilled, evaluated
    # (the teacher at its own Euler sampler), gated, registered, exported, served and reproduced
    from helpers_cycle import check_cycle_from_empty_workspace
    from redistill.data import shapes

    teacher = make_tiny_flow_pipeline(tmp_path / "teacher")
    data = shapes.write(tmp_path / "data", 80, size=8, channels=1, seed=1)
    check_cycle_from_empty_workspace(tmp_path / "ws", teacher, data, "rectified", False, tmp_path, reproduce=True)


def test_the_flow_teacher_recipe_trains_a_stock_flow_matching_pipeline(tmp_path):
    # `redistill teacher flow`: the teacher recipe with flow_teacher's overrides; a stock DDPMPipeline folder with a
    # FlowMatchEulerDiscreteScheduler at the recipe's shift, whose velocity fits the straight paths better than
    # the untrained network's
    from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from typer.testing import CliRunner

    from redistill.cli import app
    from redistill.data import shapes
    from redistill.data.images import load_image_folder

    data = shapes.write(tmp_path / "data", 64, size=8, channels=1, seed=2)
    (tmp_path / "params.yaml").write_text(
        "teacher: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, batch_size: 16, warmup_steps: 5,"
        " checkpoint_every: 20, lr: 0.002}\nflow_teacher: {name: tiny-flow, train_steps: 60, shift: 2.0}\n"
    )
    r = CliRunner().invoke(app, ["teacher", "flow", "--workspace", str(tmp_path), "--data", str(data)])
    assert r.exit_code == 0, r.output[-2000:]
    out = tmp_path / "data" / "flow-teachers" / "tiny-flow"
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 2.0
    recipe = json.loads((out / "redistill_teacher.json").read_text())
    assert recipe["objective"] == "flow_matching" and recipe["recipe"]["train_steps"] == 60

    x0 = torch.from_numpy(load_image_folder(data).images) * 2 - 1
    g = torch.Generator().manual_seed(9)
    noise, sigma = torch.randn(x0.shape, generator=g), torch.rand((len(x0),), generator=g)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise

    def fit(unet):
        with torch.no_grad():
            return float((unet(x_t, sigma * 1000).sample - (noise - x0)).pow(2).mean())

    untrained = make_tiny_flow_pipeline(tmp_path / "untrained")  # the same architecture, fresh weights
    trained, fresh = fit(pipe.unet), fit(load_pipeline(untrained).unet)
    assert trained < 0.8 * fresh, (trained, fresh)


# --- the method -----------------------------------------------------------------------------------------------


def test_couplings_are_cached_by_teacher_sha_and_reused(flow_teacher, tmp_path):
    p = _params()
    _, first = distill(
        p,
        load_pipeline(flow_teacher),
        _data(),
        tmp_path / "ck1",
        log=lambda m: None,
        teacher_path=flow_teacher,
        workspace=tmp_path,
    )
    files = [f for f in (tmp_path / "data" / "pairs").glob("*.safetensors") if "-reflow" not in f.name]
    assert len(files) == 1 and files[0].name.startswith(pipeline_sha256(flow_teacher)[:16] + "-euler4-n24")
    assert first["couplings_reused"] is False and first["teacher_kind"] == "flow-matching-pixel"
    _, again = distill(
        p,
        load_pipeline(flow_teacher),
        _data(),
        tmp_path / "ck2",
        log=lambda m: None,
        teacher_path=flow_teacher,
        workspace=tmp_path,
    )
    assert again["couplings_reused"] is True and again["couplings_file"] == first["couplings_file"]
    # so is the reflowed flow, which does not depend on the step count: a 1-step student reuses it too
    assert first["reflow_reused"] is False and again["reflow_reused"] is True
    _, one = distill(
        _params(target_steps=1),
        load_pipeline(flow_teacher),
        _data(),
        tmp_path / "ck3",
        log=lambda m: None,
        teacher_path=flow_teacher,
        workspace=tmp_path,
    )
    assert one["reflow_reused"] is True and one["reflow_file"] == first["reflow_file"]
    assert one["straightness"] == first["straightness"]
    # another reflow setting is another reflowed flow
    _, other = distill(
        _params(reflow_steps=4),
        load_pipeline(flow_teacher),
        _data(),
        tmp_path / "ck4",
        log=lambda m: None,
        teacher_path=flow_teacher,
        workspace=tmp_path,
    )
    assert other["reflow_reused"] is False and other["reflow_file"] != first["reflow_file"]
    # the couplings are the teacher's own sampler from the saved noise
    from safetensors.torch import load_file

    from redistill.models import adapter_for

    saved = load_file(files[0])
    teacher = load_pipeline(flow_teacher)
    assert torch.allclose(
        saved["x0"], adapter_for(teacher).ode_sample(teacher.unet, saved["noise"], 4).clamp(-1, 1), atol=1e-5
    )


def test_a_diffusion_teacher_is_reflowed_from_the_output_methods_pairs(tmp_path):
    # a DDPM teacher's couplings are its DDIM pairs: the same cache file the output method writes and reads
    teacher_dir = make_tiny_pipeline(tmp_path / "ddpm")
    out_p = parse_params(
        {
            "distill": {
                "method": "output",
                "target_steps": 1,
                "batch_size": 8,
                "output": {"pairs": 24, "pairs_steps": 4, "steps": 2},
            }
        }
    ).distill
    _, out_summary = distill(
        out_p,
        load_pipeline(teacher_dir),
        _data(),
        tmp_path / "o",
        log=lambda m: None,
        teacher_path=teacher_dir,
        workspace=tmp_path,
    )
    student, summary = distill(
        _params(),
        load_pipeline(teacher_dir),
        _data(),
        tmp_path / "r",
        log=lambda m: None,
        teacher_path=teacher_dir,
        workspace=tmp_path,
    )
    assert summary["couplings_reused"] is True and summary["couplings_file"] == out_summary["pairs_file"]
    # the student is a flow: the reflowed paths of an untrained ε teacher's converted ODE are far straighter
    from redistill.models import adapter_for

    assert adapter_for(student).kind == "flow-matching-pixel"
    assert summary["straightness"]["reflowed"] < summary["straightness"]["teacher"]


@pytest.mark.parametrize("marker", ["reflow (2-rectified flow) step 7/7", "distillation (2 Euler steps) step 7/7"])
def test_a_killed_run_resumes_exactly(flow_teacher, tmp_path, marker):
    # stopped at the end of the reflow (resumes it from its step-6 checkpoint) or of the distillation (resumes
    # there, with the reflowed flow read back from the checkpoint to remake the distillation's couplings)
    from redistill.methods.rectified import RectifiedConfig
    from redistill.methods.rectified import distill as rectified

    cfg, _ = method_config(_params())
    assert isinstance(cfg, RectifiedConfig)
    teacher = load_pipeline(flow_teacher)

    def run(t, d, c, ck, log):  # each run its own caches, so the unbroken run really reflows from scratch
        return rectified(t, d, c, ck, log=log, teacher_sha256="k", pairs_dir=ck.parent / f"pairs-{ck.name}")

    crash_when(run, teacher, _data(), cfg, tmp_path / "ck", marker)
    logs = resume_matches_unbroken(run, teacher, _data(), cfg, tmp_path / "ck", tmp_path / "fresh")
    assert any("resumed from" in m for m in logs)


@pytest.mark.trials  # ~25 s, a fresh process: `make test` stays under 12 minutes, `make trials-short` runs it
def test_the_exported_student_samples_in_a_fresh_process_with_stock_diffusers(flow_teacher, tmp_path):
    from redistill.methods.rectified import euler_grid
    from redistill.models import adapter_for

    for k in (1, 2, 4):
        student, summary = distill(
            _params(target_steps=k),
            load_pipeline(flow_teacher),
            _data(),
            tmp_path / f"ck{k}",
            log=lambda m: None,
            teacher_path=flow_teacher,
            workspace=tmp_path,
        )
        assert summary["num_inference_steps"] == k
        folder = tmp_path / f"student{k}"
        save_pipeline(student, folder)
        code = (
            "import sys, torch; from diffusers import DiffusionPipeline; "
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], use_safetensors=True); p.set_progress_bar_config(disable=True); "
            "x = p(batch_size=3, num_inference_steps=int(sys.argv[2]), generator=torch.Generator().manual_seed(5), "
            "output_type='pt').images; "
            "print(type(p).__name__, type(p.scheduler).__name__, p.scheduler.timesteps.tolist()); "
            "torch.save(x, sys.argv[3])"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(folder), str(k), str(tmp_path / "x.pt")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[:2] == ["DDPMPipeline", "FlowMatchEulerDiscreteScheduler"]
        # stock diffusers runs exactly the K Euler steps the student was trained on: 1, (K−1)/K, ... 1/K
        assert json.loads(r.stdout.split(" ", 2)[2]) == [1000.0 * (k - i) / k for i in range(k)]
        stock = torch.load(tmp_path / "x.pt", weights_only=True)
        z = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5))
        pipe = load_pipeline(folder)
        from redistill.methods.rectified import euler

        ours = euler(adapter_for(pipe).velocity, pipe.unet, z, euler_grid(1000, k))
        assert torch.allclose(stock, (ours / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_a_flow_matching_pipeline_refuses_a_ddpm_family_sampler(flow_teacher):
    from redistill.evaluation.sampling import configure_scheduler

    pipe = load_pipeline(flow_teacher)
    assert configure_scheduler(pipe, 4, "auto") == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="saved"):
        configure_scheduler(pipe, 4, "ddim")


# --- the bench ---------------------------------------------------------------------------------------------


@pytest.mark.trials  # about two minutes: seven evaluated rows and three rectified students
@pytest.mark.long
def test_a_flow_matching_teachers_bench_has_euler_teacher_rows_rectified_rows_and_progressive_rows(digits_ws, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from redistill.cli import app

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    shutil.copy(digits_ws / "params.yaml", root / "params.yaml")
    teacher = make_tiny_flow_pipeline(root / "data" / "teachers" / "flow")
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--quick",
            "--json",
            "--workspace",
            str(root),
            "--teacher",
            str(teacher),
            "--methods",
            "rectified,progressive",
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {(row["method"], row["steps"]) for row in result["rows"]}
    want = {("teacher (Euler)", s) for s in (10, 25, 50, 100)} | {("rectified", s) for s in (1, 2, 4)}
    assert want <= rows and {m for m, _ in rows - want} == {"progressive"}  # progressive serves flow teachers
    assert "progressive" not in result.get("skipped", {})
    for row in result["rows"]:
        if row["method"] == "rectified":
            assert set(row["straightness"]) == {"teacher", "reflowed"}
        if row["method"] in ("rectified", "progressive"):
            assert (
                json.loads((Path(row["student"]) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
                == "FlowMatchEulerDiscreteScheduler"
            )
    md = (root / "runs" / "bench" / "quick" / "bench.md").read_text()
    assert "| rectified | 1 |" in md and "straightness of the teacher's paths" in md


def test_reflow_interpolation_and_loss():
    from redistill.methods.rectified import euler_path, interpolate, reflow_loss

    z, x0 = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    x_t = interpolate(z, x0, torch.tensor([0.25, 1.0]))
    assert x_t.view(-1).tolist() == [0.25, 1.0]  # t = 1 is the noise end
    assert reflow_loss(z, x0, torch.ones_like(z)).item() == 0.0  # the straight path's velocity is z − x₀
    # a constant velocity z − x₀ carries Euler from z to x₀ in any number of steps
    out = euler_path(lambda net, x, s: z - x0, None, z, torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(out, x0)
