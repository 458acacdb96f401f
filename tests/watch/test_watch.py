"""Triggers, end to end: new teachers, drift, coalescing, serving. Real Prefect (test harness), real MLflow
(SQLite in a temporary folder), real DVC in a temporary git repository, tiny diffusers teachers.

The tests of this module share one workspace and run in file order, like the days of a deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import LENIENT_GATE, TINY_CYCLE, UNMEETABLE_GAP
from redistill.cli import app
from redistill.registry.client import PREFIX, alias, client

runner = CliRunner()
NAME = "digits-student"
REPO = Path(__file__).resolve().parents[2]

BASE = TINY_CYCLE + "teacher: {name: tiny}\ndrift: {permutations: 300}\n"
LENIENT = LENIENT_GATE
STRICT = LENIENT.replace("fid_gap_max: 1000000000.0", UNMEETABLE_GAP)


@pytest.fixture()
def events(monkeypatch):
    """Prefect's own asserting events client (prefect.testing): collects what `emit_event` sends."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
    monkeypatch.setattr("prefect.events.utilities.should_emit_events", lambda: True)
    yield lambda: (worker.wait_until_empty(), [e.event for e in worker._client.events])[1]
    worker.drain()


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory, prefect_harness):
    """A git + DVC workspace: data, classifier, teacher `tiny`, tiny settings; batches wait in staged/."""
    from helpers import make_tiny_pipeline

    root = tmp_path_factory.mktemp("watchws")
    for sub in ("reference", "holdout", "features"):
        shutil.copytree(digits_ws / "data" / sub, root / "data" / sub)
    shutil.copytree(digits_ws / "data" / "incoming", root / "staged")
    (root / "data" / "incoming").mkdir()
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(BASE + LENIENT + "watch: {settle_seconds: 0}\n")
    (root / "strict.yaml").write_text(BASE + STRICT + "watch: {settle_seconds: 0}\n")
    (root / "settle.yaml").write_text(BASE + LENIENT + "watch: {settle_seconds: 3600}\n")
    (root / "registry.yaml").write_text(BASE + LENIENT + "watch: {settle_seconds: 0, teacher_model: digits-teacher}\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(Path(sys.executable).with_name("dvc")), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
    return root


def watch(ws, *args) -> dict:
    r = runner.invoke(app, ["watch", "--once", "--json", "--workspace", str(ws), *map(str, args)])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def versions(ws) -> list:
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    try:
        return sorted(c.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    except Exception:
        return []


def champion(ws):
    mv = alias(client(f"sqlite:///{ws / 'mlflow.db'}"), NAME, "champion")
    return None if mv is None else str(mv.version)


def test_a_new_teacher_triggers_exactly_one_cycle(ws, events):
    from helpers import make_tiny_pipeline

    out = watch(ws)
    (t,) = out["teachers"]
    assert t["teacher"] == "tiny" and t["status"] == "new" and t["cycle"]["decision"] == "promoted"
    (v1,) = versions(ws)
    assert v1.tags[PREFIX + "trigger"] == "teacher" and champion(ws) == "1"
    assert "redistill.teacher.new" in events() and "redistill.student.promoted" in events()

    assert watch(ws)["changed"] is False  # looked again: nothing new, nothing run
    shutil.copytree(ws / "data" / "teachers" / "tiny", ws / "data" / "teachers" / "tiny-copy")
    (t,) = watch(ws)["teachers"]
    assert t["status"] == "known"  # same bytes under another name is not a new teacher
    make_tiny_pipeline(ws / "data" / "teachers" / "tiny-v2", seed=1)  # the teacher team's new checkpoint
    (t,) = watch(ws)["teachers"]
    assert t["status"] == "new" and t["cycle"]["version"] == "2"
    assert [v.tags[PREFIX + "trigger"] for v in versions(ws)] == ["teacher", "teacher"]
    assert Path(versions(ws)[1].tags[PREFIX + "teacher_uri"]).name == "tiny-v2"
    # same data and feature spaces: the champion's recorded evaluation is the like-for-like comparison
    assert "the champion's recorded evaluation" in versions(ws)[1].tags[PREFIX + "gate_reasons"]


def test_nothing_changed_takes_no_model_and_no_prefect_server(ws):
    code = (
        "import json, sys, time; t = time.perf_counter(); from redistill.cli import app\n"
        "try: app(['watch', '--once', '--json', '--workspace', sys.argv[1]])\n"
        "except SystemExit: pass\n"
        "print(json.dumps({'s': time.perf_counter() - t, 'mods': [m for m in ('torch', 'prefect', 'diffusers', "
        "'mlflow') if m in sys.modules]}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(ws)], capture_output=True, text=True, env=env, timeout=60)
    wall = time.perf_counter() - t
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[0])["changed"] is False, r.stdout + r.stderr
    probe = json.loads(lines[-1])
    assert probe["mods"] == [] and wall < 5, (probe, wall)


def test_a_half_written_teacher_is_not_picked_up(ws):
    from helpers import make_tiny_pipeline

    half = make_tiny_pipeline(ws / "data" / "teachers" / "tiny-v3", seed=3)
    weights = half / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name(weights.name + ".part"))  # a copy still in progress
    out = watch(ws)
    assert out["changed"] is False and [p["name"] for p in out["pending"]] == ["tiny-v3"]
    weights.with_name(weights.name + ".part").rename(weights)
    with open(weights, "r+b") as f:  # complete name, but the bytes are still arriving ...
        f.truncate(weights.stat().st_size // 2)
    out = watch(ws, "--params", ws / "settle.yaml")  # ... and it changed a moment ago: not settled
    assert out["changed"] is False and "waiting" in out["pending"][0]["reason"]
    assert len(versions(ws)) == 2
    shutil.rmtree(half)


def test_broken_teachers_are_recorded_and_skipped_and_the_champion_stays(ws, events):
    import torch
    from diffusers import DDPMPipeline

    from helpers import make_tiny_pipeline

    before = champion(ws)
    trunc = make_tiny_pipeline(ws / "data" / "teachers" / "truncated", seed=4)
    weights = trunc / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    nan = make_tiny_pipeline(ws / "data" / "teachers" / "nan", seed=5)
    pipe = DDPMPipeline.from_pretrained(nan)
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    pipe.save_pretrained(nan, safe_serialization=True)
    make_tiny_pipeline(ws / "data" / "teachers" / "rgb", channels=3, seed=6)
    # a transformer layout no kind serves (SANA): refused before anything loads, never made the current teacher
    sana = ws / "data" / "teachers" / "dit"
    (sana / "transformer").mkdir(parents=True)
    (sana / "model_index.json").write_text(
        json.dumps({"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]})
    )
    (sana / "transformer" / "config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, sana / "transformer" / "diffusion_pytorch_model.safetensors")

    out = watch(ws)
    got = {t["teacher"]: t for t in out["teachers"]}
    assert {k: v["status"] for k, v in got.items()} == {
        "truncated": "refused",
        "nan": "refused",
        "rgb": "refused",
        "dit": "refused",
    }
    assert "SanaPipeline" in got["dit"]["reason"] and "DiTPipeline (dit-latent)" in got["dit"]["reason"]
    assert "truncated" in got["truncated"]["reason"]
    assert "non-finite weights" in got["nan"]["reason"]
    assert "3 input channels" in got["rgb"]["reason"]
    assert len(versions(ws)) == 2 and champion(ws) == before
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    failed = c.search_runs(
        [c.get_experiment_by_name("redistill").experiment_id], "tags.`redistill.failed_stage` = 'teacher-watch'"
    )
    assert {Path(r.data.tags["redistill.teacher_uri"]).name for r in failed} == {"truncated", "nan", "rgb", "dit"}
    assert events().count("redistill.teacher.rejected") == 4
    assert watch(ws)["changed"] is False  # recorded once, skipped until their contents change
    for name in ("truncated", "nan", "rgb", "dit"):
        shutil.rmtree(ws / "data" / "teachers" / name)


def test_a_teacher_registered_in_mlflow_is_fetched_and_triggers_one_cycle(ws, tmp_path):
    from helpers import make_tiny_pipeline

    n = len(versions(ws))
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    exp = c.create_experiment("teachers", artifact_location=(ws / "mlartifacts" / "teachers").as_uri())
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, str(make_tiny_pipeline(tmp_path / "t", seed=7)), "teacher")
    c.create_registered_model("digits-teacher")
    mv = c.create_model_version("digits-teacher", source=f"{run.info.artifact_uri}/teacher", run_id=run.info.run_id)
    c.set_registered_model_alias("digits-teacher", "champion", mv.version)

    (t,) = watch(ws, "--params", ws / "registry.yaml")["teachers"]
    assert t["teacher"] == "digits-teacher-v1" and t["status"] == "new" and t["cycle"]["decision"] == "promoted"
    assert (ws / "data" / "teachers" / "digits-teacher-v1" / "model_index.json").is_file()
    assert len(versions(ws)) == n + 1 and versions(ws)[-1].tags[PREFIX + "trigger"] == "teacher"
    assert watch(ws, "--params", ws / "registry.yaml")["changed"] is False  # same version: nothing to do


def arrive(ws, batch: str, as_name: str | None = None) -> None:
    shutil.copytree(ws / "staged" / batch, ws / "data" / "incoming" / (as_name or batch))


def test_drift_the_champion_first_then_one_redistillation_per_episode(ws, events):
    n = len(versions(ws))
    champ = champion(ws)

    arrive(ws, "nodrift")
    (b,) = watch(ws)["batches"]
    assert not b["drifted"] and b["action"] == "none" and len(versions(ws)) == n

    arrive(ws, "class_mix")  # drifted, but the champion still passes the gate on it
    (b,) = watch(ws)["batches"]
    assert b["drifted"] and b["action"] == "act" and b["outcome"]["decision"] == "champion still fit"
    assert len(versions(ws)) == n and champion(ws) == champ
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    assert "batch class_mix" in c.get_model_version(NAME, champ).tags[PREFIX + "still_fit"]
    drift_runs = c.search_runs(
        [c.get_experiment_by_name("redistill").experiment_id], "tags.`redistill.kind` = 'drift-check'"
    )
    assert {"drift.json", "drift.png"} <= {a.path for a in c.list_artifacts(drift_runs[0].info.run_id)}
    assert {"redistill.drift.detected", "redistill.champion.still-fit"} <= set(events())

    arrive(ws, "nodrift", "nodrift-2")
    arrive(ws, "nodrift", "nodrift-3")
    assert [b["drifted"] for b in watch(ws)["batches"]] == [False, False]  # two clean batches close the episode

    arrive(ws, "style")  # drifted, and under stricter thresholds the champion is no longer fit: re-distil
    (b,) = watch(ws, "--params", ws / "strict.yaml")["batches"]
    assert b["drifted"] and b["action"] == "act" and b["outcome"]["decision"] == "rejected"
    new = versions(ws)[-1]
    assert len(versions(ws)) == n + 1 and new.tags[PREFIX + "trigger"] == "drift" and champion(ws) == champ
    dvc = yaml.safe_load((ws / "data" / "representative.dvc").read_text())["outs"][0]
    assert new.tags[PREFIX + "data_md5"] == dvc["md5"] and dvc["nfiles"] > 150
    assert Path(new.tags[PREFIX + "data_uri"]).name == "representative"
    detail = json.loads(new.tags[PREFIX + "trigger_detail"])
    assert detail["batch"] == "style" and detail["data_md5"] == dvc["md5"]
    assert "trigger/drift.json" in {a.path for a in c.list_artifacts(new.run_id, "trigger")}
    # MLflow's own lineage: the grown set it trained on, the batch that triggered it (its DVC md5), the teacher
    from redistill.data.images import dir_md5

    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in c.get_run(new.run_id).inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "evaluation", "drift"} and inputs["training"].digest == dvc["md5"]
    assert json.loads(inputs["drift"].source)["dvc_path"] == "data/incoming/style"
    assert inputs["drift"].digest == dir_md5(ws / "data" / "incoming" / "style")
    # the change thresholds compare with the champion measured on the grown set, not its older figures
    assert f"champion v{champ} re-evaluated on this cycle's data" in new.tags[PREFIX + "gate_reasons"]
    assert "champion-evaluation/metrics.json" in {a.path for a in c.list_artifacts(new.run_id, "champion-evaluation")}

    arrive(ws, "style", "style-2")  # the same episode: recorded, not re-distilled again
    (b,) = watch(ws, "--params", ws / "strict.yaml")["batches"]
    assert b["drifted"] and b["action"] == "absorbed" and len(versions(ws)) == n + 1


def test_a_bad_batch_is_recorded_as_bad_and_never_acted_on(ws, events):
    """A batch of another mode, or with an unreadable image, is not drift: it opens no episode, never grows
    the representative set, and is skipped until its contents change (it used to be merged, then fail)."""
    from PIL import Image

    from redistill.core.watch_state import load_state
    from redistill.data.images import dir_md5

    n, champ = len(versions(ws)), champion(ws)
    rep = ws / "data" / "representative"
    rep_md5 = dir_md5(rep) if rep.is_dir() else None
    episode = json.dumps(load_state(ws).get("episode"), sort_keys=True)
    arrive(ws, "style", "rgb")
    for f in (ws / "data" / "incoming" / "rgb").glob("*.png"):
        Image.open(f).convert("RGB").save(f)
    arrive(ws, "nodrift", "truncated")
    png = sorted((ws / "data" / "incoming" / "truncated").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:20])

    got = {b["batch"]: b for b in watch(ws, "--params", ws / "strict.yaml")["batches"]}
    assert {k: b["status"] for k, b in got.items()} == {"rgb": "refused", "truncated": "refused"}
    assert "3×8×8" in got["rgb"]["reason"] and "rgb" in got["rgb"]["reason"]
    assert png.name in got["truncated"]["reason"] and "skipped until its contents change" in got["truncated"]["reason"]
    assert len(versions(ws)) == n and champion(ws) == champ
    assert (dir_md5(rep) if rep.is_dir() else None) == rep_md5
    assert not list((ws / "data").glob("representative.tmp*"))
    assert json.dumps(load_state(ws).get("episode"), sort_keys=True) == episode
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    failed = c.search_runs(
        [c.get_experiment_by_name("redistill").experiment_id], "tags.`redistill.failed_stage` = 'batch-watch'"
    )
    assert {r.data.tags["redistill.batch"] for r in failed} == {"rgb", "truncated"}
    assert all(r.info.status == "FAILED" for r in failed)
    assert events().count("redistill.batch.rejected") == 2
    assert watch(ws, "--params", ws / "strict.yaml")["changed"] is False  # skipped until their contents change
    for name in ("rgb", "truncated"):
        shutil.rmtree(ws / "data" / "incoming" / name)


def test_a_grown_set_is_validated_against_the_reference_it_grew_from_and_the_accepted_batches(ws, tmp_path):
    """A batch at 0.6× contrast drifts and the champion fails on it, so the set grows by it. Its images lie
    below data/reference's std band, so against those bands alone the grown set failed validation and the
    re-distillation stopped (and so did every later cycle on data/representative). The set is validated
    against the reference it grew from (recorded, md5 checked) widened by the batches the watch accepted,
    and the run says so; a changed data/reference is refused by name."""
    import numpy as np
    from PIL import Image

    from redistill.data.images import dir_md5

    now = tmp_path / "now.yaml"  # no cooldown: a new episode acts at once
    now.write_text(
        STRICT.join(
            [
                BASE.replace("drift: {permutations: 300}", "drift: {permutations: 300, cooldown_hours: 0.0}"),
                "watch: {settle_seconds: 0}\n",
            ]
        )
    )
    arrive(ws, "nodrift", "nodrift-4")
    arrive(ws, "nodrift", "nodrift-5")
    watch(ws, "--params", now)  # two clean batches in a row close any open episode
    arrive(ws, "nodrift", "dim")
    for f in (ws / "data" / "incoming" / "dim").glob("*.png"):
        Image.fromarray((np.asarray(Image.open(f)) * 0.6).astype(np.uint8)).save(f)
    n = len(versions(ws))

    (b,) = watch(ws, "--params", now)["batches"]
    assert b["drifted"] and b["action"] == "act", b
    assert b["outcome"]["decision"] == "rejected", b["outcome"]  # validated, distilled, judged (unmeetable gate)
    new = versions(ws)[-1]
    assert len(versions(ws)) == n + 1 and new.tags[PREFIX + "trigger"] == "drift"
    rep, ref = ws / "data" / "representative", ws / "data" / "reference"
    origin = json.loads((rep / "grown_from.json").read_text())  # versioned with the set (part of its DVC md5)
    assert origin["reference"] == {"path": "data/reference", "md5": dir_md5(ref)}
    assert [x["name"] for x in origin["batches"]][-1] == "dim"
    assert new.tags[PREFIX + "validation_reference_md5"] == dir_md5(ref)
    bands = new.tags[PREFIX + "validation_bands"]
    assert dir_md5(ref) in bands and "dim" in bands, bands
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    profile = json.loads(Path(c.download_artifacts(new.run_id, "validation/profile.json", str(tmp_path))).read_text())
    assert profile["bands_from"] == bands and profile["bands"]["std_c0"][0] < 0.2

    saved = tmp_path / "reference"  # data/reference replaced under the grown set: refused by name, then put back
    shutil.copytree(ref, saved)
    try:
        (ref / sorted(p.name for p in ref.glob("*.png"))[0]).unlink()
        r = runner.invoke(app, ["validate", str(rep), "--workspace", str(ws)])
        assert r.exit_code == 1 and f"grew from data/reference at {origin['reference']['md5']}" in r.output, r.output
        assert "dvc checkout" in r.output
    finally:
        shutil.rmtree(ref)
        shutil.copytree(saved, ref)
    shutil.rmtree(ws / "data" / "incoming" / "dim")


@pytest.mark.trials  # ~60 s of three processes: `make test` stays under 12 minutes, `make trials-short` runs it
def test_three_simultaneous_cycles_give_one_distillation_and_one_version(ws, tmp_path):
    params = tmp_path / "p.yaml"  # a setting never used before: a new key, so nothing to dedupe yet
    params.write_text(BASE.replace("batch_size: 8", "batch_size: 6") + LENIENT + "watch: {settle_seconds: 0}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    n = len(versions(ws))
    cmd = [sys.executable, "-m", "redistill", "cycle", "--workspace", str(ws), "--params", str(params), "--json"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len({o["version"] for o in outs}) == 1 and len(versions(ws)) == n + 1
    assert sorted(o["deduplicated"] for o in outs) == [False, True, True]


def test_prefect_yaml_matches_the_settings_and_serve_registers_both_deployments(ws, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from redistill.config import Params

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    w = Params().watch
    assert deps["nightly"]["schedules"][0]["cron"] == w.nightly_cron
    assert deps["nightly"]["schedules"][0]["timezone"] == w.timezone
    assert deps["watch"]["schedules"][0]["interval"] == w.interval_minutes * 60
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (REPO / path).read_text()

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "redistill", "serve", "--workspace", str(ws)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        from prefect.client.orchestration import get_client

        found = set()
        deadline = time.time() + 90
        while time.time() < deadline and len(found) < 2 and proc.poll() is None:
            time.sleep(2)
            with get_client(sync_client=True) as c:
                found = {f"{c.read_flow(d.flow_id).name}/{d.name}" for d in c.read_deployments()}
        assert {"redistill-nightly/nightly", "redistill-watch/watch"} <= found, proc.poll()
        with get_client(sync_client=True) as c:
            nightly = c.read_deployment_by_name("redistill-nightly/nightly")
        assert nightly.schedules[0].schedule.cron == "0 2 * * *"
        assert nightly.parameters["workspace_dir"] == str(ws)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prefect_deploy_creates_both_deployments_from_prefect_yaml(ws, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")}
    prefect = str(Path(sys.executable).with_name("prefect"))
    with get_client(sync_client=True) as c:  # the served ones from the test above share the names
        for d in c.read_deployments():
            c.delete_deployment(d.id)
    for cmd in (
        [prefect, "work-pool", "create", "redistill", "--type", "process"],
        [prefect, "--no-prompt", "deploy", "--all"],
    ):
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with get_client(sync_client=True) as c:
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
    assert set(deps) == {"redistill-nightly/nightly", "redistill-watch/watch"}
    assert all(d.work_pool_name == "redistill" for d in deps.values())
    assert deps["redistill-watch/watch"].schedules[0].schedule.interval.total_seconds() == 600
    r = runner.invoke(app, ["serve", "--workspace", str(ws)])  # a worker owns them now: serve refuses clearly
    assert r.exit_code == 2 and "prefect deploy" in r.output
