"""The cycle's inputs and its idempotency key, resolved without Prefect so the cheap paths stay cheap.

The flow itself is `flows/cycle.py`; the CLI resolves the inputs here, returns an earlier decision for the
same key in seconds, and only otherwise starts the flow.
"""

from __future__ import annotations

from pathlib import Path

from redistill.config import Params
from redistill.data import DataError, dir_md5
from redistill.lineage import code_version, idempotency_key
from redistill.teacher import check_pipeline_folder, pipeline_sha256
from redistill.validation import image_table, validation_basis

KEYED_SECTIONS = ["distill", "evaluate", "gate", "validate"]  # every section the cycle reads


def resolve_inputs(teacher: Path, data: Path, p: Params, root: Path) -> dict:
    """Teacher sha256, data md5, the feature spaces' sha256, settings hash, code version and the key they make."""
    import hashlib
    import json

    from redistill.feature_spaces import sha256s

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
    features = hashlib.sha256((inputs["features_sha256"] + "\n" + inputs["validation_reference_md5"]).encode()).hexdigest()
    inputs["key"] = idempotency_key(inputs["teacher_sha256"], inputs["data_md5"], inputs["params_sha256"],
                                    inputs["git_commit"], features)
    return inputs


def inputs_changed(inputs: dict) -> str | None:
    """Why the teacher or the data no longer hash as they did when the cycle resolved them, or None.

    A folder that changes while the cycle reads it would make the version's lineage lie (its recorded
    md5 would not be what it was trained and judged on), so the cycle checks again before registering."""
    data, teacher = Path(inputs["data_uri"]), Path(inputs["teacher_uri"])
    now = dir_md5(data) if data.is_dir() else "missing"
    if now != inputs["data_md5"]:
        return (f"the data folder {data} changed while the cycle read it (md5 {inputs['data_md5']} at the start, "
                f"{now} now); nothing was registered. Run the cycle again once the folder is complete")
    sha = pipeline_sha256(teacher) if teacher.is_dir() else "missing"
    if sha != inputs["teacher_sha256"]:
        return (f"the teacher folder {teacher} changed while the cycle read it (sha256 {inputs['teacher_sha256'][:16]}… "
                f"at the start, {sha[:16]}… now); nothing was registered. Run the cycle again once it is complete")
    return None


def recover(c, name: str, experiment: str, key: str) -> dict:
    """Undo what a killed cycle of `key` left half done, before anyone reads its decision: its RUNNING
    MLflow run is closed as KILLED with the reason, and a passed version whose alias moves were cut short
    is promoted as its gate decided (never over a later champion). Cheap: two registry queries."""
    from redistill.registry import close_orphan_runs, find_by_key, finish_promotion

    exp = c.get_experiment_by_name(experiment)
    closed = close_orphan_runs(c, [exp.experiment_id], key, "a later run of the same inputs closed it") if exp else []
    found = find_by_key(c, name, key)
    finished = bool(found) and finish_promotion(c, name, found[0])
    return {"closed_runs": closed, "finished_promotion": str(found[0].version) if finished else None}


def earlier_decision(c, name: str, key: str) -> dict | None:
    """The decision already registered for `key`, or None."""
    from redistill.registry import PREFIX, find_by_key

    found = find_by_key(c, name, key)
    if not found:
        return None
    mv = found[0]
    return {"key": key, "decision": "promoted" if mv.tags.get(PREFIX + "gate") == "passed" else "rejected",
            "version": str(mv.version), "run_id": mv.run_id, "reasons": mv.tags.get(PREFIX + "gate_reasons", ""),
            "deduplicated": True}
