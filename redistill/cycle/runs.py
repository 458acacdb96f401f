"""The cycle's inputs and its idempotency key, resolved without Prefect so the cheap paths stay cheap.

The flow itself is `flows/cycle.py`; the CLI resolves the inputs here, returns an earlier decision for the
same key in seconds, and only otherwise starts the flow.
"""

from __future__ import annotations

from pathlib import Path

from redistill.config import Params
from redistill.data.base import DataError
from redistill.data.images import dir_md5
from redistill.data.validation import image_table, validation_basis
from redistill.models.pipelines import check_pipeline_folder, pipeline_sha256
from redistill.registry.lineage import code_version, idempotency_key

KEYED_SECTIONS = ["distill", "evaluate", "gate", "validate"]  # every section the cycle reads


def resolve_inputs(teacher: Path, data: Path, p: Params, root: Path, student: Path | None = None) -> dict:
    """Teacher sha256, data md5, the feature spaces' sha256, settings hash, code version and the key they make.

    `student` (trigger bootstrap): a student distilled elsewhere, which the cycle judges and registers instead of
    distilling one; its folder's sha256 is part of the key."""
    import hashlib
    import json

    from redistill.evaluation.spaces import sha256s

    check_pipeline_folder(teacher)
    if not Path(data).is_dir():
        raise DataError(f"data folder {data} does not exist; run `redistill prepare` or pass --data DIR")
    # the tolerant table, not load_image_folder: bad data must reach the validation step, which records
    # the failed run with its reasons, instead of stopping here unrecorded
    table = image_table(data)
    ok = table[table["readable"].astype(bool)]
    # the bands that validate the data: data/reference's, or for a grown representative set those of the
    # reference it grew from widened by its accepted batches (recorded in the set, so covered by data_md5)
    basis = validation_basis(data, Path(root) / "data" / "reference")
    code = code_version()
    inputs = {
        "teacher_uri": str(Path(teacher).resolve()),
        "teacher_sha256": pipeline_sha256(teacher),
        "data_uri": str(Path(data).resolve()),
        "data_md5": dir_md5(data),
        "params_sha256": p.sha256(KEYED_SECTIONS),
        # a retrained classifier or encoder measures in another space: its figures must not be reused
        "features_sha256": json.dumps(sha256s(p.evaluate.features, Path(root) / "data" / "features"), sort_keys=True),
        # another reference is another validation; validate_data refuses one that is not this md5
        "validation_reference_md5": basis["reference_md5"],
        "validation_bands": basis["bands_from"],
        "git_commit": code["git_commit"] + ("-dirty" if code["dirty"] else ""),
        "channels": int(ok["channels"].mode()[0]) if len(ok) else None,
        "size": [int(ok["height"].mode()[0]), int(ok["width"].mode()[0])] if len(ok) else None,
    }
    if student is not None:
        check_pipeline_folder(student)
        inputs["student_uri"], inputs["student_sha256"] = str(Path(student).resolve()), pipeline_sha256(student)
    features = hashlib.sha256(
        (
            inputs["features_sha256"]
            + "\n"
            + inputs["validation_reference_md5"]
            + (f"\nstudent {inputs['student_sha256']}" if student is not None else "")
        ).encode()
    ).hexdigest()
    inputs["key"] = idempotency_key(
        inputs["teacher_sha256"], inputs["data_md5"], inputs["params_sha256"], inputs["git_commit"], features
    )
    return inputs


def inputs_changed(inputs: dict) -> str | None:
    """Why the teacher or the data no longer hash as they did when the cycle resolved them, or None.

    A folder that changes while the cycle reads it would make the version's lineage lie (its recorded
    md5 would not be what it was trained and judged on), so the cycle checks again before registering."""
    data, teacher = Path(inputs["data_uri"]), Path(inputs["teacher_uri"])
    now = dir_md5(data) if data.is_dir() else "missing"
    if now != inputs["data_md5"]:
        return (
            f"the data folder {data} changed while the cycle read it (md5 {inputs['data_md5']} at the start, "
            f"{now} now); nothing was registered. Run the cycle again once the folder is complete"
        )
    sha = pipeline_sha256(teacher) if teacher.is_dir() else "missing"
    if sha != inputs["teacher_sha256"]:
        return (
            f"the teacher folder {teacher} changed while the cycle read it (sha256 {inputs['teacher_sha256'][:16]}… "
            f"at the start, {sha[:16]}… now); nothing was registered. Run the cycle again once it is complete"
        )
    return None


UNRECORDED = "unrecorded-failure.json"  # in the cycle's run folder: a failure the tracking server was away for


def servers_in_trouble(root: Path, prefect_api_url: str | None) -> dict[str, str]:
    """The servers a cycle depends on that are down or failing now: {"MLflow tracking server <uri>": "does not
    answer (…)", "Prefect API <url>": "answers HTTP 503"}; empty when all answer (or none is used)."""
    from redistill.registry.client import server_trouble, tracking_uri

    found = {}
    for label, url in (("MLflow tracking server", tracking_uri(root)), ("Prefect API", prefect_api_url or "")):
        trouble = server_trouble(url) if url else None
        if trouble:
            found[f"{label} {url}"] = trouble
    return found


def note_unrecorded_failure(run_dir: Path, run_id: str, stage: str, reason: str) -> None:
    """Keep a failure that could not be recorded in MLflow (its server was away) next to the cycle's files;
    `recover` records it on the run when the same inputs run again."""
    import json
    import os
    import time

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(run_dir) / f".{UNRECORDED}.{os.getpid()}"
    tmp.write_text(
        json.dumps(
            {
                "run_id": run_id,
                "stage": stage,
                "reason": reason[:4000],
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        + "\n"
    )
    os.replace(tmp, Path(run_dir) / UNRECORDED)  # whole or absent: `recover` may read it meanwhile


def stopped_by_servers(trouble: dict[str, str], stage: str, run_dir: Path, reason: str) -> str:
    """The one line a user gets when a server went away during the cycle: which, where, what is kept, what to do."""
    servers = "; ".join(f"the {what} {how}" for what, how in trouble.items())
    student = Path(run_dir) / "student"
    if (student / "redistill_distill.json").is_file():
        kept = (
            f"the distilled student is kept in {student}, so running the same command again once the server is "
            "back registers it without distilling again"
        )
    elif any((Path(run_dir) / "checkpoints").glob("*/meta.json")):
        kept = (
            f"the distillation's checkpoints are kept in {Path(run_dir) / 'checkpoints'}; running the same command "
            "again once the server is back resumes from the last one"
        )
    else:
        kept = "nothing was distilled; run the same command again once the server is back"
    registered = (
        "the registration may not have completed: the next run finishes it or registers afresh (one "
        "version per key), and only a passed gate moves the champion"
        if stage == "register"
        else "nothing was registered and the champion is untouched"
    )
    return (
        f"{servers} (during the {stage} stage, after the retries in registry.retry_delays_s): {registered}; "
        f"{kept}. The run is marked FAILED then. Cause: {reason[:300]}"
    )


def recover(c, name: str, experiment: str, key: str, root: Path | None = None) -> dict:
    """Undo what a killed cycle of `key` left half done, before anyone reads its decision: a failure that
    could not be recorded while a server was away is recorded on its run, a RUNNING MLflow run whose
    process died is closed as KILLED with the reason, and a passed version whose alias moves were cut short
    is promoted as its gate decided (never over a later champion). Cheap: a few registry queries."""
    from redistill.registry.client import close_orphan_runs, find_by_key, finish_promotion

    found = find_by_key(c, name, key)
    late = _record_late_failure(c, Path(root) / "runs" / "cycles" / key / UNRECORDED, found) if root else None
    exp = c.get_experiment_by_name(experiment)
    closed = close_orphan_runs(c, [exp.experiment_id], key, "a later run of the same inputs closed it") if exp else []
    finished = bool(found) and finish_promotion(c, name, found[0])
    return {
        "closed_runs": closed,
        "finished_promotion": str(found[0].version) if finished else None,
        "late_failure": late,
    }


def _record_late_failure(c, note: Path, versions: list) -> str | None:
    """Record the failure kept in `note` on its run (FINISHED instead when its version did get registered)."""
    import json

    if not note.is_file():
        return None
    from mlflow.exceptions import MlflowException

    try:
        rec = json.loads(note.read_text())
        run = c.get_run(rec["run_id"])
    except (ValueError, KeyError, TypeError):  # unreadable: nothing to close
        note.unlink(missing_ok=True)
        return None
    except MlflowException as e:  # a run this store does not have; any other store error: keep the note
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            note.unlink(missing_ok=True)
            return None
        raise
    if run.info.status == "RUNNING":
        if any(v.run_id == rec["run_id"] for v in versions):  # it registered before the server went away
            c.set_terminated(rec["run_id"], status="FINISHED")
        else:
            c.set_tag(rec["run_id"], "redistill.failed_stage", rec.get("stage", "cycle"))
            c.set_tag(
                rec["run_id"],
                "redistill.failure",
                f"{rec.get('reason', '')} (recorded late: a server was away when it failed at {rec.get('at')})"[:5000],
            )
            c.set_terminated(rec["run_id"], status="FAILED")
    note.unlink(missing_ok=True)
    return rec["run_id"]


def earlier_decision(c, name: str, key: str) -> dict | None:
    """The decision already registered for `key`, or None."""
    from redistill.registry.client import PREFIX, find_by_key

    found = find_by_key(c, name, key)
    if not found:
        return None
    mv = found[0]
    return {
        "key": key,
        "decision": "promoted" if mv.tags.get(PREFIX + "gate") == "passed" else "rejected",
        "version": str(mv.version),
        "run_id": mv.run_id,
        "reasons": mv.tags.get(PREFIX + "gate_reasons", ""),
        "deduplicated": True,
    }
