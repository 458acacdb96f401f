"""One re-distillation cycle as a Prefect flow (DESIGN.md, "One cycle"). Wiring only: the work is in tasks/."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from redistill.config import Params, load_params, workspace
from redistill.evaluation.sampling import sample_store
from redistill.tasks.concurrency import api_url, one_at_a_time
from redistill.tasks.cycle import (
    bounded_http,
    cycle_card,
    cycle_inputs,
    failpoint,
    inputs_changed,
    note_unrecorded_failure,
    registry_version_for,
    servers_in_trouble,
    settle_key,
    stopped_by_servers,
)
from redistill.tasks.distill import adopt_student, distill_student, registered_form, warm_start
from redistill.tasks.evaluate import evaluate_student, quality_vs_steps
from redistill.tasks.events import emit
from redistill.tasks.gate import gate_student
from redistill.tasks.registry import (
    champion_evaluation,
    describe_version,
    log_artifacts,
    log_evaluation,
    log_lineage_inputs,
    log_pyfunc,
    open_run,
    publish_reports,
    record_failure,
    register,
    set_tags,
    with_retries,
)
from redistill.tasks.validate import check_teacher, validate_data
from redistill.tasks.watch import watch_data, watch_teacher


class CycleStopped(RuntimeError):
    """The cycle stopped before distillation or registration; the MLflow run records why."""


@flow(name="redistill-cycle")
def cycle(inputs: dict, p: Params, root: Path, trigger: str = "manual", trigger_info: dict | None = None) -> dict:
    """Validate → distil → evaluate → gate → register. `inputs` comes from `redistill.cycle.resolve_inputs`.

    `trigger_info` says what started it (the drift report or the new teacher); its files are logged under
    the run's `trigger/` folder and its summary in the tag `redistill.trigger_detail`.
    """
    key = inputs["key"]
    run_dir = root / "runs" / "cycles" / key
    tags = {
        "redistill.key": key,
        "redistill.trigger": trigger,
        "redistill.prefect_flow_run_id": str(flow_run.id),
        "redistill.pid": str(os.getpid()),
        "redistill.host": socket.gethostname(),  # to tell a dead run from a live one
        "redistill.method": p.distill.method,
        **{f"redistill.{k}": str(v) for k, v in inputs.items() if k != "key"},
    }
    if os.environ.get("PREFECT_API_URL") and flow_run.ui_url:  # a real server: the run can be looked at later
        tags["redistill.prefect_flow_run_url"] = str(flow_run.ui_url)
    if trigger_info:
        tags["redistill.trigger_detail"] = json.dumps(
            {k: v for k, v in trigger_info.items() if k != "report_dir"}, default=str
        )[:5000]
    run_id = with_retries(open_run, p.registry.retry_delays_s)(root, p.registry.experiment, tags, p.to_dict())
    failpoint("run-opened")
    progress = {"stage": "validate"}
    try:
        return _stages(inputs, p, root, trigger, trigger_info, run_id, tags, run_dir, progress)
    except CycleStopped:
        raise
    except Exception as e:  # anything unforeseen (a file that vanished, a folder that changed mid-read, a server
        reason = f"{type(e).__name__}: {e}"  # that went away): the run says why, the registry is untouched,
        try:  # and the user gets one line
            reason = inputs_changed(inputs) or reason  # an input that changed mid-read is the cause to report
        except Exception:
            pass
        trouble = servers_in_trouble(root, api_url())
        if not trouble:
            try:  # directly, not as a task: the retries are spent, and Prefect may be what failed
                if not registry_version_for(root, p.registry.student_name, key):
                    record_failure.fn(root, run_id, progress["stage"], reason)
                raise CycleStopped(reason) from e
            except CycleStopped:
                raise
            except Exception as store_error:  # the tracking store itself failed now
                trouble = {"MLflow tracking store": f"failed ({type(store_error).__name__})"}
        # a server is away: the run is closed with this reason by the next run of the same inputs
        note_unrecorded_failure(run_dir, run_id, progress["stage"], reason)
        raise CycleStopped(stopped_by_servers(trouble, progress["stage"], run_dir, reason)) from e


def _stages(
    inputs: dict,
    p: Params,
    root: Path,
    trigger: str,
    trigger_info: dict | None,
    run_id: str,
    tags: dict,
    run_dir: Path,
    progress: dict,
) -> dict:
    """The cycle's stages after its run is open; see `cycle`. `progress["stage"]` says where it is."""
    teacher, data, key = Path(inputs["teacher_uri"]), Path(inputs["data_uri"]), inputs["key"]
    delays = p.registry.retry_delays_s  # every MLflow step is tried again after these pauses
    log_artifacts_, record_failure_, set_tags_, warm_start_, champion_evaluation_ = (
        with_retries(t, delays) for t in (log_artifacts, record_failure, set_tags, warm_start, champion_evaluation)
    )
    log_evaluation_, log_pyfunc_, register_, log_lineage_inputs_, describe_version_ = (
        with_retries(t, delays) for t in (log_evaluation, log_pyfunc, register, log_lineage_inputs, describe_version)
    )
    if trigger_info and trigger_info.get("report_dir"):
        log_artifacts_(root, run_id, Path(trigger_info["report_dir"]), "trigger")
    # the data, a drift batch that triggered the cycle, and the teacher, as MLflow's own inputs of the run
    logged = log_lineage_inputs_(root, run_id, inputs, teacher.name, trigger_info)

    report = validate_data(
        data,
        root / "data" / "reference",
        p.validate,
        run_dir / "validation",
        inputs["validation_reference_md5"],
        teacher,
    )  # captions: counted by the teacher's tokenizer
    log_artifacts_(root, run_id, run_dir / "validation", "validation")
    if not report.success:
        record_failure_(root, run_id, "validate", report.message())
        raise CycleStopped(report.message())
    facts = check_teacher(teacher, inputs["channels"], tuple(inputs["size"]), data)
    if "error" in facts:
        record_failure_(root, run_id, "teacher", facts["error"])
        raise CycleStopped(facts["error"])
    failpoint("validated")

    progress["stage"] = "distill"
    if inputs.get("student_uri"):  # trigger bootstrap: a student distilled elsewhere (the committed champion) is judged
        try:
            summary = adopt_student(Path(inputs["student_uri"]), inputs["student_sha256"], teacher, run_dir)
        except ValueError as e:
            record_failure_(root, run_id, "adopt", str(e))
            raise CycleStopped(f"the student at {inputs['student_uri']} cannot be registered: {e}") from e
        start = {"init": summary["init"], "note": summary["init_note"]}
    else:
        start = warm_start_(root, p, teacher, run_dir)
        if "refused" in start:
            record_failure_(root, run_id, "warm-start", start["refused"])
            raise CycleStopped(start["refused"])
    tags["redistill.init"] = start["init"]
    set_tags_(root, run_id, {"redistill.init": start["init"], "redistill.init_note": start["note"][:5000]})
    if not inputs.get("student_uri"):
        try:
            summary = distill_student(teacher, data, p.distill, run_dir, root, start)
        except ValueError as e:  # settings the method cannot serve with this teacher (known once it is loaded)
            record_failure_(root, run_id, "distill", str(e))
            raise CycleStopped(f"distillation refused: {e}") from e
    # what the student is (the settings' method and steps, or an adopted student's own)
    method, steps = summary["method"], int(summary["num_inference_steps"])
    if method != tags["redistill.method"]:
        tags["redistill.method"] = method
        set_tags_(root, run_id, {"redistill.method": method})
    if summary.get("lora_rank"):  # a LoRA student: the lineage names its form and its base
        tags["redistill.adapter"] = json.dumps(
            {"rank": summary["lora_rank"], "base_sha256": summary.get("base_sha256")}
        )
        set_tags_(root, run_id, {"redistill.adapter": tags["redistill.adapter"]})
    failpoint("distilled")
    progress["stage"] = "evaluate"
    student = run_dir / "student"
    result = evaluate_student(
        student, steps, teacher, data, root / "data" / "features", p, run_dir / "evaluation", sample_store(root)
    )
    curve = quality_vs_steps(
        result, teacher, data, root / "data" / "features", p, run_dir / "evaluation", sample_store(root)
    )
    result["teacher_fid_by_steps"] = curve["teacher_fid_by_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        # the change thresholds compare like with like: the champion measured on this cycle's data, in this
        # cycle's feature spaces, with these evaluate settings (its recorded figures when they are those)
        champ_version, champ_result, champ_student, champ_steps = champion_evaluation_(
            root, p.registry.student_name, Path(tmp), inputs, p.to_dict()["evaluate"]
        )
        if champ_student is not None:
            champ_result = evaluate_student(
                champ_student,
                champ_steps or steps,
                teacher,
                data,
                root / "data" / "features",
                p,
                run_dir / "champion-evaluation",
                sample_store(root),
            )
            champ_result["evaluated_on"] = f"champion v{champ_version} re-evaluated on this cycle's data"
    decision = gate_student(result, champ_result, p.gate, method)
    failpoint("evaluated")
    changed = inputs_changed(inputs)  # the version must record what it was trained and judged on
    if changed:
        record_failure_(root, run_id, "inputs-changed", changed)
        raise CycleStopped(changed)
    progress["stage"] = "register"
    kept = registered_form(student, run_dir)  # a LoRA student: the adapter and its base's sha256, not the base
    log_artifacts_(root, run_id, kept, "student")
    card = cycle_card(
        p.registry.student_name, inputs, logged, decision, tags, run_id, steps, kept, champion_before=champ_version
    )
    model_id = log_pyfunc_(root, run_id, kept, {"redistill.key": key, "redistill.method": method}, card)
    evaluation_set = next(d for d in logged["datasets"] if d["context"] == "evaluation")
    log_evaluation_(root, run_id, result, decision, model_id, evaluation_set)  # metrics linked to the logged model
    log_artifacts_(root, run_id, run_dir / "evaluation", "evaluation")
    if (run_dir / "champion-evaluation").is_dir():
        log_artifacts_(root, run_id, run_dir / "champion-evaluation", "champion-evaluation")
    reg = register_(
        root,
        p.registry.student_name,
        run_id,
        {
            **{k.removeprefix("redistill."): v for k, v in tags.items()},
            "num_inference_steps": str(steps),
            "gate": "passed" if decision["passed"] else "rejected",
            "gate_reasons": decision["reasons"][:5000],
        },
        promote=decision["passed"],
        model_id=model_id,
    )
    name = p.registry.student_name
    try:  # the decision is registered: a description, report or event that cannot be written now does not undo it
        describe_version_(root, name, reg, inputs, logged, decision, tags, champ_version, run_id, steps)
        publish_reports(root, run_id, "promoted" if reg["promoted"] else "rejected", reg["version"])
        emit(
            "redistill.student.promoted" if reg["promoted"] else "redistill.student.rejected",
            f"redistill.model.{name}",
            {
                "version": reg["version"],
                "key": key,
                "trigger": trigger,
                "run_id": run_id,
                "replaced": reg["replaced"],
                "reasons": decision["reasons"][:2000],
            },
            name,
        )
    except Exception as e:
        get_run_logger().warning(
            f"version {reg['version']} is registered, but its description, reports or event "
            f"were not written: {type(e).__name__}: {str(e)[:300]}"
        )
    return {
        "key": key,
        "decision": "promoted" if reg["promoted"] else "rejected",
        "version": reg["version"],
        "replaced": reg["replaced"],
        "run_id": run_id,
        "reasons": decision["reasons"],
        "metrics": result,
        "distill": summary,
        "deduplicated": False,
    }


def locked_cycle(
    inputs: dict, p: Params, root: Path, trigger: str, force: bool = False, trigger_info: dict | None = None
) -> dict:
    """The cycle under the one-distillation-at-a-time slot, checking the key again once the slot is held.

    Simultaneous triggers with the same key queue on the slot; the first distils and registers, the
    others find its decision when their turn comes and return it.
    """
    with one_at_a_time(root):
        earlier = settle_key(root, p, inputs["key"], force)
        if earlier is not None:
            return earlier
        return cycle(inputs, p, root, trigger, trigger_info)


@flow(name="redistill-nightly")
def nightly(workspace_dir: str | None = None, params_file: str | None = None) -> dict:
    """The scheduled cycle (trigger=schedule) on the current teacher and representative set.

    Identical inputs return the earlier decision in seconds, so a night with nothing new costs nothing.
    """
    root = workspace(workspace_dir)
    p = load_params(params_file, root)
    bounded_http(p)  # as the CLI does: bounded MLflow retries
    inputs = cycle_inputs(watch_teacher(root, p.teacher.name), watch_data(root), p, root)
    return locked_cycle(inputs, p, root, "schedule")  # a stopped cycle fails the flow run, with its reason
