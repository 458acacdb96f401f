"""Before a cycle runs: the workspace set up, its inputs and key resolved, the tracking server checked, what a killed
run left behind recovered, and an earlier decision for the same key found (the fast path: no Prefect server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TRIGGERS = ("manual", "schedule", "drift", "teacher", "bootstrap")


class CycleRefused(RuntimeError):
    """The cycle cannot start; the message says what to fix."""


def start_cycle(
    root: Path,
    p,
    teacher: Path,
    data: Path,
    force: bool,
    student: Path | None = None,
    params: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict | None]:
    """Resolve a cycle's inputs; returns (inputs, the earlier decision for the same key or None).

    An empty workspace gets its reference set and label-free feature space from `data` and its model's name;
    without `student` (a bootstrap judges one distilled elsewhere) the gate's bounds are calibrated on the
    workspace's own controls, once. With `force` no earlier decision is returned."""
    from redistill.config import settings_name_model
    from redistill.cycle.bootstrap import ensure_workspace, name_model
    from redistill.cycle.runs import earlier_decision, recover, resolve_inputs
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.registry.client import client, server_trouble, tracking_uri

    try:  # an empty workspace: the reference set and the label-free feature space come from --data
        if ensure_workspace(root, data, p, log=log) is not None:
            # its model: named after the teacher unless the settings name it
            name = name_model(root, p, teacher, settings_name_model(params, root))
            log(f"workspace: the registered model is {name}")
    except (DataError, ValueError) as e:
        raise CycleRefused(f"cannot set up the workspace from {data}: {e}") from e
    if student is None:  # a workspace of a user's data: the gate's bounds from its own spaces' controls, once
        from redistill.cycle.calibration import calibrate_workspace

        try:
            calibrate_workspace(root, p, teacher, params, log=log)
        except (PipelineError, DataError, FileNotFoundError, ValueError) as e:
            raise CycleRefused(
                f"cannot calibrate the gate in this workspace: {e}; or set gate.fid_gap_max in params.yaml"
            ) from e
    try:
        inputs = resolve_inputs(teacher, data, p, root, student)
    except (PipelineError, DataError, FileNotFoundError) as e:
        raise CycleRefused(str(e)) from e
    uri = tracking_uri(root)
    try:
        c = client(uri)
        c.search_experiments(max_results=1)
    except Exception as e:  # any transport or store error: say which URI and stop before any work
        trouble = server_trouble(uri)
        why = f"it {trouble}" if trouble else f"{type(e).__name__}: {str(e)[:200]}"
        raise CycleRefused(
            f"MLflow tracking URI {uri} cannot be reached: {why}, after {p.registry.http_retries} "
            "retries (registry.http_retries); start the server or unset MLFLOW_TRACKING_URI to use the "
            "workspace's SQLite store"
        ) from e
    recover(c, p.registry.student_name, p.registry.experiment, inputs["key"], root)  # what a killed run left behind
    return inputs, (None if force else earlier_decision(c, p.registry.student_name, inputs["key"]))
