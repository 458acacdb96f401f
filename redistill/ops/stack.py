"""`redistill stack up|down|status`: the production shape on one machine, with real servers.

1. **PostgreSQL** (the machine's own server programs: Debian's `postgresql` package), a cluster under
   `<workspace>/stack/postgres`, listening on `stack.host` only, password authentication (scram-sha-256; the
   password is generated and kept in `stack/secrets.json`, mode 0600). PostgreSQL refuses to run as root: as root,
   its programs run as the `postgres` user, who must be able to enter the workspace's folders.
2. **An MLflow server** on its database `mlflow`, with artifacts proxied (`--artifacts-destination
   stack/mlartifacts`): clients log through the server and never write the artifact store directly.
3. **A Prefect server** on its database `prefect` (`PREFECT_API_DATABASE_CONNECTION_URL`, asyncpg), a work pool of
   type `process` (`stack.work_pool`), the global concurrency limit `redistill-distill` with
   `stack.concurrency_slots` slots (tasks/concurrency.py takes it), and `stack.workers` `prefect worker` processes.
4. **A DVC remote**: the folder `stack/dvc-remote`, or `stack.dvc_remote`, set as the default remote of the
   workspace's DVC repository in `.dvc/config.local` (not committed), when the workspace is one.

Every server runs in its own session (it outlives `stack up`, and Ctrl-C in the terminal does not reach it). Its
pid, port and log are recorded in `stack/stack.json` as soon as it starts, so `stack down` stops whatever a killed
`up` left. `down` checks that a recorded pid is still the process it started (its command line) before it signals
it, stops the process group (TERM, then KILL after a grace period) and PostgreSQL with `pg_ctl stop -m fast`.
The data stays: the next `up` starts on the same databases, artifact store and ports.

What a client needs is the environment `up` prints (`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`): every redistill
command then talks to the servers, unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redistill.ops.postgres import DB_USER, _as_postgres, _postmaster_pid, _start_postgres, pg_program
from redistill.ops.servers import (
    START_TIMEOUT_S,
    StackError,
    _alive,
    _healthy,
    _ports,
    _save_state,
    _secret,
    _spawn,
    _tail,
    _wait,
    load_state,
    stack_dir,
    stop_group,
)

LIMIT_NAME = "redistill-distill"  # tasks/concurrency.py's global concurrency limit


# ---------------------------------------------------------------------------------------------------
# The services
# ---------------------------------------------------------------------------------------------------


def _base_env(root: Path) -> dict:
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(stack_dir(root) / "prefect-home"),
    }
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(k, None)
    return env


def _start_server(
    root: Path,
    state: dict,
    name: str,
    cmd: list[str],
    env: dict,
    health: str,
    marker: str,
    port: int,
    url: str,
    log,
    spawned: dict,
) -> None:
    svc = state["services"].get(name)
    if svc and _alive(svc.get("pid"), svc.get("marker")) and _healthy(svc.get("health")):
        log(f"{name}: already running (pid {svc['pid']})")
        return
    logf = stack_dir(root) / "logs" / f"{name}.log"
    proc = spawned[name] = _spawn(cmd, logf, env, root)
    state["services"][name] = {
        "pid": proc.pid,
        "port": port,
        "marker": marker,
        "log": str(logf),
        "health": health,
        "url": url,
    }
    _save_state(root, state)
    _wait(health, proc, name, logf)
    log(f"{name}: {url} (pid {proc.pid})")


def client_env(state: dict) -> dict[str, str]:
    """What a client exports to use the stack."""
    s = state.get("services", {})
    env = {}
    if "mlflow" in s:
        env["MLFLOW_TRACKING_URI"] = s["mlflow"]["url"]
    if "prefect" in s:
        env["PREFECT_API_URL"] = s["prefect"]["url"]
    return env


def _prefect_setup(p, env: dict, log) -> None:
    """The work pool (type process) and the global concurrency limit, on the server."""
    prefect = [sys.executable, "-m", "prefect"]
    r = subprocess.run(
        [*prefect, "work-pool", "inspect", p.work_pool], env=env, capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        r = subprocess.run(
            [*prefect, "work-pool", "create", p.work_pool, "--type", "process"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise StackError(f"prefect work-pool create {p.work_pool} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    code = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        f"    c.upsert_global_concurrency_limit_by_name({LIMIT_NAME!r}, {int(p.concurrency_slots)})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise StackError(f"the global concurrency limit {LIMIT_NAME} could not be set: {r.stderr.strip()[-400:]}")
    log(f"prefect: work pool {p.work_pool} (process), global concurrency limit {LIMIT_NAME} = {p.concurrency_slots}")


def _dvc_remote(root: Path, p, state: dict, log) -> None:
    url = p.dvc_remote or str(stack_dir(root) / "dvc-remote")
    if not p.dvc_remote:
        Path(url).mkdir(parents=True, exist_ok=True)
    state["dvc_remote"] = url
    if (root / ".dvc").is_dir():
        r = subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "add", "--local", "--default", "--force", "stack", url],
            cwd=str(root),
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise StackError(f"dvc remote add failed: {(r.stderr or r.stdout).strip()[-400:]}")
        log(f"dvc: default remote `stack` = {url} (.dvc/config.local)")
    else:
        log(f"dvc: {root} is not a DVC repository; the remote {url} is ready for `dvc remote add`")
    _save_state(root, state)


def up(root: Path, p, log=print) -> dict:
    """Start whatever of the stack is not running; returns the state (services, ports, the client environment).
    A failure, or an interrupt, stops what this call started before it re-raises."""
    root = Path(root).resolve()
    sd = stack_dir(root)
    (sd / "logs").mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    state.setdefault("services", {})
    pg_before = _alive(_postmaster_pid(sd / "postgres"), "postgres")
    spawned: dict[str, subprocess.Popen] = {}  # what this call started: stopped again if it fails
    ports = _ports(root, p, state)
    state["ports"], state["host"], state["workspace"] = ports, p.host, str(root)
    _save_state(root, state)
    password = _secret(root)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        old_term = None
    try:
        _start_postgres(root, p, ports["postgres"], password, state, log)
        env = _base_env(root)
        db = f"{DB_USER}:{password}@{p.host}:{ports['postgres']}"
        (sd / "mlartifacts").mkdir(exist_ok=True)
        mlflow_url = f"http://{p.host}:{ports['mlflow']}"
        _start_server(
            root,
            state,
            "mlflow",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"postgresql+psycopg2://{db}/mlflow",
                "--artifacts-destination",
                str(sd / "mlartifacts"),
                "--host",
                p.host,
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
            ],
            env,
            f"{mlflow_url}/health",
            f"--port {ports['mlflow']}",
            ports["mlflow"],
            mlflow_url,
            log,
            spawned,
        )
        prefect_url = f"http://{p.host}:{ports['prefect']}/api"
        _start_server(
            root,
            state,
            "prefect",
            [sys.executable, "-m", "prefect", "server", "start", "--host", p.host, "--port", str(ports["prefect"])],
            {**env, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{db}/prefect"},
            f"{prefect_url}/health",
            f"--port {ports['prefect']}",
            ports["prefect"],
            prefect_url,
            log,
            spawned,
        )
        cenv = {**env, "PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url}
        _prefect_setup(p, cenv, log)
        for i in range(1, p.workers + 1):
            name = f"worker-{i}"
            svc = state["services"].get(name)
            if svc and _alive(svc.get("pid"), svc.get("marker")):
                log(f"{name}: already running (pid {svc['pid']})")
                continue
            logf = sd / "logs" / f"{name}.log"
            offset = logf.stat().st_size if logf.is_file() else 0  # the log is appended to: read this start's lines
            wname = f"redistill-{name}"
            proc = spawned[name] = _spawn(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    p.work_pool,
                    "--type",
                    "process",
                    "--name",
                    wname,
                    "--limit",
                    str(p.runs_per_worker),
                ],
                logf,
                cenv,
                root,
            )
            state["services"][name] = {
                "pid": proc.pid,
                "marker": wname,
                "log": str(logf),
                "worker_name": wname,
                "log_offset": offset,
            }
            _save_state(root, state)
        _wait_workers(state, {k: v for k, v in spawned.items() if k.startswith("worker-")}, p, log)
        _dvc_remote(root, p, state, log)
    except BaseException:
        # by the handles this call holds, not by command line: a process just forked may not have exec'd yet
        running = [k for k, proc in spawned.items() if proc.poll() is None]
        if running or (not pg_before and _alive(_postmaster_pid(sd / "postgres"), "postgres")):
            log(f"stopping what this call started: {', '.join(sorted(running + ([] if pg_before else ['postgres'])))}")
        for k in sorted(running, key=lambda k: (not k.startswith("worker-"), k)):
            _stop_spawned(spawned[k])
            state["services"][k]["pid"] = None
        _save_state(root, state)
        if not pg_before:
            down(root, only={"postgres"}, log=log)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    state["env"] = client_env(state)
    _save_state(root, state)
    return state


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_spawned(proc: subprocess.Popen) -> None:
    """Stop a process this call started (its own process group), TERM then KILL; reap it."""
    stop_group(proc.pid)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait_workers(state: dict, spawned: dict, p, log, seconds: float = START_TIMEOUT_S) -> None:
    """Until every worker started by this call has said it polls the pool (in its log, after where this start
    began writing), or one exits."""
    deadline = time.time() + seconds
    workers = {k: state["services"][k] for k in spawned}
    waiting = set(workers)
    while waiting and time.time() < deadline:
        for k in list(waiting):
            v = workers[k]
            if spawned[k].poll() is not None:
                raise StackError(
                    f"{k} exited with {spawned[k].returncode} while starting; its log {v['log']} says:\n"
                    f"{_tail(Path(v['log']))}"
                )
            try:
                with open(v["log"], "rb") as f:
                    f.seek(v.get("log_offset", 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if "started!" in text or f"Worker '{v['worker_name']}'" in text:
                waiting.discard(k)
                log(f"{k}: polling work pool {p.work_pool} (pid {v['pid']})")
        time.sleep(0.5)
    if waiting:
        raise StackError(
            f"{', '.join(sorted(waiting))} did not start polling within {seconds:.0f} s; see "
            + ", ".join(workers[k]["log"] for k in sorted(waiting))
        )


def down(root: Path, only: set[str] | None = None, log=print) -> dict:
    """Stop the stack's processes (workers, then the servers, then PostgreSQL); the data stays."""
    root = Path(root).resolve()
    state = load_state(root)
    services = state.get("services", {})
    order = sorted([k for k in services if k.startswith("worker-")]) + ["prefect", "mlflow"]
    for name in order:
        if name not in services or (only is not None and name not in only):
            continue
        svc = services[name]
        if _alive(svc.get("pid"), svc.get("marker")):
            stop_group(svc["pid"], svc["marker"])
            log(f"{name}: stopped (pid {svc['pid']})")
        svc["pid"] = None
    if "postgres" in services and (only is None or "postgres" in only):
        data = stack_dir(root) / "postgres"
        pid = _postmaster_pid(data)
        if pid and _alive(pid, "postgres"):
            r = subprocess.run(
                [*_as_postgres(), pg_program("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode != 0 and _alive(pid, "postgres"):
                stop_group(pid, "postgres")
            log(f"postgres: stopped (pid {pid})")
        services["postgres"]["pid"] = None
    state.pop("env", None)
    if stack_dir(root).is_dir():
        _save_state(root, state)
    return state


def status(root: Path) -> dict:
    """Each service: running or not, its pid, port, URL, health and log; the client environment when all run."""
    root = Path(root).resolve()
    state = load_state(root)
    out = {"workspace": str(root), "services": {}, "dvc_remote": state.get("dvc_remote")}
    for name, svc in state.get("services", {}).items():
        pid = _postmaster_pid(stack_dir(root) / "postgres") if name == "postgres" else svc.get("pid")
        running = _alive(pid, svc.get("marker"))
        out["services"][name] = {
            "running": running,
            "pid": pid if running else None,
            "port": svc.get("port"),
            "url": svc.get("url"),
            "log": svc.get("log"),
            **({"healthy": _healthy(svc.get("health"))} if svc.get("health") else {}),
        }
    s = out["services"]
    out["up"] = bool(s) and all(v["running"] for v in s.values()) and all(v.get("healthy", True) for v in s.values())
    out["env"] = client_env(state) if out["up"] else {}
    return out
