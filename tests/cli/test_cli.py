"""The command line: --help everywhere, `evaluate --json`, and the bad inputs with one clear message each."""

from __future__ import annotations

import json
import pickle

import pytest
from typer.testing import CliRunner

from redistill.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _all_commands(group=app, prefix=()):
    """Every command and sub-command the CLI registers, so a new one cannot miss its --help."""
    out = [list(prefix)]
    for c in group.registered_commands:
        out.append([*prefix, c.name or c.callback.__name__.replace("_", "-")])
    for g in group.registered_groups:
        out += _all_commands(g.typer_instance, (*prefix, g.name))
    return out


COMMANDS = _all_commands()


def test_the_command_list_covers_the_documented_commands():
    names = {" ".join(c) for c in COMMANDS}
    assert {
        "demo",
        "cycle",
        "watch",
        "serve",
        "status",
        "evaluate",
        "bench",
        "export",
        "lineage",
        "reproduce",
        "rollback",
        "drift check",
        "drift calibrate",
        "teacher train",
    } <= names


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "redistill")
def test_every_command_has_help(cmd):
    r = invoke(*cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_evaluate_json_prints_one_object(digits_ws, tiny_pipeline, tmp_path):
    out = tmp_path / "metrics.json"
    r = invoke(
        "evaluate",
        tiny_pipeline,
        "--steps",
        2,
        "--reference",
        tiny_pipeline,
        "--json",
        "--workspace",
        digits_ws,
        "--out",
        tmp_path / "run",
        "--metrics-out",
        out,
    )
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"quality", "fidelity", "speed", "memory", "steps", "sha256", "grid"}
    assert obj["reference"]["steps"] == 50  # evaluate.reference_steps
    assert obj["grid"] == str((tmp_path / "run" / "grid.png").resolve())  # outside the workspace: absolute
    assert json.loads(out.read_text())["sha256"] == obj["sha256"]


def test_paths_inside_the_workspace_are_recorded_relative(digits_ws, tiny_pipeline):
    import shutil

    inside = digits_ws / "data" / "teachers" / "tiny"
    if not inside.exists():
        shutil.copytree(tiny_pipeline, inside)
    r = invoke(
        "evaluate",
        inside,
        "--steps",
        1,
        "--reference",
        inside,
        "--reference-steps",
        1,
        "--json",
        "--workspace",
        digits_ws,
    )
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["pipeline"] == "data/teachers/tiny" and obj["reference"]["pipeline"] == "data/teachers/tiny"
    assert obj["grid"].startswith("runs/evaluate/tiny-1steps-")


def test_not_a_pipeline_folder(digits_ws, tmp_path):
    r = invoke("evaluate", tmp_path, "--steps", 4, "--workspace", digits_ws)
    assert r.exit_code == 2
    assert "is not a diffusers pipeline folder" in r.output and "model_index.json" in r.output


def test_pipeline_that_does_not_fit_the_data(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    rgb = make_tiny_pipeline(tmp_path / "rgb", channels=3)
    r = invoke("evaluate", rgb, "--steps", 2, "--reference", rgb, "--workspace", digits_ws)
    assert r.exit_code == 2
    assert "3 input channels" in r.output and "pass --data with RGB images" in r.output


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_step_count_must_be_positive(digits_ws, tiny_pipeline, steps):
    r = invoke("evaluate", tiny_pipeline, "--steps", steps, "--workspace", digits_ws)
    assert r.exit_code != 0 and "--steps" in r.output


def test_pickled_weights_are_refused_and_never_unpickled(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    pipe = make_tiny_pipeline(tmp_path / "p")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    r = invoke("evaluate", pipe, "--steps", 2, "--workspace", digits_ws)
    assert r.exit_code == 2 and "never loads" in r.output and "safetensors" in r.output
    assert not marker.exists()


def test_inception_weights_must_be_safetensors(digits_ws, tiny_pipeline, tmp_path):
    w = tmp_path / "inception.pth"
    w.write_bytes(b"not really weights")
    r = invoke(
        "evaluate",
        tiny_pipeline,
        "--steps",
        2,
        "--reference",
        tiny_pipeline,
        "--inception-weights",
        w,
        "--workspace",
        digits_ws,
    )
    assert r.exit_code == 2 and "not a .safetensors file" in r.output


def test_unknown_params_key_fails_with_the_key(digits_ws, tiny_pipeline, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("evaluate: {num_sampels: 10}\n")
    r = invoke("evaluate", tiny_pipeline, "--steps", 2, "--params", bad, "--workspace", digits_ws)
    assert r.exit_code == 2 and "evaluate.num_sampels" in r.output and "num_samples" in r.output


def test_validate_command_exit_codes(digits_ws, tmp_path):
    r = invoke(
        "validate",
        digits_ws / "data" / "incoming" / "nodrift",
        "--workspace",
        digits_ws,
        "--out",
        tmp_path / "ok",
        "--metrics-out",
        tmp_path / "ok.json",
    )
    assert r.exit_code == 0 and "passed" in r.output
    assert json.loads((tmp_path / "ok.json").read_text())["success"] is True
    assert (tmp_path / "ok" / "data_docs" / "index.html").is_file()
    # thicker strokes push 13% of the style batch above the reference's mean-intensity band
    r = invoke(
        "validate", digits_ws / "data" / "incoming" / "style", "--workspace", digits_ws, "--out", tmp_path / "bad"
    )
    assert r.exit_code == 1 and "data validation failed" in r.output and "column=mean" in r.output


def test_distill_command_writes_a_stock_student(digits_ws, tiny_pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    params = tmp_path / "params.yaml"
    params.write_text(
        "distill: {method: progressive, target_steps: 2, batch_size: 8, progressive: {teacher_steps: 4, steps_per_round: 3}}\n"
    )
    out = tmp_path / "student"
    r = invoke("distill", "--out", out, "--teacher", tiny_pipeline, "--params", params, "--workspace", digits_ws)
    assert r.exit_code == 0, r.output
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"  # the tiny teacher's own type (grid from t=959)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [959, 459]
    r = invoke("distill", "--out", out, "--teacher", tiny_pipeline, "--params", params, "--workspace", digits_ws)
    assert r.exit_code == 2 and "never overwritten" in r.output
    # a method that cannot serve the step count is refused before anything is trained
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("distill: {target_steps: 2, batch_size: 8, consistency: {solver_steps: 1}}\n")
    r = invoke(
        "distill",
        "--out",
        tmp_path / "s2",
        "--method",
        "consistency",
        "--teacher",
        tiny_pipeline,
        "--params",
        narrow,
        "--workspace",
        digits_ws,
    )
    assert r.exit_code == 2 and "serves 1 to solver_steps (1)" in r.output and not (tmp_path / "s2").exists()
