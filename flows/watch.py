"""The watch as a Prefect flow: new teachers and drifted batches start cycles, one at a time, never a storm.

Wiring only. The tasks observe (inspect teachers, test drift, re-check the champion), `redistill.watch.policy.plan`
decides, and this flow executes its actions; `locked_cycle` runs the cycle under the one-distillation slot with the
idempotency key checked again.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

import redistill.watch.policy as policy
from redistill.config import Params, load_params, workspace
from redistill.flows.cycle import CycleStopped, locked_cycle
from redistill.tasks.cycle import bounded_http, cycle_inputs
from redistill.tasks.events import emit
from redistill.tasks.watch import (
    DataError,
    champion_fit,
    drift_report_dir,
    drift_test,
    fetch_registered_teacher,
    inspect_teacher,
    known_teacher_shas,
    load_watch_state,
    log_watch_run,
    look_for_changes,
    save_watch_state,
    tag_version,
    update_representative,
    watch_data,
    watch_teacher,
)
from redistill.watch.policy import LOOKS


def _cycle(root: Path, p: Params, teacher: Path, data: Path, trigger: str, info: dict) -> dict:
    try:
        inputs = cycle_inputs(teacher, data, p, root)
    except DataError as e:  # e.g. a grown set whose record is damaged: said, not a crash of the whole look
        return {"decision": "stopped", "reasons": str(e), "key": None}
    try:
        r = locked_cycle(inputs, p, root, trigger, trigger_info=info)
    except CycleStopped as e:
        return {"decision": "stopped", "reasons": str(e), "key": inputs["key"]}
    return {k: r.get(k) for k in ("decision", "version", "key", "run_id", "reasons", "deduplicated")}


def _refuse_teacher(root: Path, p: Params, a: policy.RefuseTeacher) -> dict:
    rid = log_watch_run(
        root,
        p.registry.experiment,
        f"teacher-refused-{a.name}",
        {
            "redistill.kind": "teacher-check",
            "redistill.teacher_uri": a.path,
            "redistill.failed_stage": "teacher-watch",
            "redistill.failure": a.reason[:5000],
        },
        {},
        failed=True,
    )
    emit(
        "redistill.teacher.rejected",
        f"redistill.teacher.{a.name}",
        {"path": a.path, "reason": a.reason, "run_id": rid},
        a.name,
    )
    return {"teacher": a.name, "status": "refused", "reason": a.reason, "run_id": rid}


def _distil_teacher(root: Path, p: Params, state, a: policy.DistilTeacher, data: Path) -> dict:
    save_watch_state(root, state)
    emit(
        "redistill.teacher.new",
        f"redistill.teacher.{a.sha256[:16]}",
        {"path": a.path, "sha256": a.sha256, "params": a.params},
        a.name,
    )
    result = _cycle(
        root,
        p,
        Path(a.path),
        data,
        "teacher",
        {
            "teacher": a.name,
            "teacher_sha256": a.sha256,
            "event": "redistill.teacher.new",
            **({"teacher_registry": a.registry} if a.registry else {}),
        },
    )
    policy.teacher_distilled(state, a.name, result)
    return {"teacher": a.name, "status": "new", "sha256": a.sha256, "cycle": result}


def _refuse_batch(root: Path, p: Params, a: policy.RefuseBatch) -> dict:
    """A batch that cannot be read as images: recorded as bad, never acted on, skipped until its contents change."""
    rid = log_watch_run(
        root,
        p.registry.experiment,
        f"batch-refused-{a.name}",
        {
            "redistill.kind": "drift-check",
            "redistill.batch": a.name,
            "redistill.data_uri": a.path,
            "redistill.failed_stage": "batch-watch",
            "redistill.failure": a.reason[:5000],
        },
        {},
        failed=True,
    )
    emit(
        "redistill.batch.rejected",
        f"redistill.batch.{a.name}",
        {"path": a.path, "reason": a.reason, "run_id": rid},
        a.name,
    )
    return {
        "batch": a.name,
        "status": "refused",
        "drifted": None,
        "action": "refused",
        "reason": a.reason,
        "run_id": rid,
    }


def _record_drift(root: Path, p: Params, a: policy.RecordDrift) -> None:
    report = a.report
    log_watch_run(
        root,
        p.registry.experiment,
        f"drift-{a.name}",
        {
            "redistill.kind": "drift-check",
            "redistill.batch": a.name,
            "redistill.drifted": str(report["drifted"]).lower(),
            "redistill.drift_reasons": "; ".join(report["reasons"])[:5000] or "none",
        },
        {
            "mmd2": report["mmd2"],
            "mmd_p": report["mmd_p"],
            **(
                {"text_mmd2": report["text_mmd2"], "text_mmd_p": report["text_mmd_p"]}
                if report.get("text_mmd_p") is not None
                else {}
            ),
            **{f"ks_p_holm.{k}": v["p_holm"] for k, v in report["ks"].items()},
        },
        folder=Path(report["report_dir"]),
    )


def _keep_champion(root: Path, p: Params, a: policy.KeepChampion) -> dict:
    fit, batch = a.fit, a.batch
    rid = log_watch_run(
        root,
        p.registry.experiment,
        f"champion-still-fit-{batch}",
        {
            "redistill.kind": "fit-check",
            "redistill.trigger": "drift",
            "redistill.decision": "champion_still_fit",
            "redistill.batch": batch,
            "redistill.champion_version": fit["version"],
            "redistill.gate_reasons": fit["reasons"],
        },
        {"fid_ratio": fit["fid_ratio"]} if fit["fid_ratio"] is not None else {},
        folder=Path(fit["run_dir"]),
    )
    tag_version(
        root, p.registry.student_name, fit["version"], {"redistill.still_fit": f"batch {batch}, MLflow run {rid}"}
    )
    emit(
        "redistill.champion.still-fit",
        f"redistill.model.{p.registry.student_name}",
        {"version": fit["version"], "batch": batch, "run_id": rid, "reasons": fit["reasons"]},
        p.registry.student_name,
    )
    get_run_logger().info(f"drift in {batch}: champion v{fit['version']} still fit ({fit['reasons']})")
    return {"decision": "champion still fit", "version": fit["version"], "run_id": rid, "reasons": fit["reasons"]}


def _redistill(root: Path, p: Params, state, a: policy.Redistill, path: Path) -> dict:
    get_run_logger().info(f"drift in {a.batch}: {a.why}; re-distilling on the representative set grown by {a.batch}")
    try:
        grown = update_representative(root, watch_data(root), path, a.batch)
    except DataError as e:  # e.g. a representative set with no record of what it grew from: said, never grown
        policy.redistill_stopped(state, str(e))
        return {"decision": "stopped", "reasons": str(e), "why": a.why}
    report = a.report
    info = {
        "batch": a.batch,
        "batch_path": str(path),
        "drift_reasons": report["reasons"],
        "mmd_p": report["mmd_p"],
        "fit_check": a.why,
        "data_md5": grown["md5"],
        "dvc_file": grown.get("dvc_file"),
        "report_dir": report["report_dir"],
    }
    result = _cycle(root, p, watch_teacher(root, p.teacher.name, state), Path(grown["path"]), "drift", info)
    policy.redistilled(state, grown["path"], result, time.time())
    return {**result, "data_md5": grown["md5"], "why": a.why}


def _act_on_drift(root: Path, p: Params, state, a: policy.CheckChampion) -> dict:
    """A new drift episode: the champion first; re-distil on the grown representative set only if it fails."""
    path = Path(a.path) if a.path else root / "data" / "incoming" / a.batch
    fit = champion_fit(root, p, path, root / "runs" / "watch" / "fit" / a.batch)
    (then,) = policy.plan(state, policy.ChampionChecked(a.batch, a.path, a.report, fit))
    if isinstance(then, policy.KeepChampion):
        return _keep_champion(root, p, then)
    return _redistill(root, p, state, then, path)


@flow(name="redistill-watch")
def watch(workspace_dir: str | None = None, params_file: str | None = None, look: list[str] | None = None) -> dict:
    """One look: refuse broken teachers, cycle on the newest new teacher, test new batches for drift (`look`: only
    "teachers" or only "batches"; default both)."""
    root = workspace(workspace_dir)
    p = load_params(params_file, root)
    bounded_http(p)  # as the CLI does: bounded MLflow retries
    state = load_watch_state(root)
    look = tuple(look or LOOKS)
    found = look_for_changes(root, p.watch.settle_seconds, state, look)
    out = {"teachers": [], "batches": [], "pending": [f.to_dict() for f in found.pending]}

    # 0. A teacher registered in MLflow (watch.teacher_model@teacher_alias), fetched into data/teachers/.
    teachers = [f for f in found.actionable if f.kind == "teacher"]
    if p.watch.teacher_model and "teachers" in look:
        model = p.watch.teacher_model
        got = fetch_registered_teacher(root, model, p.watch.teacher_alias, state.registry_teachers.get(model))
        teachers = policy.teacher_findings(state, teachers, model, got, time.time())

    # 1. Teachers: integrity first; the newest genuinely new one triggers one cycle.
    known = set(known_teacher_shas(root, p.registry.student_name))
    data = watch_data(root)
    facts = {f.name: inspect_teacher(Path(f.path), data, p.distill.method) for f in teachers if f.status != "bad"}
    for a in policy.plan(state, policy.TeachersInspected(teachers, facts, known, time.time())):
        if isinstance(a, policy.RefuseTeacher):
            out["teachers"].append(_refuse_teacher(root, p, a))
        elif isinstance(a, policy.Report):
            out["teachers"].append(a.entry)
        else:
            out["teachers"].append(_distil_teacher(root, p, state, a, data))
    save_watch_state(root, state)

    # 2. Batches, in arrival order: drift test, episode bookkeeping, then at most one action per episode.
    for f in (f for f in found.ready if f.kind == "batch"):
        teacher = watch_teacher(root, p.teacher.name, state) if p.drift.text_features == "teacher" else None
        report = drift_test(
            Path(f.path),
            watch_data(root),
            root / "data" / "features",
            p.drift,
            root / "runs" / "watch" / "drift" / f"{f.name}-{f.signature[:8]}",
            teacher,
        )
        tested = policy.BatchTested(f, report, time.time(), p.drift.clear_batches, p.drift.cooldown_hours)
        outcome = None
        for a in policy.plan(state, tested):
            if isinstance(a, policy.RefuseBatch):
                out["batches"].append(_refuse_batch(root, p, a))
            elif isinstance(a, policy.RecordDrift):
                _record_drift(root, p, a)
            elif isinstance(a, policy.EmitDrift):
                emit(
                    "redistill.drift.detected",
                    f"redistill.batch.{a.name}",
                    {"batch": a.name, "reasons": a.reasons, "mmd_p": a.mmd_p, "action": a.action},
                    a.name,
                )
            elif isinstance(a, policy.CheckChampion):
                outcome = _act_on_drift(root, p, state, a)
            else:  # SaveBatch: the batch's record, with the outcome of its action
                out["batches"].append(policy.batch_done(state, a, outcome))
        save_watch_state(root, state)

    # 3. A drift episode deferred by the cooldown acts once the cooldown is over.
    for a in policy.plan(state, policy.CooldownChecked(time.time(), p.drift.cooldown_hours, look)):
        a.report["report_dir"] = drift_report_dir(root, a.batch)
        out["deferred"] = _act_on_drift(root, p, state, a)
        save_watch_state(root, state)
    return out
