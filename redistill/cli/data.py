"""`redistill prepare`, `features` and `validate`: the data set, its feature spaces and its validation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _relative, _settings, echo_err, fail


def prepare(
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Build the embedded data set from sklearn's digits: data/reference, data/holdout, data/incoming/*."""
    from redistill.data.base import DataError
    from redistill.data.digits import prepare as build

    root, p = _settings(ws, params)
    try:
        counts = build(p.prepare, root / "data")
    except DataError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        for name, n in counts.items():
            typer.echo(f"data/{name}: {n} images")


def features(
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Train the FID/KID feature spaces on data/reference: the digit classifier (tested on data/holdout) and the label-free encoder."""
    from redistill.data.base import DataError
    from redistill.evaluation.encoder import train_feature_spaces

    root, p = _settings(ws, params)
    try:
        metrics = train_feature_spaces(root, p, log=echo_err)
    except (DataError, ValueError) as e:
        fail(str(e))
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "features.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        typer.echo(
            f"held-out accuracy {metrics['heldout_accuracy']:.4f} on {metrics['num_test']} images; "
            f"not-a-digit examples rejected {metrics['not_digit_rejected']:.4f}"
        )


def validate(
    folder: Path | None = typer.Argument(None, help="Image folder to validate. Default: data/reference."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Folder for suite.json, result.json and the GX data docs. Default: runs/validation/<name>-<time>.",
    ),
    metrics_out: Path | None = typer.Option(None, "--metrics-out", help="Also write a JSON summary here (for DVC)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Validate an image folder with the great_expectations suite learnt from data/reference; exit 1 if it fails."""
    from datetime import datetime, timezone

    from redistill.data.base import DataError
    from redistill.data.expectations import validate_folder
    from redistill.data.images import safe_name

    root, p = _settings(ws, params)
    folder = folder or root / "data" / "reference"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = out or root / "runs" / "validation" / f"{safe_name(Path(folder).resolve().name)}-{stamp}"
    try:
        report = validate_folder(folder, root / "data" / "reference", p.validate, out)
    except (DataError, ValueError) as e:
        fail(str(e))
    summary = {
        "success": report.success,
        "num_images": report.num_images,
        "failed": report.failed,
        "data_docs": _relative(str(report.data_docs), root) if report.data_docs else None,
    }
    if metrics_out:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary) if as_json else report.message())
    if not report.success:
        raise typer.Exit(1)
