"""Audit and operations on real cycles: lineage, reproduce, rollback, the pyfunc model and its server, reports.

Real Prefect (test harness), real MLflow (SQLite in a temporary folder), real DVC, a tiny diffusers teacher.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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

TINY = (TINY_CYCLE + "teacher: {name: tiny}\n" + LENIENT_GATE).replace("bootstrap: 10", "bootstrap: 20")


def cli(ws, *args):
    return runner.invoke(app, [*map(str, args), "--workspace", str(ws)])


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory, prefect_harness):
    """Three versions: v1 (promoted, on its own copy of the data), v2 (promoted), v3 (rejected)."""
    from helpers import make_tiny_pipeline

    root = tmp_path_factory.mktemp("auditws")
    for sub in ("reference", "holdout", "features"):
        shutil.copytree(digits_ws / "data" / sub, root / "data" / sub)
    shutil.copytree(root / "data" / "reference", root / "data" / "ref-copy")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(TINY)
    (root / "seed1.yaml").write_text(TINY.replace("batch_size: 8,", "batch_size: 8, seed: 1,"))
    (root / "strict.yaml").write_text(
        TINY.replace("fid_gap_max: 1000000000.0", UNMEETABLE_GAP).replace("batch_size: 8,", "batch_size: 8, seed: 2,")
    )
    subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"],
        cwd=root,
        check=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    for args in (
        ["--data", root / "data" / "ref-copy"],
        ["--params", root / "seed1.yaml"],
        ["--params", root / "strict.yaml"],
    ):
        r = cli(root, "cycle", "--json", *args)
        assert r.exit_code == 0, r.output
    return root


def test_lineage_of_the_champion_holds_the_whole_chain_and_round_trips(ws):
    r = cli(ws, "lineage", "--alias", "champion", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert json.loads(json.dumps(d)) == d
    assert d["version"] == "2" and "champion" in d["aliases"] and d["run_id"]
    assert d["teacher"]["sha256"] and Path(d["teacher"]["uri"]).name == "tiny" and d["teacher"]["present"]
    assert d["data"]["md5"].endswith(".dir") and d["data"]["num_images"] > 1000
    assert d["data"]["validation"]["success"] is True and d["data"]["validation"]["data_docs"].endswith("index.html")
    assert d["params"]["sha256"] and d["params"]["values"]["distill"]["seed"] == 1
    assert len(d["code"]["git_commit"]) >= 7 and isinstance(d["code"]["dirty"], bool)
    assert d["prefect"]["flow_run_id"]
    assert d["trigger"]["kind"] == "manual"
    assert {c["name"] for c in d["gate"]["checks"]} >= {
        "fid_gap.classifier",
        "fid_gap.encoder",
        "speedup_throughput",
        "psnr_db",
        "fid_vs_champion",
        "kid_vs_champion",
    }
    assert all({"value", "bound", "passed"} <= set(c) for c in d["gate"]["checks"])
    assert d["replaced"] == "1"
    text = cli(ws, "lineage", "--alias", "champion").stdout
    for part in ("teacher", "DVC md5", "data docs", "git commit", "flow run", "trigger", "gate: passed", "replaced"):
        assert part in text, part


def test_lineage_of_a_missing_version_is_a_clear_error(ws):
    r = cli(ws, "lineage", "--version", "99")
    assert r.exit_code == 2 and "has no version 99" in r.output and "versions 1–3" in r.output


def test_rollback_twice_returns_to_the_same_state_and_a_rejected_version_is_refused(ws):
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    state = lambda: (str(alias(c, NAME, "champion").version), str(alias(c, NAME, "previous").version))  # noqa: E731
    assert state() == ("2", "1")
    r = cli(ws, "rollback", "--reason", "bad outputs reported", "--json")
    assert r.exit_code == 0, r.output
    assert state() == ("1", "2") and json.loads(r.stdout)["reason"] == "bad outputs reported"
    assert json.loads(c.get_model_version(NAME, "1").tags[PREFIX + "rollback"])["from"] == "2"
    runs = c.search_runs([c.get_experiment_by_name("redistill").experiment_id], "tags.`redistill.kind` = 'rollback'")
    assert len(runs) == 1 and runs[0].data.tags["redistill.rollback.to"] == "1"
    assert cli(ws, "rollback").exit_code == 0
    assert state() == ("2", "1")
    r = cli(ws, "rollback", "--to", "3")
    assert r.exit_code == 2 and "did not pass its gate" in r.output and state() == ("2", "1")


def test_reproduce_lands_within_the_recorded_ci(ws):
    r = cli(ws, "reproduce", "--version", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["data_source"] == "recorded folder (unchanged)" and out["all_within_ci"], out["rows"]
    assert {row["metric"] for row in out["rows"]} >= {"fid", "kid", "psnr_db"}


def test_reproduce_takes_data_from_the_dvc_cache_and_refuses_when_it_is_gone(ws):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "add", "-q", "data/ref-copy"], cwd=ws, check=True, env=env)  # v1's data into the cache
    victim = sorted((ws / "data" / "ref-copy").glob("*.png"))[0]
    victim.unlink()  # the folder v1 was made from has changed since
    r = cli(ws, "reproduce", "--version", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["data_source"] == "DVC cache"
    shutil.rmtree(ws / ".dvc" / "cache")
    r = cli(ws, "reproduce", "--version", "1")
    assert r.exit_code == 2 and "not retrievable" in r.output and "DVC cache" in r.output


def test_reproduce_fetches_data_that_only_a_dvc_remote_holds(ws, tmp_path):
    from redistill.data.images import dir_md5

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def dvc(*a):
        return subprocess.run(
            [str(Path(sys.executable).with_name("dvc")), *a],
            cwd=ws,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )

    md5 = client(f"sqlite:///{ws / 'mlflow.db'}").get_model_version(NAME, "1").tags[PREFIX + "data_md5"]
    pristine = ws / "data" / "pristine"  # v1's data again (data/ref-copy began as a copy of data/reference)
    shutil.copytree(ws / "data" / "reference", pristine)
    assert dir_md5(pristine) == md5
    remote, recorded, aside = tmp_path / "remote", ws / "data" / "ref-copy", ws / "data" / "ref-copy.aside"
    dvc("add", "-q", "data/pristine")
    dvc("remote", "add", "-d", "store", str(remote))
    try:
        dvc("push", "-q", "data/pristine.dvc")
        shutil.rmtree(pristine)
        (ws / "data" / "pristine.dvc").unlink()
        shutil.rmtree(ws / ".dvc" / "cache")  # the data is now in the remote only: no folder, no cache, no .dvc file
        recorded.rename(aside)
        r = cli(ws, "reproduce", "--version", "1", "--json")
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["data_source"] == f"DVC remote 'store' ({remote})", out["data_source"]
        assert Path(out["data"]) == ws / "runs" / "reproduce" / "v1" / "data" and dir_md5(Path(out["data"])) == md5
        # with the remote emptied as well, the refusal names every place DVC looked and how to fix it
        shutil.rmtree(ws / ".dvc" / "cache")
        shutil.rmtree(remote)
        r = cli(ws, "reproduce", "--version", "1")
        assert r.exit_code == 2 and "not retrievable" in r.output, r.output
        assert "DVC cache" in r.output and "DVC remote 'store'" in r.output and "dvc remote add" in r.output
    finally:  # leave the module's workspace as the other tests expect it: the recorded folder back, no remote
        if aside.exists():
            aside.rename(recorded)
        dvc("remote", "remove", "store")


def test_reports_are_logged_with_the_cycle(ws):
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    mv = c.get_model_version(NAME, "2")
    have = {a.path for a in c.list_artifacts(mv.run_id, "evaluation")}
    assert {"evaluation/grid.png", "evaluation/quality_vs_steps.png", "evaluation/metrics.json"} <= have
    assert "validation/data_docs" in {a.path for a in c.list_artifacts(mv.run_id, "validation")}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:  # the run's Prefect markdown artifact links to the reports
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["redistill-reports"])))
    assert len(arts) == 3 and any(
        mv.run_id in a.data and "quality_vs_steps.png" in a.data and "data_docs" in a.data for a in arts
    )
    r = cli(ws, "status")
    assert r.exit_code == 0 and "version" in r.output and "v2 *" in r.output
    assert [line.split()[0] for line in r.output.splitlines() if line.startswith("  v") and line[3].isdigit()] == [
        "v3",
        "v2",
        "v1",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_champion_loads_as_pyfunc_and_is_served_over_http(ws, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a user would; undone after the test
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.signature is not None
    out = model.predict(pd.DataFrame([{"seed": 3, "num_images": 2}]))
    assert list(out["index"]) == [0, 1] and (out["height"] == 8).all()
    # the input is validated before any work: each bad request names its field
    for bad, field in (
        [{"seed": 0, "num_images": 65}, "num_images"],
        [{"seed": 0, "num_images": 2.5}, "num_images"],
        [{"seed": -1, "num_images": 1}, "seed"],
        [{"seed": "x", "num_images": 1}, "seed"],
        [{"seed": 0, "num_images": 1, "num_inference_steps": 10**6}, "num_inference_steps"],
    ):
        with pytest.raises(Exception, match=field):
            model.predict(pd.DataFrame([bad]))
    with pytest.raises(Exception, match="images per request"):
        model.predict(pd.DataFrame([{"seed": i, "num_images": 64} for i in range(5)]))

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,  # uvicorn is in the venv's bin
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the model server did not come up"
            time.sleep(1)
        body = json.dumps({"dataframe_records": [{"seed": 0, "num_images": 3}]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = json.loads(resp.read())["predictions"]
        assert len(preds) == 3 and {p["index"] for p in preds} == {0, 1, 2}
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(preds[0]["image_png_base64"]))))
        assert img.shape == (8, 8) and img.dtype == np.uint8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
