"""The MLflow model-registry contract (../shared/DESIGN.md), in one place.

- One registered model per student line (`registry.student_name`, e.g. `digits-student`).
- Every version carries all the `redistill.*` tags in `REQUIRED_TAGS`; a version without them is never
  created.
- Aliases `champion` and `previous`. Only a version whose gate `passed` may be promoted: `previous` moves
  to the old champion first, then `champion` to the new version, so a crash between the two moves leaves
  `champion` where it was. A rejected version is registered with its reasons and moves no alias.
"""

from __future__ import annotations

from dataclasses import dataclass

from redistill.core.failpoints import failpoint

PREFIX = "redistill."
CHAMPION, PREVIOUS = "champion", "previous"
REQUIRED_TAGS = (
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
)


class RegistryError(RuntimeError):
    """A registry request that would break the contract; nothing was changed."""


@dataclass
class Registered:
    """What `register_student` did."""

    version: str  # as a string, whatever type the MLflow client returns
    promoted: bool
    replaced: str | None  # the champion it replaced, when promoted


def tracking_uri(root) -> str:
    """MLFLOW_TRACKING_URI when set, else the workspace's SQLite store (`<root>/mlflow.db`)."""
    import os
    from pathlib import Path

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root) / 'mlflow.db'}"


def configure_http(retries: int, timeout_s: int) -> None:
    """Bound how long one MLflow request may take against a server that went away: `retries` retries with
    back-off (1 s, 2 s, 4 s, … plus jitter) and `timeout_s` per answer. MLflow's defaults (7 retries, back-off
    factor 2, 120 s) can hang a cycle for minutes per request. Variables the user set are left alone."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


def server_trouble(url: str, timeout_s: float = 5.0) -> str | None:
    """What is wrong with the HTTP server behind `url` (an MLflow tracking server or a Prefect API), from one
    request to its health endpoint: "does not answer (…)" or "answers 503", or None when it is healthy
    or `url` is not a server (a SQLite store)."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError as e:
        return f"answers HTTP {e.code}" if e.code >= 500 else None
    except (OSError, ValueError) as e:  # refused, timed out, reset, unresolvable
        return f"does not answer ({type(e).__name__}: {getattr(e, 'reason', e)})"


_READY: set[str] = set()  # SQLite stores this process has opened (their schema is in place)


def client(tracking_uri: str | None = None):
    """An MlflowClient. The first time a process opens a SQLite store, it does so under a file lock next to
    the database: MLflow creates and migrates the schema on first open, and processes that open a new store
    together otherwise race through the migrations ("Online migration expected to match one row …")."""
    from mlflow import MlflowClient

    uri = tracking_uri or ""
    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri)
    from pathlib import Path

    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):  # the tracking and the registry store each check the schema on first open
        c = MlflowClient(tracking_uri)
        c.search_experiments(max_results=1)
        c.search_registered_models(max_results=1)
    _READY.add(uri)
    return c


def champion(c, name: str):
    """The version behind alias `champion`, or None (also when the model is not registered yet)."""
    return alias(c, name, CHAMPION)


def alias(c, name: str, which: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, which)
    except MlflowException as e:  # no such model, or no such alias; a store that fails is not "no champion"
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def find_by_key(c, name: str, key: str) -> list:
    """Versions registered for an idempotency key, newest first."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}' and tags.`{PREFIX}key`='{key}'")
    except MlflowException as e:  # only "no such model" means none; a failing store must not read as "none"
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return []
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def register_student(
    c, name: str, run_id: str, artifact_path: str, tags: dict[str, str], promote: bool, model_id: str | None = None
) -> Registered:
    """Register the student logged at `runs:/<run_id>/<artifact_path>`, or the logged model `model_id` (the version
    is then created from it: source `models:/<model_id>`, as `mlflow.register_model` does), with its tags; promote if
    asked.

    `tags` are given without the prefix. Raises RegistryError, changing nothing, when a required tag is
    missing or when promotion is asked for a version whose gate did not pass.
    """
    from mlflow.exceptions import MlflowException

    missing = [t for t in REQUIRED_TAGS if t not in tags]
    if missing:
        raise RegistryError(f"cannot register {name}: missing tag(s) {', '.join(PREFIX + m for m in missing)}")
    if tags["gate"] not in ("passed", "rejected"):
        raise RegistryError(f"tag {PREFIX}gate must be 'passed' or 'rejected', got {tags['gate']!r}")
    if promote and tags["gate"] != "passed":
        raise RegistryError("only a version whose gate passed may become champion")
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    # a retried registration (its first answer was lost to a timeout or a dropped connection) must not
    # register the run twice: a version of this run means the first try got through
    mine = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if mine:
        mv = max(mine, key=lambda v: int(v.version))
    elif model_id is not None:
        from redistill.registry.mlflow_lineage import default_store

        with default_store(c):  # MLflow's SQL registry looks the logged model up with a default client
            mv = c.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=run_id,
                model_id=model_id,
                tags={PREFIX + k: str(v) for k, v in tags.items()},
            )
        link_versions(c, model_id, name, str(mv.version))
    else:
        source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = c.create_model_version(
            name, source=source, run_id=run_id, tags={PREFIX + k: str(v) for k, v in tags.items()}
        )
    failpoint("version-created")
    if not promote:
        return Registered(str(mv.version), False, None)
    old = _promote(c, name, str(mv.version))
    return Registered(str(mv.version), True, old)


def link_versions(c, model_id: str, name: str, version: str) -> None:
    """Tag the logged model with its registered versions (`mlflow.modelVersions`), as `mlflow.register_model` does:
    the UI's logged-model page lists them from it."""
    import json

    known = json.loads(c.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
    if {"name": name, "version": version} not in known:
        c.set_logged_model_tags(
            model_id, {"mlflow.modelVersions": json.dumps(known + [{"name": name, "version": version}])}
        )


def _promote(c, name: str, version: str) -> str | None:
    """Move `previous` to the champion, then `champion` to `version`, then mark the promotion done (tag
    `promoted`). A crash between the moves leaves `champion` where it was; `finish_promotion` completes it."""
    old = champion(c, name)
    if old is not None and str(old.version) != version:
        c.set_registered_model_alias(name, PREVIOUS, old.version)
        c.set_model_version_tag(name, version, PREFIX + "replaced", str(old.version))
        failpoint("previous-moved")
    c.set_registered_model_alias(name, CHAMPION, version)
    failpoint("champion-moved")
    c.set_model_version_tag(name, version, PREFIX + "promoted", "done")
    return str(old.version) if old is not None and str(old.version) != version else None


def finish_promotion(c, name: str, mv) -> bool:
    """Complete the promotion of a version whose gate passed but whose cycle died before its alias moves
    were marked done (kill -9 between registering and promoting). Only while no later version became
    champion: a newer champion is never displaced. True when it moved or marked anything."""
    if mv.tags.get(PREFIX + "gate") != "passed" or mv.tags.get(PREFIX + "promoted") == "done":
        return False
    if PREFIX + "rollback" in mv.tags:  # rolled back from, on purpose
        return False
    current, prev = champion(c, name), alias(c, name, PREVIOUS)
    if current is not None and int(current.version) > int(mv.version):
        return False
    if prev is not None and str(prev.version) == str(mv.version):  # it was champion, then rolled back from
        return False
    _promote(c, name, str(mv.version))  # from wherever it stopped: each move is idempotent
    return True


def close_orphan_runs(c, experiment_ids: list[str], key: str, note: str) -> list[str]:
    """Mark the RUNNING runs of cycle `key` whose process is gone (same host, pid no longer alive) as KILLED,
    with the reason in `redistill.failure`. Runs of live processes, or of other hosts, are left alone."""
    import socket

    closed = []
    for run in c.search_runs(experiment_ids, f"tags.`{PREFIX}key` = '{key}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(PREFIX + "host") != socket.gethostname() or pid_alive(int(tags.get(PREFIX + "pid", "0") or 0)):
            continue
        c.set_tag(run.info.run_id, PREFIX + "failed_stage", "killed")
        c.set_tag(
            run.info.run_id,
            PREFIX + "failure",
            f"the process running this cycle (pid {tags.get(PREFIX + 'pid')}) died before it finished; {note}",
        )
        c.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie has exited)."""
    import os

    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def rollback(c, name: str, to: str | None, who: str, why: str) -> dict:
    """Move `champion` to `previous` (or to version `to`) and `previous` to the old champion.

    Only a version whose gate passed may become champion. `previous` moves first, so a crash between the
    two moves leaves `champion` where it was. Rolling back twice returns to where it started. Returns what
    was done; the caller records it as a run. Raises RegistryError, changing nothing, when refused.
    """
    import json
    import time

    from mlflow.exceptions import MlflowException

    current = champion(c, name)
    if current is None:
        raise RegistryError(f"{name} has no champion, so there is nothing to roll back")
    if to is None:
        target = alias(c, name, PREVIOUS)
        if target is None:
            raise RegistryError(f"{name} has no `previous` version to roll back to; pass --to N")
    else:
        try:
            target = c.get_model_version(name, str(to))
        except MlflowException:
            raise RegistryError(f"{name} has no version {to}; `redistill status` lists them") from None
    if str(target.version) == str(current.version):
        raise RegistryError(f"version {target.version} is already the champion of {name}")
    if target.tags.get(PREFIX + "gate") != "passed":
        reasons = target.tags.get(PREFIX + "gate_reasons", "")[:300]
        raise RegistryError(
            f"version {target.version} did not pass its gate ({target.tags.get(PREFIX + 'gate')}: "
            f"{reasons}); only a version that passed may become champion"
        )
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": who,
        "reason": why,
        "from": str(current.version),
        "to": str(target.version),
    }
    c.set_registered_model_alias(name, PREVIOUS, current.version)
    c.set_registered_model_alias(name, CHAMPION, target.version)
    c.set_model_version_tag(name, target.version, PREFIX + "rollback", json.dumps(record))
    return record
