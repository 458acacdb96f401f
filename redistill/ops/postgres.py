"""The stack's PostgreSQL: the machine's own server programs running a cluster under <workspace>/stack/postgres,
as the `postgres` user when we are root, with the databases the MLflow and Prefect servers use."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from redistill.ops.servers import StackError, _alive, _port_free, _save_state, _tail, stack_dir

DB_USER = "redistill"


def pg_program(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    for d in reversed(versions):
        if (d / name).is_file():
            return str(d / name)
    raise StackError(
        f"PostgreSQL's server program {name} is not installed: install the server (Debian: apt-get install "
        "postgresql; .ci/run does), then run redistill stack up again"
    )


def _as_postgres() -> list[str]:
    """The prefix that runs a PostgreSQL program as the `postgres` user when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: install "
            "Debian's postgresql package (it creates the user), or run redistill stack as another user"
        ) from None
    return ["runuser", "-u", "postgres", "--"]


def _check_reachable_by_postgres(folder: Path) -> None:
    """As root, the `postgres` user must be able to enter every folder above the cluster's."""
    if os.geteuid() != 0:
        return
    import pwd

    uid = pwd.getpwnam("postgres").pw_uid
    for d in [folder, *folder.parents]:
        if not d.exists():
            continue
        st = d.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise StackError(
                f"PostgreSQL runs as the postgres user (it refuses root), who cannot enter {d} (mode "
                f"{oct(st.st_mode & 0o777)}); make it traversable (chmod o+x {d}) or put the workspace "
                "under a folder others can enter"
            )


def _psql(port: int, host: str, password: str, sql: str, db: str = "postgres") -> str:
    r = subprocess.run(
        ["psql", "-h", host, "-p", str(port), "-U", DB_USER, "-d", db, "-tAc", sql],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise StackError(f"psql on {host}:{port} failed: {r.stderr.strip()[:400]}")
    return r.stdout.strip()


def _start_postgres(root: Path, p, port: int, password: str, state: dict, log) -> None:
    sd = stack_dir(root)
    data = sd / "postgres"
    logf = sd / "logs" / "postgres.log"
    prefix = _as_postgres()
    _check_reachable_by_postgres(sd)
    if prefix:
        shutil.chown(sd / "logs", "postgres")
    if not (data / "PG_VERSION").is_file():
        log(f"PostgreSQL: a new cluster in {data}")
        data.mkdir(parents=True, exist_ok=True)
        pwfile = data.parent / ".pgpw"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if prefix:
            shutil.chown(data, "postgres")
            shutil.chown(pwfile, "postgres")
        try:
            r = subprocess.run(
                [
                    *prefix,
                    pg_program("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    DB_USER,
                    "-E",
                    "UTF8",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise StackError(f"initdb failed: {(r.stderr or r.stdout).strip()[-600:]}")
    sock = sd / "postgres-socket"
    sock.mkdir(exist_ok=True)
    if prefix:
        shutil.chown(sock, "postgres")
    pid = _postmaster_pid(data)
    if pid and _alive(pid, "postgres"):
        log(f"PostgreSQL: already running (pid {pid})")
    else:
        if not _port_free(p.host, port):
            raise StackError(
                f"port {port} on {p.host} is taken: PostgreSQL cannot listen there; set stack.postgres_port "
                "to a free port (or 0)"
            )
        r = subprocess.run(
            [
                *prefix,
                pg_program("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(logf),
                "-w",
                "-t",
                "120",
                "-o",
                f"-c listen_addresses={p.host} -p {port} -k {sock}",
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
        )
        if r.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-400:]}; its log {logf} says:\n"
                f"{_tail(logf)}"
            )
        pid = _postmaster_pid(data)
    state["services"]["postgres"] = {
        "pid": pid,
        "port": port,
        "marker": "postgres",
        "log": str(logf),
        "url": f"postgresql://{DB_USER}@{p.host}:{port}",
    }
    _save_state(root, state)
    for db in ("mlflow", "prefect"):
        if _psql(port, p.host, password, f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            _psql(port, p.host, password, f"CREATE DATABASE {db}")


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
