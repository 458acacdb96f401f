"""`--model NAME` on the commands that read the registry (status, lineage, export, rollback, reproduce).

Real MLflow (SQLite in a temporary folder) holding two registered models, made with `register_student` on
runs that carry a tiny diffusers student: no cycle runs, so the module takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import make_tiny_pipeline
from redistill.cli import app
from redistill.registry.client import CHAMPION, PREFIX, PREVIOUS, REQUIRED_TAGS, alias, client, register_student

runner = CliRunner()
MAIN, OTHER = "main-student", "other-student"  # MAIN is registry.student_name in the workspace's params.yaml
READERS = ["status", "lineage", "export", "rollback", "reproduce"]


def cli(ws: Path, *args):
    return runner.invoke(app, [*map(str, args), "--workspace", str(ws)])


def _tags(key: str, method: str, gate: str = "passed") -> dict[str, str]:
    t = {k: f"{k}-value" for k in REQUIRED_TAGS}
    t.update(key=key, method=method, gate=gate, gate_reasons=f"{gate} by the test", num_inference_steps="2")
    return t


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace whose registry holds MAIN v1, v2 (champion 2, previous 1) and OTHER v1, v2, v3 (champion 2,
    previous 1, v3 rejected). Each model's students are tiny pipelines of their own seed. OTHER v1 also records
    settings, metrics and its teacher (its own student's folder), so `reproduce` gets as far as finding its data."""
    from redistill.models.pipelines import pipeline_sha256
    from redistill.tasks.registry import _experiment

    root = tmp_path_factory.mktemp("modelws")
    (root / "params.yaml").write_text(f"registry: {{student_name: {MAIN}}}\n")
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    exp = _experiment(c, "redistill", root)
    for name, seed, gates in ((MAIN, 0, ["passed", "passed"]), (OTHER, 1, ["passed", "passed", "rejected"])):
        student = make_tiny_pipeline(root / "students" / name, seed=seed)
        for i, gate in enumerate(gates, 1):
            run = c.create_run(exp)
            c.log_artifacts(run.info.run_id, str(student), "student")
            tags = _tags(f"{name}-{i}", f"method-of-{name}", gate)
            if (name, i) == (OTHER, 1):
                c.log_dict(run.info.run_id, {}, "params.json")
                c.log_dict(run.info.run_id, {}, "evaluation/metrics.json")
                tags.update(
                    teacher_uri=str(student),
                    teacher_sha256=pipeline_sha256(student),
                    data_uri="",
                    data_md5="0" * 32 + ".dir",
                )  # no data folder recorded, no DVC repository to restore it
            c.set_terminated(run.info.run_id)
            register_student(c, name, run.info.run_id, "student", tags, promote=gate == "passed")
    return root


@pytest.fixture()
def ws(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template (the artifacts stay in the template, which nothing here writes)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(template / "params.yaml", root)
    shutil.copy(template / "mlflow.db", root)
    return root


def _aliases(ws: Path, name: str) -> tuple[str, str]:
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    return str(alias(c, name, CHAMPION).version), str(alias(c, name, PREVIOUS).version)


def _rollback_runs(ws: Path) -> list:
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    return c.search_runs([c.get_experiment_by_name("redistill").experiment_id], "tags.`redistill.kind` = 'rollback'")


@pytest.mark.parametrize("cmd", READERS)
def test_every_registry_reader_documents_model(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "--model" in r.output and "registry.student_name" in r.output, r.output


def test_status_reads_the_named_model_and_defaults_to_params(ws):
    default = json.loads(cli(ws, "status", "--json").stdout)
    assert default["model"] == MAIN and (default["champion"], default["previous"]) == ("2", "1")
    assert [d["version"] for d in default["last_decisions"]] == ["2", "1"]
    assert json.loads(cli(ws, "status", "--json", "--model", MAIN).stdout) == default  # naming the default is the same
    r = cli(ws, "status", "--json", "--model", OTHER)
    assert r.exit_code == 0, r.output
    other = json.loads(r.stdout)
    assert other["model"] == OTHER and (other["champion"], other["previous"]) == ("2", "1")
    assert [(d["version"], d["gate"]) for d in other["last_decisions"]] == [
        ("3", "rejected"),
        ("2", "passed"),
        ("1", "passed"),
    ]
    assert {d["method"] for d in other["last_decisions"]} == {f"method-of-{OTHER}"}
    text = cli(ws, "status", "--model", OTHER).output
    assert text.startswith(f"{OTHER}: champion 2, previous 1") and "v3" in text


def test_lineage_reads_the_named_model(ws):
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    r = cli(ws, "lineage", "--model", OTHER, "--version", "3", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"] == OTHER and d["version"] == "3" and d["gate"]["verdict"] == "rejected"
    assert d["run_id"] == c.get_model_version(OTHER, "3").run_id and d["method"] == f"method-of-{OTHER}"
    d = json.loads(cli(ws, "lineage", "--alias", "champion", "--json").stdout)
    assert d["model"] == MAIN and d["run_id"] == c.get_model_version(MAIN, "2").run_id
    r = cli(ws, "lineage", "--model", MAIN, "--version", "3")  # MAIN has two versions
    assert r.exit_code == 2 and f"{MAIN} has no version 3" in r.output and "versions 1–2" in r.output


def test_export_writes_the_named_models_student(ws, template, tmp_path):
    out = tmp_path / "other"
    r = cli(ws, "export", "--model", OTHER, "--alias", "champion", "--out", out)
    assert r.exit_code == 0, r.output
    assert f"wrote version 2 of {OTHER}" in r.output
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (out / weights).read_bytes() == (template / "students" / OTHER / weights).read_bytes()
    assert (out / weights).read_bytes() != (template / "students" / MAIN / weights).read_bytes()
    r = cli(ws, "export", "--model", OTHER, "--version", "7", "--out", tmp_path / "none")
    assert r.exit_code == 2 and f"{OTHER} has no version 7" in r.output and f"status --model {OTHER}" in r.output
    assert not (tmp_path / "none").exists()


def test_rollback_moves_only_the_named_model(ws):
    r = cli(ws, "rollback", "--model", OTHER, "--reason", "other went bad", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert (record["model"], record["from"], record["to"]) == (OTHER, "2", "1")
    assert _aliases(ws, OTHER) == ("1", "2") and _aliases(ws, MAIN) == ("2", "1")
    runs = _rollback_runs(ws)
    assert len(runs) == 1 and runs[0].data.tags["redistill.rollback.model"] == OTHER
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    assert json.loads(c.get_model_version(OTHER, "1").tags[PREFIX + "rollback"])["reason"] == "other went bad"
    assert PREFIX + "rollback" not in c.get_model_version(MAIN, "1").tags
    r = cli(ws, "rollback", "--model", OTHER, "--to", "3")  # OTHER's v3 was rejected; MAIN has no v3 at all
    assert r.exit_code == 2 and "did not pass its gate" in r.output
    r = cli(ws, "rollback", "--model", OTHER)
    assert r.exit_code == 0 and f"champion of {OTHER}: version 1 → 2" in r.output
    assert _aliases(ws, OTHER) == ("2", "1") and _aliases(ws, MAIN) == ("2", "1")


def test_reproduce_reads_the_named_model(ws):
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    r = cli(ws, "reproduce", "--model", OTHER, "--version", "3")
    # these runs have no recorded settings, so the rebuild stops at once, naming the run of OTHER's version 3
    assert r.exit_code == 2 and c.get_model_version(OTHER, "3").run_id in r.output and "no params.json" in r.output
    r = cli(ws, "reproduce", "--version", "3")
    assert r.exit_code == 2 and f"{MAIN} has no version 3" in r.output
    assert not (ws / "runs").exists()
    # OTHER's v1 finds its teacher, then stops at its data; its work folder is OTHER's, not MAIN's v1 folder
    r = cli(ws, "reproduce", "--model", OTHER, "--version", "1")
    assert r.exit_code == 2 and "cannot reproduce version 1" in r.output and "not retrievable" in r.output, r.output
    assert (ws / "runs" / "reproduce" / OTHER / "v1").is_dir() and not (ws / "runs" / "reproduce" / "v1").exists()


@pytest.mark.parametrize("cmd", READERS)
def test_an_unknown_model_is_refused_naming_the_registered_ones_and_touches_nothing(ws, tmp_path, cmd):
    args = {
        "status": [],
        "lineage": ["--alias", "champion"],
        "export": ["--alias", "champion", "--out", tmp_path / "x"],
        "rollback": ["--reason", "typo"],
        "reproduce": ["--version", "1"],
    }[cmd]
    r = cli(ws, cmd, "--model", "othr-student", *args)
    assert r.exit_code == 2, r.output
    assert "no registered model named 'othr-student'" in r.output
    assert f"registered models: {MAIN}, {OTHER}" in r.output and "--model" in r.output
    assert _aliases(ws, MAIN) == ("2", "1") and _aliases(ws, OTHER) == ("2", "1")
    assert not _rollback_runs(ws) and not (tmp_path / "x").exists() and not (ws / "runs").exists()


def test_an_unknown_model_in_an_empty_registry_says_none_is_registered(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = cli(tmp_path, "status", "--model", "anything")
    assert r.exit_code == 2 and "no model is registered yet" in r.output and "'digits-student'" in r.output
    assert "no decisions yet" in cli(tmp_path, "status").output  # the configured name before its first cycle, as before
