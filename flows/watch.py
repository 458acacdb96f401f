"""The watch as a Prefect flow: new teachers and drifted batches start cycles, one at a time, never a storm.

Wiring only. `redistill.watch` finds what changed (cheaply) and keeps the episode bookkeeping; the tasks
check teachers, test drift, re-check the champion and grow the representative set; `locked_cycle` runs
the cycle under the one-distillation slot with the idempotency key checked again.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from redistill.flows.cycle import CycleStopped, locked_cycle
from redistill.tasks.events import emit
from redistill.tasks.watch import (
    champion_fit,
    drift_test,
    fetch_registered_teacher,
    inspect_teacher,
    known_teacher_shas,
    log_watch_run,
    tag_version,
    update_representative,
)

from redistill.config import Params, load_params, workspace
from redistill.registry.client import configure_http
from redistill.data.images import DataError
from redistill.watch.policy import (
    current_data,
    current_teacher,
    due_episode,
    load_state,
    Finding,
    note,
    LOOKS,
    on_batch,
    save_state,
    scan,
    signature,
)


def _cycle(root: Path, p: Params, teacher: Path, data: Path, trigger: str, info: dict) -> dict:
    from redistill.cycle.runs import resolve_inputs

    try:
        inputs = resolve_inputs(teacher, data, p, root)
    except DataError as e:  # e.g. a grown set whose record is damaged: said, not a crash of the whole look
        return {"decision": "stopped", "reasons": str(e), "key": None}
    try:
        r = locked_cycle(inputs, p, root, trigger, trigger_info=info)
    except CycleStopped as e:
        return {"decision": "stopped", "reasons": str(e), "key": inputs["key"]}
    return {k: r.get(k) for k in ("decision", "version", "key", "run_id", "reasons", "deduplicated")}


def _refuse_teacher(root: Path, p: Params, state: dict, name: str, path: str, sig: str, reason: str) -> dict:
    state["teachers"][name] = {"signature": sig, "status": "bad", "reason": reason, "at": time.time()}
    note(state, "teacher-refused", teacher=name, reason=reason)
    rid = log_watch_run(root, p.registry.experiment, f"teacher-refused-{name}",
                        {"redistill.kind": "teacher-check", "redistill.teacher_uri": path,
                         "redistill.failed_stage": "teacher-watch", "redistill.failure": reason[:5000]}, {},
                        failed=True)
    emit("redistill.teacher.rejected", f"redistill.teacher.{name}", {"path": path, "reason": reason, "run_id": rid}, name)
    return {"teacher": name, "status": "refused", "reason": reason, "run_id": rid}


def _refuse_batch(root: Path, p: Params, state: dict, name: str, path: str, sig: str, reason: str) -> dict:
    """A batch that cannot be read as images like the representative set: recorded as bad, never acted on.

    It is not drift (nothing about the data's distribution was measured), so it opens no episode and never
    grows the representative set; it is skipped until its contents change, like a broken teacher."""
    state["batches"][name] = {"signature": sig, "status": "bad", "reason": reason, "at": time.time()}
    note(state, "batch-refused", batch=name, reason=reason)
    rid = log_watch_run(root, p.registry.experiment, f"batch-refused-{name}",
                        {"redistill.kind": "drift-check", "redistill.batch": name, "redistill.data_uri": path,
                         "redistill.failed_stage": "batch-watch", "redistill.failure": reason[:5000]}, {},
                        failed=True)
    emit("redistill.batch.rejected", f"redistill.batch.{name}", {"path": path, "reason": reason, "run_id": rid}, name)
    return {"batch": name, "status": "refused", "drifted": None, "action": "refused", "reason": reason, "run_id": rid}


def _handle_drift(root: Path, p: Params, state: dict, batch: str, path: Path, report: dict) -> dict:
    """A new drift episode: the champion first; re-distil on the grown representative set only if it fails."""
    log = get_run_logger()
    ep = state["episode"]
    fit = champion_fit(root, p, path, root / "runs" / "watch" / "fit" / batch)
    if fit is not None and fit["passed"]:
        rid = log_watch_run(root, p.registry.experiment, f"champion-still-fit-{batch}",
                            {"redistill.kind": "fit-check", "redistill.trigger": "drift",
                             "redistill.decision": "champion_still_fit", "redistill.batch": batch,
                             "redistill.champion_version": fit["version"], "redistill.gate_reasons": fit["reasons"]},
                            {"fid_ratio": fit["fid_ratio"]} if fit["fid_ratio"] is not None else {},
                            folder=Path(fit["run_dir"]))
        tag_version(root, p.registry.student_name, fit["version"],
                    {"redistill.still_fit": f"batch {batch}, MLflow run {rid}"})
        emit("redistill.champion.still-fit", f"redistill.model.{p.registry.student_name}",
             {"version": fit["version"], "batch": batch, "run_id": rid, "reasons": fit["reasons"]},
             p.registry.student_name)
        ep["action"] = "champion still fit"
        log.info(f"drift in {batch}: champion v{fit['version']} still fit ({fit['reasons']})")
        return {"decision": "champion still fit", "version": fit["version"], "run_id": rid, "reasons": fit["reasons"]}
    why = "no champion yet" if fit is None else f"champion v{fit['version']} no longer fit: {fit['reasons']}"
    log.info(f"drift in {batch}: {why}; re-distilling on the representative set grown by {batch}")
    try:
        grown = update_representative(root, current_data(root), path, batch)
    except DataError as e:  # e.g. a representative set with no record of what it grew from: said, never grown
        ep["action"] = f"stopped: {e}"
        return {"decision": "stopped", "reasons": str(e), "why": why}
    info = {"batch": batch, "batch_path": str(path), "drift_reasons": report["reasons"], "mmd_p": report["mmd_p"], "fit_check": why,
            "data_md5": grown["md5"], "dvc_file": grown.get("dvc_file"), "report_dir": report["report_dir"]}
    result = _cycle(root, p, current_teacher(root, p.teacher.name, state), Path(grown["path"]), "drift", info)
    state["last_redistill_at"] = time.time()
    state["current_data"] = grown["path"]
    ep["action"] = f"re-distilled: {result['decision']}"
    return {**result, "data_md5": grown["md5"], "why": why}


@flow(name="redistill-watch")
def watch(workspace_dir: str | None = None, params_file: str | None = None, look: list[str] | None = None) -> dict:
    """One look: refuse broken teachers, cycle on the newest new teacher, test new batches for drift (`look`: only
    "teachers" or only "batches"; default both)."""
    root = workspace(workspace_dir)
    p = load_params(params_file, root)
    configure_http(p.registry.http_retries, p.registry.http_timeout_s)  # as the CLI does: bounded MLflow retries
    state = load_state(root)
    look = tuple(look or LOOKS)
    found = scan(root, p.watch.settle_seconds, state, look=look)
    out = {"teachers": [], "batches": [], "pending": [f.to_dict() for f in found.pending]}

    # 0. A teacher registered in MLflow (watch.teacher_model@teacher_alias), fetched into data/teachers/.
    teacher_findings = [f for f in found.actionable if f.kind == "teacher"]
    if p.watch.teacher_model and "teachers" in look:
        model = p.watch.teacher_model
        got = fetch_registered_teacher(root, model, p.watch.teacher_alias, state["registry_teachers"].get(model))
        if got is not None:
            state["registry_teachers"][model] = got["version"]
            note(state, "registered-teacher", model=model, version=got["version"], path=got["path"])
            if not any(f.name == got["name"] for f in teacher_findings):
                # written whole by the download, so it need not settle
                teacher_findings.append(Finding("teacher", got["name"], got["path"], "ready", signature(Path(got["path"]))[0],
                                                f"registered {model} v{got['version']}"))

    # 1. Teachers: integrity first; the newest genuinely new one triggers one cycle.
    known = set(known_teacher_shas(root, p.registry.student_name))
    known |= {t["sha256"] for t in state["teachers"].values() if t.get("sha256")}
    data = current_data(root)
    new = []
    for f in teacher_findings:
        if f.status == "bad":
            out["teachers"].append(_refuse_teacher(root, p, state, f.name, f.path, f.signature, f.reason))
            continue
        facts = inspect_teacher(Path(f.path), data, p.distill.method)
        if not facts["ok"]:
            out["teachers"].append(_refuse_teacher(root, p, state, f.name, f.path, f.signature, facts["error"]))
        elif facts["sha256"] in known:
            state["teachers"][f.name] = {"signature": f.signature, "sha256": facts["sha256"], "status": "known"}
            out["teachers"].append({"teacher": f.name, "status": "known", "sha256": facts["sha256"]})
        else:
            known.add(facts["sha256"])
            new.append((f, facts))
    for f, facts in new[:-1]:  # several new teachers in one look: only the newest is distilled
        state["teachers"][f.name] = {"signature": f.signature, "sha256": facts["sha256"], "status": "superseded"}
        out["teachers"].append({"teacher": f.name, "status": "superseded", "sha256": facts["sha256"]})
    if new:
        f, facts = new[-1]
        reg = f.reason.removeprefix("registered ") if f.reason.startswith("registered ") else None
        state["teachers"][f.name] = {"signature": f.signature, "sha256": facts["sha256"], "status": "accepted",
                                     "at": time.time(), "registry": reg}
        state["current_teacher"] = f.path
        note(state, "teacher-new", teacher=f.name, sha256=facts["sha256"])
        save_state(root, state)
        emit("redistill.teacher.new", f"redistill.teacher.{facts['sha256'][:16]}",
             {"path": f.path, "sha256": facts["sha256"], "params": facts.get("params")}, f.name)
        result = _cycle(root, p, Path(f.path), data, "teacher",
                        {"teacher": f.name, "teacher_sha256": facts["sha256"], "event": "redistill.teacher.new",
                         **({"teacher_registry": reg} if reg else {})})
        state["teachers"][f.name]["decision"] = result
        out["teachers"].append({"teacher": f.name, "status": "new", "sha256": facts["sha256"], "cycle": result})
    save_state(root, state)

    # 2. Batches, in arrival order: drift test, episode bookkeeping, then at most one action per episode.
    for f in (f for f in found.ready if f.kind == "batch"):
        report = drift_test(Path(f.path), current_data(root), root / "data" / "features", p.drift,
                            root / "runs" / "watch" / "drift" / f"{f.name}-{f.signature[:8]}",
                            current_teacher(root, p.teacher.name, state) if p.drift.text_features == "teacher" else None)
        if report.get("error"):
            out["batches"].append(_refuse_batch(root, p, state, f.name, f.path, f.signature, "; ".join(report["reasons"])))
            save_state(root, state)
            continue
        log_watch_run(root, p.registry.experiment, f"drift-{f.name}",
                      {"redistill.kind": "drift-check", "redistill.batch": f.name,
                       "redistill.drifted": str(report["drifted"]).lower(),
                       "redistill.drift_reasons": "; ".join(report["reasons"])[:5000] or "none"},
                      {"mmd2": report["mmd2"], "mmd_p": report["mmd_p"],
                       **({"text_mmd2": report["text_mmd2"], "text_mmd_p": report["text_mmd_p"]}
                          if report.get("text_mmd_p") is not None else {}),
                       **{f"ks_p_holm.{k}": v["p_holm"] for k, v in report["ks"].items()}},
                      folder=Path(report["report_dir"]))
        now = time.time()
        action = on_batch(state, f.name, report["drifted"], now, p.drift.clear_batches, p.drift.cooldown_hours)
        entry = {"batch": f.name, "drifted": report["drifted"], "action": action, "reasons": report["reasons"],
                 "mmd_p": report.get("mmd_p")}
        if report["drifted"]:
            emit("redistill.drift.detected", f"redistill.batch.{f.name}",
                 {"batch": f.name, "reasons": report["reasons"], "mmd_p": report.get("mmd_p"), "action": action}, f.name)
        if action == "act":
            entry["outcome"] = _handle_drift(root, p, state, f.name, Path(f.path), report)
        state["batches"][f.name] = {"signature": f.signature, **entry, "at": now}
        save_state(root, state)
        out["batches"].append(entry)

    # 3. A drift episode deferred by the cooldown acts once the cooldown is over.
    ep = due_episode(state, time.time(), p.drift.cooldown_hours) if "batches" in look else None
    if ep is not None:
        ep["deferred"] = False
        batch = ep["batches"][-1]
        path = root / "data" / "incoming" / batch
        report_dir = sorted((root / "runs" / "watch" / "drift").glob(f"{batch}-*"))
        report = {"reasons": state["batches"].get(batch, {}).get("reasons", []),
                  "mmd_p": state["batches"].get(batch, {}).get("mmd_p"),
                  "report_dir": str(report_dir[-1]) if report_dir else None}
        out["deferred"] = _handle_drift(root, p, state, batch, path, report)
        save_state(root, state)
    return out
