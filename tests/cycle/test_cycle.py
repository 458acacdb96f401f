"""Tier 3: whole cycles on a tiny teacher with the real Prefect engine and the real MLflow registry."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import LENIENT_GATE, TINY_CYCLE, UNMEETABLE_GAP
from redistill.cli import app
from redistill.registry.client import PREFIX, alias, client

runner = CliRunner()
NAME = "digits-student"

TINY = TINY_CYCLE + LENIENT_GATE


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory, prefect_harness):
    """A workspace of its own (data, classifier, a tiny teacher, tiny settings, its own MLflow store)."""
    from helpers import make_tiny_pipeline

    root = tmp_path_factory.mktemp("cyclews")
    shutil.copytree(digits_ws / "data", root / "data")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(TINY + "teacher: {name: tiny}\n")
    return root


def cycle(ws, *args):
    r = runner.invoke(app, ["cycle", "--workspace", str(ws), "--json", *map(str, args)])
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if r.exit_code == 0 else None)


def test_first_cycle_promotes_and_an_identical_second_dedupes(ws):
    r, first = cycle(ws)
    assert r.exit_code == 0, r.output
    assert first["decision"] == "promoted" and first["version"] == "1" and not first["deduplicated"]
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    mv = alias(c, NAME, "champion")
    assert str(mv.version) == "1"
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
    ):
        assert mv.tags.get(PREFIX + tag), tag
    assert mv.tags[PREFIX + "gate"] == "passed" and mv.tags[PREFIX + "num_inference_steps"] == "2"
    run = c.get_run(mv.run_id)
    assert "quality.fid" in run.data.metrics and run.info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(mv.run_id)}
    assert {"student", "evaluation", "validation", "gate"} <= arts
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:  # with a Prefect server, the one-at-a-time slot is a global limit
        assert pc.read_global_concurrency_limit_by_name("redistill-distill").limit == 1

    t = time.perf_counter()
    r, second = cycle(ws)
    assert r.exit_code == 0, r.output
    assert second["deduplicated"] and second["version"] == "1" and second["key"] == first["key"]
    assert time.perf_counter() - t < 30  # no distillation, no Prefect server start
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1


def test_the_versions_lineage_is_in_mlflows_own_records(ws):
    """Datasets (DVC md5 digests, DVC paths) and the teacher as the run's inputs, the student as a logged model with
    its metrics that the version was created from, and the lineage summary as the version's description."""
    r, out = cycle(ws)
    assert r.exit_code == 0, r.output
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    mv = c.get_model_version(NAME, out["version"])
    run = c.get_run(mv.run_id)
    datasets = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs
    }
    assert set(datasets) == {"training", "evaluation"}
    for ds in datasets.values():
        assert ds.digest == mv.tags[PREFIX + "data_md5"] and ds.source_type == "dvc"
        assert json.loads(ds.source)["dvc_path"] == "data/reference"
    (teacher_in,) = run.inputs.model_inputs
    teacher = c.get_logged_model(teacher_in.model_id)
    assert teacher.tags["redistill.teacher_sha256"] == mv.tags[PREFIX + "teacher_sha256"]
    model_id = mv.source.removeprefix("models:/")
    assert mv.source.startswith("models:/m-") and [o.model_id for o in run.outputs.model_outputs] == [model_id]
    student = c.get_logged_model(model_id)
    assert str(student.status).endswith("READY") and student.source_run_id == mv.run_id
    assert {"name": NAME, "version": out["version"]} in json.loads(student.tags["mlflow.modelVersions"])
    linked = {m.key: m for m in student.metrics}
    assert "quality.fid" in linked and linked["quality.fid"].dataset_digest == datasets["evaluation"].digest
    import tempfile

    import mlflow.artifacts
    import yaml

    with tempfile.TemporaryDirectory() as tmp:  # a pyfunc model with our loader module, not a pickle
        mlmodel = yaml.safe_load(
            Path(mlflow.artifacts.download_artifacts(f"{student.artifact_location}/MLmodel", dst_path=tmp)).read_text()
        )
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "redistill.registry.serving"
    for text in (
        "teacher",
        mv.tags[PREFIX + "teacher_sha256"][:16],
        mv.tags[PREFIX + "data_md5"],
        "gate check",
        "fid_gap",
        mv.run_id,
    ):
        assert text in mv.description, text
    r = runner.invoke(app, ["lineage", "--version", out["version"], "--json", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["mlflow"]
    assert m["logged_model_id"] == model_id and m["teacher_model"]["model_id"] == teacher.model_id
    assert {d["context"] for d in m["datasets"]} == {"training", "evaluation"} and m["description"] == mv.description
    assert (
        m["ui"]["version"].endswith(f"#/models/{NAME}/versions/{out['version']}")
        and model_id in m["ui"]["logged_model"]
    )
    r = runner.invoke(app, ["lineage", "--version", out["version"], "--workspace", str(ws)])
    assert "in the MLflow UI" in r.stdout and model_id in r.stdout


def test_unmeetable_thresholds_reject_and_champion_stays(ws, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ws / "params.yaml").read_text().replace("fid_gap_max: 1000000000.0", UNMEETABLE_GAP))
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    before = str(alias(c, NAME, "champion").version)
    r, out = cycle(ws, "--params", params)
    assert r.exit_code == 0, r.output
    assert out["decision"] == "rejected"
    assert str(alias(c, NAME, "champion").version) == before
    mv = c.get_model_version(NAME, out["version"])
    assert (
        mv.tags[PREFIX + "gate"] == "rejected"
        and "FAIL absolute fid_gap.classifier" in mv.tags[PREFIX + "gate_reasons"]
    )


def test_corrupted_data_stops_before_distillation_and_is_recorded(ws, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ws / "data" / "reference", bad)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(bad / "zz-wrong.png")
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    versions = len(c.search_model_versions(f"name='{NAME}'"))
    r, _ = cycle(ws, "--data", bad)
    assert r.exit_code == 2 and "data validation failed" in r.output and "column=height" in r.output
    assert len(c.search_model_versions(f"name='{NAME}'")) == versions
    failed = c.search_runs([c.get_experiment_by_name("redistill").experiment_id], "attributes.status = 'FAILED'")
    assert any(run.data.tags.get("redistill.failed_stage") == "validate" for run in failed)
    assert not any((ws / "runs" / "cycles").glob("*/checkpoints"))  # nothing was distilled


def test_settings_the_method_cannot_serve_with_this_teacher_stop_the_cycle_and_are_recorded(ws, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        (ws / "params.yaml")
        .read_text()
        .replace(
            "progressive: {teacher_steps: 4, steps_per_round: 3}",
            "progressive: {teacher_steps: 16, steps_per_round: 3, first_timestep: 929}",
        )
    )
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    versions = len(c.search_model_versions(f"name='{NAME}'"))
    r, _ = cycle(ws, "--params", params)
    assert r.exit_code == 2 and "too low for teacher_steps 16" in r.output, r.output
    assert len(c.search_model_versions(f"name='{NAME}'")) == versions
    failed = c.search_runs([c.get_experiment_by_name("redistill").experiment_id], "attributes.status = 'FAILED'")
    assert any(run.data.tags.get("redistill.failed_stage") == "distill" for run in failed)


def test_a_teacher_that_does_not_fit_the_data_is_refused(ws, tmp_path):
    from helpers import make_tiny_pipeline

    rgb = make_tiny_pipeline(tmp_path / "rgb", channels=3)
    r, _ = cycle(ws, "--teacher", rgb)
    assert r.exit_code == 2 and "3 input channels" in r.output


def test_unknown_method_and_unreachable_tracking_uri(ws, monkeypatch):
    r, _ = cycle(ws, "--method", "magic")
    assert r.exit_code == 2 and "unknown distill.method 'magic'" in r.output and "progressive" in r.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    r, _ = cycle(ws)
    assert r.exit_code == 2 and "cannot be reached" in r.output


def test_an_empty_data_folder_is_recorded_and_stops(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    r, _ = cycle(ws, "--data", tmp_path / "empty")
    assert r.exit_code == 2 and "holds no PNG images" in r.output


def test_status_and_export_of_the_champion(ws, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    r = runner.invoke(app, ["status", "--workspace", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["champion"] == "1" and st["last_decisions"][0]["gate"] in ("passed", "rejected")
    out = tmp_path / "exported"
    r = runner.invoke(app, ["export", "--alias", "champion", "--out", str(out), "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
    r = runner.invoke(app, ["export", "--alias", "champion", "--out", str(out), "--workspace", str(ws)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["export", "--version", "99", "--out", str(tmp_path / "x"), "--workspace", str(ws)])
    assert r.exit_code == 2 and "has no version 99" in r.output


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its (dead) parent cannot reap it


@pytest.mark.trials  # a kill trial, about 90 s: `make trials-short` (.ci/run runs it)
def test_a_killed_cycle_resumes_and_registers_exactly_once(digits_ws, tmp_path):
    """SIGKILL the `redistill cycle` process mid-distillation; the rerun resumes and registers one version."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import make_tiny_pipeline

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(
        TINY.replace("steps_per_round: 3", "steps_per_round: 1500").replace(
            "checkpoint_every: 2", "checkpoint_every: 100"
        )
        + "teacher: {name: tiny}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # own ephemeral server
    env.update(OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    cmd = [sys.executable, "-m", "redistill", "cycle", "--workspace", str(root), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not list((root / "runs" / "cycles").glob("*/checkpoints/*/meta.json"))
    ):
        time.sleep(0.1)
    servers = [pid for pid in _children(proc.pid) if b"prefect.server.api.server" in _cmdline(pid)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the cycle ended before it could be killed; raise steps_per_round"
    assert servers, "the killed cycle had started no ephemeral Prefect server"
    deadline = time.time() + 20  # the server is told when its parent dies, and stops
    while time.time() < deadline and any(_alive(pid) for pid in servers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in servers), "a killed cycle left its Prefect server running"
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    assert c.search_model_versions(f"name='{NAME}'") == []

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint-" in again.stdout + again.stderr
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["decision"] == "promoted"
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1


@pytest.mark.trials  # a whole cycle (or every key through DVC): `make test` stays under 12 minutes
def test_warm_start_from_the_champion_is_recorded_and_refused_when_it_does_not_fit(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline

    root = tmp_path / "warmws"
    shutil.copytree(digits_ws / "data", root / "data")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    dmd = TINY.replace("method: progressive", "method: dmd, warm_fraction: 0.34, dmd: {steps: 6, fake_updates: 1}")
    (root / "params.yaml").write_text(dmd + "teacher: {name: tiny}\n")
    c = client(f"sqlite:///{root / 'mlflow.db'}")

    r, first = cycle(root)  # distill.init: auto, no champion yet → cold
    assert r.exit_code == 0 and first["decision"] == "promoted", r.output
    assert c.get_model_version(NAME, "1").tags[PREFIX + "init"] == "cold"
    assert first["distill"]["config"]["steps"] == 6

    r, warm = cycle(root, "--force")  # the champion fits this teacher → starts from it, warm_fraction of the steps
    assert r.exit_code == 0, r.output
    assert c.get_model_version(NAME, warm["version"]).tags[PREFIX + "init"] == "warm:1"
    assert warm["distill"]["init"] == "warm:1" and warm["distill"]["config"]["steps"] == 2
    d = json.loads(
        runner.invoke(app, ["lineage", "--workspace", str(root), "--version", warm["version"], "--json"]).stdout
    )
    assert d["init"] == {"kind": "warm", "from_version": "1"}

    # a v-prediction teacher: the champion (an ε generator) cannot be its student's start
    vpred = make_tiny_pipeline(tmp_path / "vpred", prediction_type="v_prediction")
    strict = tmp_path / "warm.yaml"
    strict.write_text(dmd.replace("distill: {", "distill: {init: warm, ") + "teacher: {name: tiny}\n")
    versions = len(c.search_model_versions(f"name='{NAME}'"))
    champion_before = str(alias(c, NAME, "champion").version)
    r, _ = cycle(root, "--teacher", vpred, "--params", strict)
    assert r.exit_code == 2 and "does not fit" in r.output and "predicts epsilon" in r.output, r.output
    assert len(c.search_model_versions(f"name='{NAME}'")) == versions
    assert str(alias(c, NAME, "champion").version) == champion_before
    failed = c.search_runs([c.get_experiment_by_name("redistill").experiment_id], "attributes.status = 'FAILED'")
    assert any(run.data.tags.get("redistill.failed_stage") == "warm-start" for run in failed)

    r, auto = cycle(root, "--teacher", vpred)  # distill.init: auto falls back to a cold start, and says why
    assert r.exit_code == 0, r.output
    run = c.get_run(auto["run_id"])
    assert run.data.tags[PREFIX + "init"] == "cold" and "predicts epsilon" in run.data.tags[PREFIX + "init_note"]


def test_the_key_covers_everything_the_cycle_reads(digits_ws, tiny_pipeline, tmp_path):
    """Same teacher, data, settings, code, feature spaces and validation reference ⇒ same key; any of them
    changed ⇒ another key, so a cycle never returns a decision made on other inputs."""
    import dataclasses

    from redistill.config import parse_params
    from redistill.cycle.runs import resolve_inputs

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    data = root / "data" / "batch"
    shutil.copytree(root / "data" / "reference", data)
    p = parse_params({})
    key = lambda q=p: resolve_inputs(tiny_pipeline, data, q, root)["key"]  # noqa: E731
    k0 = key()
    assert key() == k0
    assert (
        key(dataclasses.replace(p, validate=dataclasses.replace(p.validate, min_count=p.validate.min_count + 1))) != k0
    )
    assert key(dataclasses.replace(p, gate=dataclasses.replace(p.gate, fid_gap_max=0.5))) != k0
    assert key(dataclasses.replace(p, registry=dataclasses.replace(p.registry, experiment="other"))) == k0
    ref = sorted((root / "data" / "reference").glob("*.png"))[0]  # the bands' reference, not the cycle's data
    ref.unlink()
    k1 = key()
    assert k1 != k0
    with open(root / "data" / "features" / "classifier.safetensors", "ab") as f:  # a retrained classifier
        f.write(b"\0")
    assert key() != k1


def test_the_prefect_slot_is_exclusive_and_one_orphaned_by_a_server_restart_is_freed(ws, tmp_path, monkeypatch):
    """The slot against a real Prefect server (the harness's). A server restart loses its in-memory leases but
    keeps the slot counted: that state is made here by counting a slot with no lease and no heartbeat."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import PrefectHTTPStatusError

    import redistill.tasks.concurrency as cc

    monkeypatch.setattr(cc, "STALE_S", 3.0)
    monkeypatch.setattr(cc, "WAIT_S", 0.2)
    monkeypatch.setattr(cc, "BEAT_S", 0.5)
    name = "redistill-slot-test"
    cc.ensure_limit(name)
    with get_client(sync_client=True) as pc:
        pc.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
    t = time.monotonic()
    with cc.one_at_a_time(tmp_path, name) as how:
        assert how == "file+prefect" and time.monotonic() - t >= 3.0  # waited for the heartbeat to go stale
        time.sleep(1.5)  # a few beats: the lease is renewed and the heartbeat moves
        with get_client(sync_client=True) as pc:
            assert pc.read_global_concurrency_limit_by_name(name).active_slots == 1
            with pytest.raises(PrefectHTTPStatusError) as taken:  # nobody else gets it while it is held
                pc.increment_concurrency_slots_with_lease([name], 1, "concurrency", 60)
            assert taken.value.response.status_code == 423
        assert cc._read_beat(name)["beat"] >= 1
    with get_client(sync_client=True) as pc:
        assert pc.read_global_concurrency_limit_by_name(name).active_slots == 0
    assert cc._read_beat(name) is None
