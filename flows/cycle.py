"""One re-distillation cycle as a Prefect flow (DESIGN.md, "One cycle"). Wiring only: the work is in tasks/."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from redistill.tasks.distill import distill_student
from redistill.tasks.evaluate import evaluate_student
from redistill.tasks.gate import gate_student
from redistill.tasks.registry import (
    champion_evaluation,
    log_artifacts,
    log_evaluation,
    open_run,
    record_failure,
    register,
)
from redistill.tasks.validate import check_teacher, validate_data

from redistill.config import Params


class CycleStopped(RuntimeError):
    """The cycle stopped before distillation or registration; the MLflow run records why."""


@flow(name="redistill-cycle")
def cycle(inputs: dict, p: Params, root: Path, trigger: str = "manual") -> dict:
    """Validate → distil → evaluate → gate → register. `inputs` comes from `redistill.cycle.resolve_inputs`."""
    teacher, data, key = Path(inputs["teacher_uri"]), Path(inputs["data_uri"]), inputs["key"]
    run_dir = root / "runs" / "cycles" / key
    tags = {"redistill.key": key, "redistill.trigger": trigger, "redistill.prefect_flow_run_id": str(flow_run.id),
            "redistill.method": p.distill.method, **{f"redistill.{k}": str(v) for k, v in inputs.items() if k != "key"}}
    run_id = open_run(root, p.registry.experiment, tags, p.to_dict())

    report = validate_data(data, root / "data" / "reference", p.validate, run_dir / "validation")
    log_artifacts(root, run_id, run_dir / "validation", "validation")
    if not report.success:
        record_failure(root, run_id, "validate", report.message())
        raise CycleStopped(report.message())
    facts = check_teacher(teacher, inputs["channels"], tuple(inputs["size"]), data)
    if "error" in facts:
        record_failure(root, run_id, "teacher", facts["error"])
        raise CycleStopped(facts["error"])

    summary = distill_student(teacher, data, p.distill, run_dir, root)
    student = run_dir / "student"
    result = evaluate_student(student, p.distill.target_steps, teacher, data, root / "data" / "features", p,
                              run_dir / "evaluation", root / "runs" / "cache" / "samples")
    with tempfile.TemporaryDirectory() as tmp:
        _, champ_result = champion_evaluation(root, p.registry.student_name, Path(tmp))
    decision = gate_student(result, champ_result, p.gate)
    log_evaluation(root, run_id, result, decision)
    log_artifacts(root, run_id, student, "student")
    log_artifacts(root, run_id, run_dir / "evaluation", "evaluation")
    reg = register(root, p.registry.student_name, run_id, {
        **{k.removeprefix("redistill."): v for k, v in tags.items()},
        "num_inference_steps": str(p.distill.target_steps),
        "gate": "passed" if decision["passed"] else "rejected",
        "gate_reasons": decision["reasons"][:5000],
    }, promote=decision["passed"])
    return {"key": key, "decision": "promoted" if reg["promoted"] else "rejected", "version": reg["version"],
            "replaced": reg["replaced"], "run_id": run_id,
            "reasons": decision["reasons"], "metrics": result, "distill": summary, "deduplicated": False}
