"""`redistill bench`: every method side by side on one teacher."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _settings, echo_err, fail


def bench(
    quick: bool = typer.Option(
        False, "--quick", help="CI-sized smoke run: 200 samples, a few dozen optimiser steps per method, no DDPM row."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as one JSON object."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Folder for bench.json, bench.md, quality_vs_nfe.png and one student folder per row (<method>-<steps>/). Default: runs/bench (runs/bench/quick with --quick).",
    ),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Teacher pipeline folder. Default: data/teachers/<teacher.name>."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device for sampling and timing, e.g. cpu or cuda."),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma-separated methods to bench. Default: all (progressive,consistency,output,adversarial,dmd,rectified); those that do not serve the teacher's kind are skipped and listed.",
    ),
    teacher_rows: bool = typer.Option(
        True,
        "--teacher-rows/--no-teacher-rows",
        help="Include the teacher's rows (DDIM/DDPM; a flow-matching teacher's own Euler sampler).",
    ),
    ddpm: bool = typer.Option(
        True,
        "--ddpm/--no-ddpm",
        help="Include the teacher's DDPM row at its full training steps (about 9 minutes on 2 CPU cores).",
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Benchmark the teacher (DDIM 10/25/50/100, DDPM 1000) and every method at 1/2/4/8 steps; logs to MLflow."""
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.ops.bench import run_bench
    from redistill.ops.bench_report import log_bench

    root, p = _settings(ws, params)
    teacher = teacher or root / "data" / "teachers" / p.teacher.name
    out = out or root / "runs" / "bench" / ("quick" if quick else "")
    for needed in (root / "data" / "reference", root / "data" / "features", teacher):
        if not needed.exists():
            fail(f"{needed} does not exist; run `redistill demo` (or `dvc repro evaluate`) first")
    try:
        from redistill.config import METHODS

        chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else METHODS
        result = run_bench(
            root,
            p,
            teacher,
            out,
            quick=quick,
            device=device,
            log=echo_err,
            methods=chosen,
            teacher_rows=teacher_rows,
            ddpm=ddpm,
        )
    except (DataError, PipelineError, ValueError) as e:
        fail(str(e))
    run_id = log_bench(root, result, out)
    result["mlflow_run_id"] = run_id
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo((out / "bench.md").read_text())
    typer.echo(
        f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'quality_vs_nfe.png'}; "
        f"MLflow run {run_id} in experiment redistill-bench ({result['wall_time_s']:.0f} s)"
    )
