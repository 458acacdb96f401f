"""`redistill bench --quick` end to end on a tiny real teacher: every row, the three files, and the MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from redistill.cli import app


@pytest.mark.trials  # about 90 s: every method at every step count; `make trials-long`
@pytest.mark.long
def test_quick_bench_has_every_row_and_logs_its_files(digits_ws, tmp_path):
    from mlflow import MlflowClient

    from helpers import make_tiny_pipeline

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    shutil.copy(digits_ws / "params.yaml", root / "params.yaml")
    teacher = make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    r = CliRunner().invoke(app, ["bench", "--quick", "--json", "--workspace", str(root), "--teacher", str(teacher)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {(row["method"], row["steps"]) for row in result["rows"]}
    assert {("teacher (DDIM)", s) for s in (10, 25, 50, 100)} <= rows
    for method in ("progressive", "consistency"):
        assert {(method, s) for s in (1, 2, 4, 8)} <= rows
    for method in ("adversarial", "dmd", "output", "rectified"):
        assert {(method, s) for s in (1, 2, 4)} <= rows
    assert result["skipped"] == {}  # every method serves a diffusion teacher
    for row in result["rows"]:
        assert row["fid_ci95"][0] <= row["fid"] <= row["fid_ci95"][1] or row["fid"] < 1e-9
        assert row["throughput_img_s"] > 0 and row["params"] > 0
        assert (row["distill_wall_s"] is None) == (row["kind"] == "teacher")
    # the teacher at the reference steps is the reference itself
    ref = next(row for row in result["rows"] if row["method"] == "teacher (DDIM)" and row["steps"] == 50)
    assert ref["fid_ratio"] == 1.0 and ref["ssim"] == 1.0
    out = root / "runs" / "bench" / "quick"
    md = (out / "bench.md").read_text()
    assert "| progressive | 4 |" in md and "| steps | best student | FID ratio (goal)" in md
    assert [g["steps"] for g in result["goals"]] == [4, 2, 1]
    assert (out / "quality_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"
    # every method row keeps its student as a stock pipeline folder <method>-<steps>/; DMD trains one per step count
    from diffusers import DiffusionPipeline

    students = {row["student"] for row in result["rows"] if row["kind"] == "method"}
    assert {Path(s).name for s in students} >= {"progressive-1", "dmd-1", "dmd-2", "dmd-4", "output-4", "consistency-8"}
    dmd = {
        row["steps"]: json.loads((Path(row["student"]) / "redistill_distill.json").read_text())
        for row in result["rows"]
        if row["method"] == "dmd"
    }
    assert {n: d["num_inference_steps"] for n, d in dmd.items()} == {1: 1, 2: 2, 4: 4}
    pipe = DiffusionPipeline.from_pretrained(out / "dmd-2", use_safetensors=True)
    assert pipe.unet is not None
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = c.get_run(result["mlflow_run_id"])
    assert {a.path for a in c.list_artifacts(run.info.run_id)} == {
        "bench.json",
        "bench.md",
        "quality_vs_nfe.png",
        "students",
    }
    assert "students/dmd-2" in {a.path for a in c.list_artifacts(run.info.run_id, "students")}
    assert "progressive_4.fid" in run.data.metrics and "dmd_1.fid_gap_floors.encoder" in run.data.metrics


def test_bench_without_data_says_what_to_run(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--quick", "--workspace", str(tmp_path)])
    assert r.exit_code != 0 and "redistill demo" in r.output


def test_bench_refuses_an_unknown_method(digits_ws):
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--quick",
            "--methods",
            "progressive,lcm2",
            "--workspace",
            str(digits_ws),
            "--teacher",
            str(digits_ws),
        ],
    )
    assert r.exit_code != 0 and "valid methods are" in r.output


@pytest.mark.trials  # about 2 minutes per layout: every method that serves it at 1/2/4 steps; `make trials-long`
@pytest.mark.long
@pytest.mark.parametrize("layout", ["dit", "sd3", "pixart", "flux"])
def test_the_bench_runs_every_method_that_serves_a_transformer_teacher(layout, digits_ws, tmp_path):
    """A tiny DiT (class labels), SD3, PixArt-Σ and Flux (captions) on the digits: each method that serves the
    layout has its rows at 1, 2 and 4 steps with a gap in floors in both feature spaces and a speed-up; `rectified`
    is skipped on the diffusion layouts with the reason (its student is a flow); every kept student loads as the
    teacher's stock pipeline."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from redistill.data.caption_files import write_captions
    from redistill.data.captions import caption_labels
    from redistill.data.images import load_image_folder
    from redistill.models.pipelines import save_pipeline

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    shutil.copy(digits_ws / "params.yaml", root / "params.yaml")
    teacher = root / "data" / "teachers" / layout
    if layout == "dit":
        from redistill.teachers.dit_parts import build_dit_pipeline, save_dit

        save_dit(build_dit_pipeline(), teacher, 10, 2.0)
    else:
        from redistill.teachers.flux_parts import build_flux_pipeline
        from redistill.teachers.pixart_parts import build_pixart_pipeline
        from redistill.teachers.sd3_parts import build_sd3_pipeline

        build = {"sd3": build_sd3_pipeline, "flux": build_flux_pipeline}.get(layout)
        save_pipeline(build(tmp_path / "tok") if build else build_pixart_pipeline(), teacher)
        ref = load_image_folder(root / "data" / "reference")
        captions = caption_labels(ref.labels, np.random.default_rng(0))
        write_captions(root / "data" / "reference", dict(zip(ref.files, captions)))
    r = CliRunner().invoke(
        app,
        ["bench", "--quick", "--json", "--no-teacher-rows", "--workspace", str(root), "--teacher", str(teacher)],
    )
    assert r.exit_code == 0, r.output[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    flow = layout in ("sd3", "flux")
    served = ["progressive", "consistency", "output", "adversarial", "dmd"] + (["rectified"] if flow else [])
    assert set(result["skipped"]) == (set() if flow else {"rectified"})
    if not flow:
        assert "flow" in result["skipped"]["rectified"]
    rows = {(row["method"], row["steps"]): row for row in result["rows"]}
    for method in served:
        for steps in (1, 2, 4):
            row = rows[(method, steps)]
            assert set(row["fid_gap_floors"]) == {"classifier", "encoder"}, row
            assert all(np.isfinite(g) for g in row["fid_gap_floors"].values()), row
            assert row["speedup"] > 0 and row["distill_wall_s"] > 0
            assert (row["prompt_adherence"] is None) == (layout == "dit"), row  # prompts: the asked digit drawn?
    stock = {"dit": "DiTPipeline", "sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}
    stock = stock.get(layout, "FluxPipeline")
    for method in served:
        folder = Path(rows[(method, 4)]["student"])
        kwargs = {"text_encoder_3": None, "tokenizer_3": None} if layout == "sd3" else {}
        assert type(DiffusionPipeline.from_pretrained(folder, **kwargs)).__name__ == stock, method
