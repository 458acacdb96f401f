"""`redistill champion` and `calibrate`: the committed champion and the gate's calibration (the DVC stages)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import (
    ParamsOpt,
    WorkspaceOpt,
    _check_method,
    _relative,
    _settings,
    echo_err,
    fail,
)


def champion(
    out: Path | None = typer.Option(
        None, "--out", help="The champion's folder (must not exist). Default: champion.out."
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Build the committed champion (the DVC stage `champion`): distil the committed teacher with the `distill`
    settings, judge it as a cycle would, and write a stock diffusers folder with its lineage and model card; resumes
    if killed."""
    from redistill.cycle.champion import build
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    out = out or root / p.champion.out
    _check_method(p)
    teacher = root / "data" / "teachers" / p.teacher.name
    try:
        record = build(root, p, teacher, root / "data" / "reference", out, p.champion.budget_minutes, log=echo_err)
    except (DataError, PipelineError, FileExistsError, ValueError) as e:
        fail(str(e))
    g, b = record["figures"], record["budget"]
    typer.echo(
        f"champion written to {_relative(str(out), root)}: {g['steps']}-step {p.distill.method} student, "
        f"distilled in {b['wall_time_s'] / 60:.1f} min (budget {b['limit_s'] / 60:.0f} min), gate "
        f"{'passed' if g['gate']['passed'] else 'REJECTED'}; FID gap "
        + ", ".join(f"{k} {v:+.2f}" for k, v in g["fid_gap_floors"].items())
        + " floors"
    )
    if not g["gate"]["passed"]:
        typer.echo("  " + "; ".join(c["name"] for c in g["gate"]["checks"] if not c["passed"]) + " failed", err=True)


def calibrate(
    teacher: Path | None = typer.Option(
        None, "--teacher", help="The teacher whose controls are measured. Default: data/teachers/<teacher.name>."
    ),
    metrics_out: Path = typer.Option(
        Path("metrics/calibration.json"),
        "--metrics-out",
        help="The JSON written (relative to the workspace; `dvc metrics show` reads it).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Measure the gate's FID gap on controls (the DVC stage `calibrate`): positive controls a user accepts as the
    teacher, negative ones a user rejects, in every evaluate.features space; print where each space's bound belongs."""
    from redistill.cycle.calibration import run
    from redistill.data.base import DataError
    from redistill.evaluation.sampling import sample_store
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    teacher = teacher or root / "data" / "teachers" / p.teacher.name
    try:
        result = run(root, p, teacher, sample_store(root), root / "runs" / "calibrate", log=echo_err)
    except (PipelineError, DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    result["teacher"] = _relative(result["teacher"], root)
    out = metrics_out if metrics_out.is_absolute() else root / metrics_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(result["table"])
    for space, s in result["summary"]["spaces"].items():
        typer.echo(
            f"{space}: "
            + (
                f"the controls separate; a bound belongs between {s['positive_max']:.2f} and "
                f"{s['negative_min']:.2f} floors (suggested {s['suggested_bound']:.2f}; the gate's bounds "
                "are in params.yaml, gate)"
                if s["separates"]
                else f"reports only: {s['why']}"
            )
        )
    typer.echo(f"wrote {_relative(str(out), root)} ({result['wall_time_s']:.0f} s)")
