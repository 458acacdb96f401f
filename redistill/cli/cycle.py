"""`redistill cycle`: one re-distillation cycle, and the cycle run the other commands (demo) share."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import (
    ParamsOpt,
    StepsOpt,
    WorkspaceOpt,
    _check_method,
    _settings,
    _with_method,
    echo_err,
    fail,
)


def run_cycle(
    root: Path,
    p,
    teacher: Path,
    data: Path,
    trigger: str,
    force: bool,
    student: Path | None = None,
    params: Path | None = None,
) -> dict:
    """Resolve the inputs, return an earlier decision for the same key, else run the flow (with `student`, trigger
    bootstrap: judge and register that student instead of distilling one).

    The fast path (same key, already decided) starts no Prefect server. Otherwise the cycle waits for the
    one-distillation slot and checks the key again, so simultaneous identical triggers give one run.
    """
    from redistill.cycle.start import TRIGGERS, CycleRefused, start_cycle

    if trigger not in TRIGGERS:
        fail(f"--trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if (trigger == "bootstrap") != (student is not None):
        fail(
            "--student DIR and --trigger bootstrap go together: a bootstrap cycle judges and registers a student "
            "distilled elsewhere (the committed champion), any other cycle distils its own"
        )
    if student is None:
        _check_method(p)
    try:
        inputs, earlier = start_cycle(root, p, teacher, data, force, student, params, log=echo_err)
    except CycleRefused as e:
        fail(str(e))
    if earlier is not None:
        return earlier
    from redistill.core.env import quiet_prefect

    quiet_prefect()
    from redistill.flows.run import CycleNotRun
    from redistill.flows.run import run_cycle as run_flow

    try:
        return run_flow(inputs, p, root, trigger, force)
    except CycleNotRun as e:
        _stop(str(e), e.prefect_api)


def _stop(message: str, prefect_api: str | None) -> None:
    """`fail`; but when the Prefect API is away, exit at once: at exit Prefect drains its queued logs and events
    to the server, retrying each batch, which would keep a stopped cycle hanging for minutes."""
    from redistill.registry.client import server_trouble

    if prefect_api and server_trouble(prefect_api):
        import os
        import sys

        typer.echo(f"error: {message}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # nothing is lost: the run's failure is recorded (or kept for the next run) already
    fail(message)


def print_decision(result: dict, name: str) -> None:
    """A cycle's decision, its key and run, and the gate's reasons."""
    note = " (same inputs as before: earlier decision, nothing distilled)" if result["deduplicated"] else ""
    typer.echo(f"decision: {result['decision']}, version {result['version']} of {name}{note}")
    typer.echo(f"  key {result['key']}  MLflow run {result['run_id']}")
    typer.echo(f"  gate: {result['reasons']}")


def cycle(
    teacher: Path | None = typer.Option(
        None,
        "--teacher",
        help="Teacher pipeline folder. Default: the newest teacher `redistill watch` accepted, else data/teachers/<teacher.name>.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Representative images. Default: data/representative once drift has grown it, else data/reference.",
    ),
    trigger: str | None = typer.Option(
        None,
        "--trigger",
        help="Why this cycle runs: manual (default), schedule, drift, teacher, or bootstrap (with --student).",
    ),
    student: Path | None = typer.Option(
        None,
        "--student",
        help="Judge and register this student folder (distilled elsewhere, e.g. the committed champion data/champion/digits-student) instead of distilling one: trigger bootstrap, the same validation, evaluation and gate.",
    ),
    method: str | None = typer.Option(None, "--method", help="Distillation method (overrides distill.method)."),
    steps: int | None = StepsOpt,
    force: bool = typer.Option(False, "--force", help="Run even if these exact inputs already have a decision."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """One re-distillation cycle as a Prefect flow: validate, distil, evaluate, gate, register.

    In an empty workspace, --teacher and --data are all it needs: the first cycle derives the reference set and a
    label-free encoder from the data, names the model after the teacher, and (unless params.yaml sets
    gate.fid_gap_max) calibrates the gate's bounds on the workspace's own controls (data/calibration.json)."""
    root, p = _settings(ws, params)
    p = _with_method(p, method, steps)
    from redistill.watch.scan import current_data, current_teacher

    try:
        default_teacher = current_teacher(root, p.teacher.name)
    except ValueError as e:  # a damaged watch state
        fail(str(e))
    trigger = trigger or ("bootstrap" if student is not None else "manual")
    result = run_cycle(root, p, teacher or default_teacher, data or current_data(root), trigger, force, student, params)
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        print_decision(result, p.registry.student_name)
