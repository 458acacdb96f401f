"""Whole cycles through the CLI in an empty workspace, shared by the bring-your-own, rectified and text-to-image
tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import LENIENT_GATE
from redistill.cli import app

runner = CliRunner()

# every method in a few optimiser steps: what is tested is the plumbing for each kind, not the quality
TINY_METHODS = """
distill: {method: progressive, target_steps: 2, batch_size: 8, checkpoint_every: 100, progressive: {teacher_steps: 4, steps_per_round: 2},
          consistency: {steps: 3}, output: {steps: 3, pairs: 16, pairs_steps: 4}, adversarial: {steps: 2},
          dmd: {steps: 2, fake_updates: 1},
          rectified: {couplings: 16, couplings_steps: 4, reflow_steps: 3, reflow_ode_steps: 4, distill_steps: 3}}
evaluate: {num_samples: 60, max_samples: 60, bootstrap: 5, kid_subset_size: 30, sample_batch_size: 60, latency_repeats: 1,
           throughput_repeats: 1, throughput_batch: 4, reference_steps: 10, floor_splits: 4}
features: {encoder_epochs: 3}
validate: {min_count: 50}
"""


def run_cycle(ws: Path, teacher: Path, data: Path, method: str):
    r = runner.invoke(
        app,
        ["cycle", "--workspace", str(ws), "--teacher", str(teacher), "--data", str(data), "--method", method, "--json"],
    )
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_cycle_from_empty_workspace(
    ws: Path,
    teacher: Path,
    data: Path,
    method: str,
    conditional: bool,
    tmp_path: Path,
    reproduce: bool = False,
    own_code: bool | None = None,
) -> None:
    """One cycle in an empty workspace: derives reference + encoder, decides, registers with every tag; the
    export loads and samples; lineage names the derived feature space; the pyfunc model answers; with
    `reproduce`, the version is rebuilt from its lineage and its figures land within the recorded CIs."""
    import mlflow

    from redistill.data.images import dir_md5
    from redistill.registry.client import client, tracking_uri
    from redistill.registry.serving import StudentModel

    ws.mkdir(parents=True)
    (ws / "params.yaml").write_text(TINY_METHODS + LENIENT_GATE)
    result = run_cycle(ws, teacher, data, method)
    assert result["decision"] == "promoted"
    # the workspace was derived from the data: a byte copy as reference, a label-free encoder, both recorded
    record = next(r for r in json.loads((ws / "data" / "bootstrap.json").read_text()) if "reference" in r)
    assert record["reference"]["md5"] == dir_md5(data) == record["reference"]["from_md5"]
    assert record["reference"]["labels"] is conditional
    assert (ws / "data" / "features" / "encoder.safetensors").is_file()
    assert not (ws / "data" / "features" / "classifier.safetensors").exists()
    c = client(tracking_uri(ws))
    # the settings do not name the model: it is named after the teacher, and the workspace records the name, so
    # every later command (lineage, export, the second cycle below) finds it without being told
    name = f"{teacher.resolve().name}-student"
    assert json.loads((ws / "data" / "bootstrap.json").read_text())[-1]["student_name"] == name
    assert [m.name for m in c.search_registered_models()] == [name]
    mv = c.get_model_version(name, result["version"])
    for tag in (
        "key",
        "teacher_sha256",
        "teacher_uri",
        "data_md5",
        "data_uri",
        "params_sha256",
        "git_commit",
        "trigger",
        "method",
        "num_inference_steps",
        "prefect_flow_run_id",
        "gate",
        "gate_reasons",
        "init",
        "features_sha256",
    ):
        assert mv.tags.get(f"redistill.{tag}"), tag
    assert list(json.loads(mv.tags["redistill.features_sha256"])) == ["encoder"]
    assert (
        "recognisable_share" in mv.tags["redistill.gate_reasons"] and "not gated" in mv.tags["redistill.gate_reasons"]
    )
    # lineage, export, and the served model
    r = runner.invoke(app, ["lineage", "--workspace", str(ws), "--alias", "champion", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    out = tmp_path / "export"
    r = runner.invoke(app, ["export", "--workspace", str(ws), "--alias", "champion", "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    # redistill's own ClassConditionalPipeline carries its code; stock layouts (a DiTPipeline) need none
    assert ("trust_remote_code=True" in r.stdout) is (conditional if own_code is None else own_code)
    model = StudentModel(out)
    import pandas as pd

    row = {"seed": 1, "num_images": 2, **({"class_label": 2} if conditional else {})}
    answer = model.predict(pd.DataFrame([row]))
    assert len(answer) == 2
    if conditional:
        assert answer["class_label"].tolist() == [2, 2]
    else:
        with pytest.raises(ValueError, match="unconditional"):
            model.predict(pd.DataFrame([{**row, "class_label": 1}]))
    if reproduce:
        r = runner.invoke(app, ["reproduce", "--workspace", str(ws), "--version", str(result["version"]), "--json"])
        assert r.exit_code == 0, r.output[-3000:]
        rebuilt = json.loads(r.stdout.strip().splitlines()[-1])
        assert Path(rebuilt["teacher"]) == teacher.resolve() and rebuilt["all_within_ci"] is True, rebuilt
    # the same inputs again: the earlier decision, nothing distilled
    again = run_cycle(ws, teacher, data, method)
    assert again["deduplicated"] and again["version"] == result["version"]
    mlflow.set_tracking_uri(None)
