"""`redistill stack up|down|status`: real PostgreSQL, a real `mlflow server` (artifacts proxied) and a real Prefect
server on it, a process work pool with two real `prefect worker` processes, and a DVC remote, all on 127.0.0.1.

The whole stack is a trial (`make trials`, which .ci/run runs; about a minute): it comes up, each part does its
job (a run's artifact goes through the MLflow server into the artifact store, PostgreSQL holds MLflow's
tables, both workers poll the pool, the global concurrency limit has its slots, data is pushed to the DVC remote
and pulled back), and it goes down leaving no process. The quick tests check the bookkeeping that keeps `down`
from signalling a process that is not the stack's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from redistill.config import ConfigError, StackParams
from redistill.ops.servers import _alive
from redistill.ops.stack import down, status
from redistill.registry.client import pid_alive

BIN = Path(sys.executable).parent


def _run(args, cwd=None, env=None, check=True, timeout=600):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def test_a_recorded_pid_that_is_no_longer_the_stacks_is_not_signalled(tmp_path):
    """A stale stack.json whose pid now belongs to another process: down leaves that process alone."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "stack").mkdir()
        (tmp_path / "stack" / "stack.json").write_text(
            json.dumps(
                {
                    "services": {
                        "mlflow": {
                            "pid": other.pid,
                            "port": 1,
                            "marker": "--port 1",
                            "log": "x",
                            "health": "http://127.0.0.1:1/health",
                            "url": "http://127.0.0.1:1",
                        }
                    }
                }
            )
        )
        st = status(tmp_path)
        assert st["services"]["mlflow"]["running"] is False and st["up"] is False and st["env"] == {}
        down(tmp_path, log=lambda m: None)
        assert other.poll() is None and _alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_stack_settings_are_checked():
    with pytest.raises(ConfigError, match="stack.workers, runs_per_worker and concurrency_slots must be at least 1"):
        StackParams(workers=0)
    with pytest.raises(ConfigError, match="stack.mlflow_port must be a port"):
        StackParams(mlflow_port=70000)


def test_status_of_a_workspace_without_a_stack_says_how_to_start_one(tmp_path):
    from typer.testing import CliRunner

    from redistill.cli import app

    r = CliRunner().invoke(app, ["stack", "status", "--workspace", str(tmp_path)])
    assert r.exit_code == 1 and "redistill stack up starts one" in r.output


def _postgres_installed() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.mark.trials
@pytest.mark.long  # real PostgreSQL, MLflow and Prefect servers: `make trials-long`
@pytest.mark.skipif(
    not _postgres_installed(),
    reason="PostgreSQL's server programs are not installed (Debian: apt-get install postgresql; .ci/run installs them)",
)
def test_the_stack_comes_up_does_its_jobs_and_goes_down_leaving_no_process():
    # PostgreSQL runs as the postgres user when we are root: the workspace must be a folder it can enter
    root = Path(tempfile.mkdtemp(prefix="redistill-stack-"))
    os.chmod(root, 0o755)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(k, None)
    redistill = [str(BIN / "redistill")]
    pids, client_env = {}, {}
    try:
        # a DVC repository with one tracked file, for the remote
        _run(["git", "init", "-q"], cwd=root)
        _run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, env=env)
        (root / "data").mkdir()
        (root / "data" / "sample.txt").write_text("representative data\n")
        _run([sys.executable, "-m", "dvc", "add", "-q", "data/sample.txt"], cwd=root, env=env)

        t0 = time.perf_counter()
        up = _run([*redistill, "stack", "up", "--json", "--workspace", str(root)], env=env)
        took = time.perf_counter() - t0
        client_env = json.loads(up.stdout.strip().splitlines()[-1])
        assert set(client_env) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}
        assert all(v.startswith("http://127.0.0.1:") for v in client_env.values())
        st = json.loads(_run([*redistill, "stack", "status", "--json", "--workspace", str(root)], env=env).stdout)
        assert st["up"] and set(st["services"]) == {"postgres", "mlflow", "prefect", "worker-1", "worker-2"}, st
        pids = {k: v["pid"] for k, v in st["services"].items()}
        print(f"stack up in {took:.0f} s")

        # MLflow: the server on PostgreSQL; an artifact goes through it into the artifact store
        from mlflow import MlflowClient

        c = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
        exp = c.create_experiment("stack-check")
        run = c.create_run(exp)
        note = root / "note.txt"
        note.write_text("through the server\n")
        c.log_artifact(run.info.run_id, str(note))
        c.set_terminated(run.info.run_id)
        assert c.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        stored = list((root / "stack" / "mlartifacts").rglob("note.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "through the server\n"
        password = json.loads((root / "stack" / "secrets.json").read_text())["postgres_password"]
        assert oct((root / "stack" / "secrets.json").stat().st_mode & 0o777) == "0o600"
        port = st["services"]["postgres"]["port"]
        names = _run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "redistill",
                "-d",
                "mlflow",
                "-tAc",
                "SELECT name FROM experiments",
            ],
            env={**env, "PGPASSWORD": password},
        ).stdout.split()
        assert "stack-check" in names

        # Prefect: the server answers, both workers poll the pool, the global limit has its slot
        api = client_env["PREFECT_API_URL"]

        def post(path, body):
            req = urllib.request.Request(
                f"{api}{path}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        deadline = time.time() + 60
        while True:
            workers = post("/work_pools/redistill/workers/filter", {})
            online = {w["name"] for w in workers if w.get("status") == "ONLINE"}
            if online >= {"redistill-worker-1", "redistill-worker-2"} or time.time() > deadline:
                break
            time.sleep(1)
        assert online >= {"redistill-worker-1", "redistill-worker-2"}, workers
        with urllib.request.urlopen(f"{api}/v2/concurrency_limits/redistill-distill", timeout=10) as r:
            assert json.loads(r.read())["limit"] == 1
        pool = json.loads(urllib.request.urlopen(f"{api}/work_pools/redistill", timeout=10).read())
        assert pool["type"] == "process"

        # DVC: the default remote is the stack's; data goes there and comes back
        local_cfg = (root / ".dvc" / "config.local").read_text()
        assert "stack" in local_cfg and str(root / "stack" / "dvc-remote") in local_cfg
        _run([sys.executable, "-m", "dvc", "push", "-q"], cwd=root, env=env)
        assert any((root / "stack" / "dvc-remote").rglob("*"))
        (root / "data" / "sample.txt").unlink()
        shutil.rmtree(root / ".dvc" / "cache")
        _run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=root, env=env)
        assert (root / "data" / "sample.txt").read_text() == "representative data\n"

        # up again: nothing new starts, the same environment
        again = _run([*redistill, "stack", "up", "--json", "--workspace", str(root)], env=env)
        assert json.loads(again.stdout.strip().splitlines()[-1]) == client_env
        assert "already running" in again.stderr
        # down, then up at once: the same ports (past the stopped servers' TIME_WAIT connections), the data kept
        _run([*redistill, "stack", "down", "--workspace", str(root)], env=env)
        assert _run([*redistill, "stack", "status", "--workspace", str(root)], env=env, check=False).returncode == 1
        restarted = _run([*redistill, "stack", "up", "--json", "--workspace", str(root)], env=env)
        assert json.loads(restarted.stdout.strip().splitlines()[-1]) == client_env
        assert MlflowClient(client_env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("stack-check") is not None
        st = json.loads(_run([*redistill, "stack", "status", "--json", "--workspace", str(root)], env=env).stdout)
        pids = {k: v["pid"] for k, v in st["services"].items()}
    finally:
        _run([*redistill, "stack", "down", "--workspace", str(root)], env=env, check=False)
        left = {k: pid for k, pid in pids.items() if pid and pid_alive(pid)}
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"stack down left these running: {left}"
    for url in client_env.values():
        with pytest.raises(OSError):
            urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3)


@pytest.mark.trials
@pytest.mark.long  # real PostgreSQL, MLflow and Prefect servers: `make trials-long`
@pytest.mark.skipif(
    not _postgres_installed(),
    reason="PostgreSQL's server programs are not installed (Debian: apt-get install postgresql; .ci/run installs them)",
)
def test_deployed_flows_run_on_the_workers_and_two_triggers_make_one_distillation(digits_ws):
    """`prefect deploy --all` against the stack's server; two runs of the nightly deployment at once are taken by
    the two workers (one flow run each), share one key and make one distillation and one registered version,
    whose lineage is read back from the MLflow server."""
    from helpers import LENIENT_GATE, REPO, TINY_CYCLE, tiny_trial_workspace, trial_env

    root = Path(tempfile.mkdtemp(prefix="redistill-stack-"))
    os.chmod(root, 0o755)
    tiny_trial_workspace(digits_ws, root)
    (root / "params.yaml").write_text(
        TINY_CYCLE + LENIENT_GATE + "teacher: {name: tiny}\nwatch: {settle_seconds: 0.0}\n"
    )
    env = trial_env(REDISTILL_HOME=str(root), DVC_NO_ANALYTICS="1")  # the workers' flow runs work in this workspace
    redistill = [str(BIN / "redistill")]
    try:
        up = _run([*redistill, "stack", "up", "--json", "--workspace", str(root)], env=env)
        cenv = {**env, **json.loads(up.stdout.strip().splitlines()[-1])}
        api = cenv["PREFECT_API_URL"]
        _run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=cenv)
        for name in ("redistill-nightly/nightly", "redistill-watch/watch"):
            assert _run([sys.executable, "-m", "prefect", "deployment", "inspect", name], env=cenv).returncode == 0
        runs = []
        for _ in range(2):
            r = _run([sys.executable, "-m", "prefect", "deployment", "run", "redistill-nightly/nightly"], env=cenv)
            runs.append(next(line.split()[-1] for line in r.stdout.splitlines() if "UUID" in line))
        states = {}
        deadline = time.time() + 1200
        while time.time() < deadline:
            for fr in runs:
                with urllib.request.urlopen(f"{api}/flow_runs/{fr}", timeout=10) as resp:
                    states[fr] = json.loads(resp.read())["state_type"]
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
                break
            time.sleep(3)
        logs = {
            k: Path(v["log"]).read_text(errors="replace")
            for k, v in json.loads(
                _run([*redistill, "stack", "status", "--json", "--workspace", str(root)], env=env).stdout
            )["services"].items()
            if k.startswith("worker-")
        }
        assert set(states.values()) == {"COMPLETED"}, (states, {k: v[-3000:] for k, v in logs.items()})
        took = {w: [fr for fr in runs if fr in text] for w, text in logs.items()}
        assert sorted(len(v) for v in took.values()) == [1, 1], took  # each worker ran one of the two

        from redistill.registry.client import PREFIX, client

        c = client(cenv["MLFLOW_TRACKING_URI"])
        versions = c.search_model_versions("name='digits-student'")
        assert len(versions) == 1, [v.version for v in versions]  # two triggers, one key, one distillation
        tags = versions[0].tags
        assert tags[f"{PREFIX}trigger"] == "schedule" and tags[f"{PREFIX}teacher_sha256"]
        lineage = _run(
            [*redistill, "lineage", "--version", versions[0].version, "--json", "--workspace", str(root)], env=cenv
        )
        assert json.loads(lineage.stdout)["version"] == versions[0].version

        # the watch deployment runs on a worker as well (nothing new arrived: it says so and ends)
        r = _run([sys.executable, "-m", "prefect", "deployment", "run", "redistill-watch/watch"], env=cenv)
        watch_run = next(line.split()[-1] for line in r.stdout.splitlines() if "UUID" in line)
        deadline = time.time() + 600
        while time.time() < deadline:
            with urllib.request.urlopen(f"{api}/flow_runs/{watch_run}", timeout=10) as resp:
                state = json.loads(resp.read())["state_type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        assert state == "COMPLETED", state

        # the decision is an event on the server, where automations can hang on it
        req = urllib.request.Request(
            f"{api}/events/filter",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"filter": {"event": {"prefix": ["redistill."]}}, "limit": 50}).encode(),
        )
        events = json.loads(urllib.request.urlopen(req, timeout=10).read())["events"]
        promoted = [e for e in events if e["event"] == "redistill.student.promoted"]
        assert promoted and promoted[0]["resource"]["prefect.resource.id"] == "redistill.model.digits-student", [
            e["event"] for e in events
        ]

        # the CLI unchanged against the servers: status, a cycle, rollback, export, reproduce
        st = json.loads(_run([*redistill, "status", "--json", "--workspace", str(root)], env=cenv).stdout)
        assert st["champion"] == versions[0].version and st["last_decisions"][0]["trigger"] == "schedule"
        forced = _run([*redistill, "cycle", "--force", "--json", "--workspace", str(root)], env=cenv)
        second = json.loads(forced.stdout.strip().splitlines()[-1])
        assert second["decision"] == "promoted" and str(second["version"]) != versions[0].version
        rb = json.loads(
            _run(
                [
                    *redistill,
                    "rollback",
                    "--to",
                    versions[0].version,
                    "--reason",
                    "stack check",
                    "--json",
                    "--workspace",
                    str(root),
                ],
                env=cenv,
            ).stdout
        )
        assert str(rb["to"]) == versions[0].version
        assert c.get_model_version_by_alias("digits-student", "champion").version == versions[0].version
        _run(
            [*redistill, "export", "--alias", "champion", "--out", str(root / "exported"), "--workspace", str(root)],
            env=cenv,
        )
        assert (root / "exported" / "model_index.json").is_file()
        rep = json.loads(
            _run(
                [*redistill, "reproduce", "--version", versions[0].version, "--json", "--workspace", str(root)],
                env=cenv,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        assert str(rep["version"]) == versions[0].version and rep["rows"], rep
    finally:
        _run([*redistill, "stack", "down", "--workspace", str(root)], env=env, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.trials
@pytest.mark.long  # real PostgreSQL, MLflow and Prefect servers: `make trials-long`
@pytest.mark.skipif(
    not _postgres_installed(),
    reason="PostgreSQL's server programs are not installed (Debian: apt-get install postgresql; .ci/run installs them)",
)
def test_an_up_that_fails_half_way_stops_what_it_started_and_says_why():
    """The Prefect server cannot bind its port (another process listens there): `up` fails with the server's
    own words, and PostgreSQL and the MLflow server it had started are stopped again."""
    import socket

    root = Path(tempfile.mkdtemp(prefix="redistill-stack-"))
    os.chmod(root, 0o755)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    (root / "params.yaml").write_text(f"stack: {{prefect_port: {blocker.getsockname()[1]}}}\n")
    try:
        r = _run([str(BIN / "redistill"), "stack", "up", "--workspace", str(root)], env=env, check=False)
        assert r.returncode != 0 and "prefect exited" in r.stderr and "stopping what this call started" in r.stdout, (
            r.stdout[-2000:],
            r.stderr[-2000:],
        )
        state = json.loads((root / "stack" / "stack.json").read_text())
        left = {k: v["pid"] for k, v in state["services"].items() if v.get("pid") and pid_alive(v["pid"])}
        pg = root / "stack" / "postgres" / "postmaster.pid"
        assert not left and not pg.exists(), (left, pg.exists())
    finally:
        blocker.close()
        _run([str(BIN / "redistill"), "stack", "down", "--workspace", str(root)], env=env, check=False)
        shutil.rmtree(root, ignore_errors=True)
