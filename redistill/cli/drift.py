"""`redistill drift …`: test one batch for drift, or calibrate the tests' false-alarm rate."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _settings, fail

drift_app = typer.Typer(help="Drift detection: test a batch, or calibrate the false-alarm rate.", no_args_is_help=True)


@drift_app.command("check")
def drift_check(
    batch: Path = typer.Argument(..., help="A folder of PNG images (one incoming batch)."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Representative set. Default: data/representative, else data/reference."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for drift.json and drift.png. Default: runs/drift/<batch>."
    ),
    features: str | None = typer.Option(
        None,
        "--features",
        help="Embedding for the MMD test: auto, a feature space in data/features (classifier, encoder, inception:FILE, clip:DIR, dinov2:DIR), or pixels (no weights: any images). Default: drift.features.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Test one batch for drift (MMD permutation test + Holm-corrected KS tests); exit 1 when it drifted."""
    from redistill.data.base import DataError
    from redistill.data.images import safe_name
    from redistill.drift.folders import check_folder
    from redistill.watch.scan import current_data

    root, p = _settings(ws, params)
    reference = reference or current_data(root)
    out = out or root / "runs" / "drift" / safe_name(Path(batch).resolve().name)
    features, ext = _drift_embedding(root, p, features)
    try:
        rep = check_folder(batch, reference, ext, p.drift.alpha, p.drift.permutations, p.drift.seed, out)
    except (DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(rep.to_dict()))
    else:
        typer.echo(
            f"{rep.batch}: {'DRIFT' if rep.drifted else 'no drift'} (MMD p {rep.mmd_p:.4g} on {features}; "
            f"min Holm KS p {min(v['p_holm'] for v in rep.ks.values()):.4g}; colour-histogram TV "
            f"{rep.histogram_tv:.3f}; alpha {rep.alpha:g})"
        )
        for r in rep.reasons:
            typer.echo(f"  {r}")
        typer.echo(f"  wrote {out / 'drift.json'} and {out / 'drift.png'}")
    if rep.drifted:
        raise typer.Exit(1)


def _drift_embedding(root: Path, p, features: str | None):
    """(name, embedding) of the drift commands' MMD test: --features, else drift.features; a clear error otherwise."""
    from redistill.drift.features import PIXELS, embedding

    features = features or p.drift.features
    try:
        return features, embedding(features, root / "data" / "features")
    except ValueError as e:
        fail(f"{e}; drift also takes --features {PIXELS} (no weights: any images)")
    except FileNotFoundError as e:
        fail(str(e))


@drift_app.command("calibrate")
def drift_calibrate(
    splits: int | None = typer.Option(
        None, "--splits", min=50, help="Reference-against-reference splits (≥ 50). Default: drift.calibration_splits."
    ),
    batches: bool = typer.Option(
        True, "--batches/--no-batches", help="Also test every batch folder under --incoming (the detection rate)."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="Image folder split against itself (grey or RGB, any size). Default: data/reference."
    ),
    incoming: Path | None = typer.Option(
        None, "--incoming", help="Folder of batch folders to test. Default: data/incoming."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=2,
        help="Images per pseudo-batch; below half the reference. Default: prepare.batch_size.",
    ),
    features: str | None = typer.Option(
        None,
        "--features",
        help="Embedding for the MMD test: auto, a feature space in data/features (classifier, encoder, inception:FILE, clip:DIR, dinov2:DIR), or pixels (no weights: any images). Default: drift.features.",
    ),
    out: Path | None = typer.Option(None, "--out", help="JSON file to write. Default: metrics/drift.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Measure the drift tests' false-alarm rate on reference splits, and which incoming batches they flag."""
    import time

    from redistill.data.base import DataError
    from redistill.drift.detect import calibrate, detect
    from redistill.drift.folders import embed_folder

    root, p = _settings(ws, params)
    reference = reference or root / "data" / "reference"
    incoming = incoming or root / "data" / "incoming"
    t0 = time.perf_counter()
    features, ext = _drift_embedding(root, p, features)
    try:
        feats, stats, shape = embed_folder(reference, ext)
        result = calibrate(
            feats,
            stats,
            batch_size or p.prepare.batch_size,
            splits or p.drift.calibration_splits,
            p.drift.alpha,
            p.drift.permutations,
            p.drift.seed,
        )
        result.update({"reference": str(reference), "features": features, "batches": {}})
        if batches and incoming.is_dir():
            for b in sorted(x for x in incoming.iterdir() if x.is_dir()):
                b_feats, b_stats, b_shape = embed_folder(b, ext)
                if b_shape != shape:
                    raise ValueError(
                        f"batch {b} holds {b_shape[0]}-channel {b_shape[1]} images, the reference "
                        f"{shape[0]}-channel {shape[1]}; drift is tested between sets of one shape"
                    )
                rep = detect(b.name, feats, stats, b_feats, b_stats, p.drift.alpha, p.drift.permutations, p.drift.seed)
                result["batches"][b.name] = {
                    "drifted": rep.drifted,
                    "mmd_p": rep.mmd_p,
                    "ks_min_p_holm": min(v["p_holm"] for v in rep.ks.values()),
                    "reasons": rep.reasons,
                }
            flagged = [b["drifted"] for b in result["batches"].values()]
            result["flagged_batches"] = f"{sum(flagged)} of {len(flagged)}"
    except (DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out = out or root / "metrics" / "drift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = {k: v for k, v in result.items() if k != "per_split"}
    out.write_text(json.dumps(slim, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(slim))
        return
    lo, hi = result["false_alarm_ci95"]
    typer.echo(
        f"false alarms: {result['false_alarms']} of {result['splits']} reference splits "
        f"(rate {result['false_alarm_rate']:.3f}, 95% CI {lo:.3f}–{hi:.3f}) at alpha {result['alpha']:g}"
    )
    for name, b in result["batches"].items():
        typer.echo(
            f"  batch {name}: {'DRIFT' if b['drifted'] else 'no drift'} (MMD p {b['mmd_p']:.4g}, "
            f"min Holm KS p {b['ks_min_p_holm']:.3g})" + (f": {b['reasons'][0]}" if b["reasons"] else "")
        )
    if result["batches"]:
        typer.echo(f"flagged batches: {result['flagged_batches']}")
    typer.echo(f"wrote {out} ({result['wall_time_s']:.0f} s)")
