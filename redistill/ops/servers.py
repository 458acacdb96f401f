"""What the stack stands on: its folder and state file (stack/stack.json, the database password), ports, and
starting, watching and stopping server processes, each in its own session and process group."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

STATE = "stack.json"
SECRETS = "secrets.json"
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------------


def stack_dir(root: Path) -> Path:
    return Path(root) / "stack"


def load_state(root: Path) -> dict:
    f = stack_dir(root) / STATE
    if not f.is_file():
        return {"services": {}, "ports": {}}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise StackError(f"{f} is not valid JSON ({e}); stop what it names by hand, then delete it") from e


def _save_state(root: Path, state: dict) -> None:
    f = stack_dir(root) / STATE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, f)


def _secret(root: Path) -> str:
    """The database password, generated once and kept in stack/secrets.json (0600)."""
    f = stack_dir(root) / SECRETS
    if f.is_file():
        return json.loads(f.read_text())["postgres_password"]
    pw = secrets.token_urlsafe(24)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"postgres_password": pw}, out)
    return pw


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now (the stack's servers; a distillation's rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on (host, port). SO_REUSEADDR, as the servers themselves bind: the connections a
    server that just stopped left in TIME_WAIT do not keep its port from the next `up`."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ports(root: Path, p, state: dict) -> dict[str, int]:
    """Each server's port: the setting, else the one an earlier `up` recorded (the client environment stays the
    same across restarts), else a free one."""
    out = {}
    for name in ("postgres", "mlflow", "prefect"):
        want = getattr(p, f"{name}_port")
        out[name] = want or state.get("ports", {}).get(name) or free_port(p.host)
    return out


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


def _alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether `pid` runs and (when given) its command line contains `marker`: a recycled pid is not ours."""
    from redistill.registry.client import pid_alive

    if not pid or not pid_alive(pid):
        return False
    if marker is None:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmd


def _healthy(url: str | None) -> bool:
    if not url:
        return False
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def _wait(url: str, proc: subprocess.Popen, name: str, log: Path, seconds: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode} while starting; its log {log} says:\n{_tail(log)}")
        if _healthy(url):
            return
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {seconds:.0f} s; its log {log} says:\n{_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
        )


def stop_group(pid: int, marker: str | None = None) -> None:
    """TERM the process group of `pid`, then KILL what is left after the grace period. `marker`: a recorded pid is
    signalled only if its command line still holds it (None: a process this call started and holds)."""
    if marker is not None and not _alive(pid, marker):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.3)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not _group_alive(pid):
            return
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies of the group do not count: a process whose state is Z is gone
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
