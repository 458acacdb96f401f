"""`redistill distill` and `evaluate`: a student from the settings, and its measurement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from redistill.cli.common import (
    ParamsOpt,
    StepsOpt,
    WorkspaceOpt,
    _check_method,
    _floors,
    _num,
    _relative,
    _settings,
    _with_method,
    echo_err,
    fail,
)


def distill(
    out: Path = typer.Option(..., "--out", help="Student pipeline folder to write (must not exist)."),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Teacher pipeline folder. Default: data/teachers/<teacher.name>."
    ),
    data: Path | None = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    method: str | None = typer.Option(None, "--method", help="Distillation method (overrides distill.method)."),
    steps: int | None = StepsOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Distil a student with the `distill` settings, without the registry (the DVC distill stage); resumes if killed.

    Data parallel: `accelerate launch --multi_gpu --num_processes N -m redistill distill --out DIR` (gloo on
    CPUs, NCCL on GPUs); distill.batch_size is the global batch, split over the N processes, and only the
    main process logs and writes."""
    import torch

    from redistill.data.base import DataError
    from redistill.data.images import load_image_folder, safe_name
    from redistill.methods import distill as run_method
    from redistill.models.pipelines import (
        PipelineError,
        load_pipeline,
        save_pipeline,
        validate_teacher,
    )

    root, p = _settings(ws, params)
    p = _with_method(p, method, steps)
    if out.exists():
        fail(f"{out} already exists; a student is never overwritten, pick a new --out")
    _check_method(p)
    (root / "data" / "pairs").mkdir(parents=True, exist_ok=True)  # the output method's pair cache (a DVC output)
    teacher = teacher or root / "data" / "teachers" / p.teacher.name
    ckpt_dir = root / "runs" / "distill" / safe_name(out.name) / "checkpoints"
    try:
        images = load_image_folder(data or root / "data" / "reference")
        validate_teacher(teacher, images.channels, images.size)
        if p.distill.num_processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet under a launcher: start one
            from redistill.ops.launch import distill_in_processes

            try:
                summary = distill_in_processes(
                    p.distill, teacher, data or root / "data" / "reference", ckpt_dir, out, log=echo_err, workspace=root
                )
            except RuntimeError as e:
                fail(str(e))
            typer.echo(
                f"student saved to {out} ({summary['num_inference_steps']} steps, {summary['wall_time_s']:.0f} s, "
                f"{summary['num_processes']} processes)"
            )
            return
        student, summary = run_method(
            p.distill,
            load_pipeline(teacher),
            torch.from_numpy(images.images),
            ckpt_dir,
            log=echo_err,
            teacher_path=teacher,
            workspace=root,
            captions=getattr(images, "captions", None),
        )
    except (DataError, PipelineError, ValueError) as e:
        fail(str(e))
    from redistill.methods import process_group

    if process_group()[1]:  # under `accelerate launch`, the main process writes the student
        save_pipeline(student, out, extra={"redistill_distill.json": summary})
        typer.echo(f"student saved to {out} ({summary['num_inference_steps']} steps, {summary['wall_time_s']:.0f} s)")


def evaluate(
    pipeline: Path = typer.Argument(
        ..., help="A diffusers pipeline folder (save_pretrained layout, safetensors weights)."
    ),
    steps: int = typer.Option(..., "--steps", min=1, help="Denoising steps for the candidate (≥ 1)."),
    reference: Path | None = typer.Option(
        None,
        "--reference",
        help="Reference pipeline for fidelity and speedup. Default: the teacher, data/teachers/<teacher.name>.",
    ),
    reference_steps: int | None = typer.Option(
        None, "--reference-steps", min=1, help="Reference steps. Default: evaluate.reference_steps (50)."
    ),
    scheduler: str = typer.Option(
        "auto",
        "--scheduler",
        help="Candidate sampler: auto (saved one; DDPM below its training steps → DDIM), saved, ddim, ddpm.",
    ),
    reference_scheduler: str = typer.Option("auto", "--reference-scheduler", help="Reference sampler, as --scheduler."),
    data: Path | None = typer.Option(None, "--data", help="Real images for FID/KID. Default: data/reference."),
    features_dir: Path | None = typer.Option(
        None, "--features", help="Folder of the feature classifier and encoder. Default: data/features."
    ),
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="Local Inception-v3 .safetensors file: FID/KID in Inception space instead of evaluate.features.",
    ),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        min=2,
        help="Generated samples, exactly. Default: evaluate.num_samples, doubled up to evaluate.max_samples until the FID gap's CI lies on one side of the gate's bound.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run folder for metrics.json and grid.png. Default: runs/evaluate/<name>-<steps>-<time>."
    ),
    metrics_out: Path | None = typer.Option(
        None, "--metrics-out", help="Also write the JSON here (for `dvc metrics show`)."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    no_cache: bool = typer.Option(
        False,
        "--no-cache",
        help="Sample the reference afresh instead of reusing the workspace's store of drawn samples (data/samples).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every figure."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Measure quality (FID/KID + CI), fidelity (PSNR/SSIM), latency, throughput and memory of a pipeline."""
    import dataclasses
    from datetime import datetime, timezone

    from redistill.data.base import DataError
    from redistill.data.images import load_image_folder, safe_name
    from redistill.evaluation import spaces as feature_spaces
    from redistill.evaluation.sampling import SCHEDULER_CHOICES, sample_store
    from redistill.evaluation.suite import Side
    from redistill.evaluation.suite import evaluate as run_suite
    from redistill.models.pipelines import PipelineError, check_pipeline_folder

    root, p = _settings(ws, params)
    for name, choice in (("--scheduler", scheduler), ("--reference-scheduler", reference_scheduler)):
        if choice not in SCHEDULER_CHOICES:
            fail(f"{name} must be one of {', '.join(SCHEDULER_CHOICES)}, got {choice!r}")
    # --num-samples fixes the sample (no growth towards the gate's precision target)
    ep = (
        p.evaluate
        if num_samples is None
        else dataclasses.replace(p.evaluate, num_samples=num_samples, max_samples=num_samples)
    )
    reference = reference or root / "data" / "teachers" / p.teacher.name
    data = data or root / "data" / "reference"
    try:
        check_pipeline_folder(pipeline)
        check_pipeline_folder(reference)
        images = load_image_folder(data)
        features_dir = features_dir or root / "data" / "features"
        classifier = feature_spaces.classifier_for(p.evaluate.features, features_dir)  # labelled data only
        names = [f"inception:{inception_weights}"] if inception_weights else p.evaluate.features
        extractor = feature_spaces.load_all(names, features_dir)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        out = out or root / "runs" / "evaluate" / f"{safe_name(Path(pipeline).resolve().name)}-{steps}steps-{stamp}"
        result = run_suite(
            Side(pipeline, steps, scheduler),
            Side(reference, reference_steps or ep.reference_steps, reference_scheduler),
            images,
            extractor,
            ep,
            classifier=classifier,
            confidence=p.features.confidence,
            out_dir=out,
            device=device,
            data_path=data,
            log=echo_err,
            cache_dir=None if no_cache else sample_store(root),
            bounds=p.gate.fid_gap_max,
        )
    except (PipelineError, DataError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    # paths inside the workspace are recorded relative to it, so a committed metrics file is portable
    result["pipeline"] = _relative(result["pipeline"], root)
    result["reference"]["pipeline"] = _relative(result["reference"]["pipeline"], root)
    result["grid"] = _relative(result["grid"], root)
    if metrics_out:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result))
        return
    q, f, s, m = result["quality"], result["fidelity"], result["speed"], result["memory"]
    ci = lambda v: f"[{v[0]:.3g}, {v[1]:.3g}]"  # noqa: E731
    typer.echo(
        f"{result['pipeline']} @ {result['steps']} steps ({result['scheduler']}) vs "
        f"{result['reference']['pipeline']} @ {result['reference']['steps']} ({result['reference']['scheduler']})"
    )
    for name, sq in q["spaces"].items():
        typer.echo(
            f"  [{name}] FID {sq['fid']:.4g} {ci(sq['fid_ci95'])}, reference {sq['reference_fid']:.4g}; "
            f"gap {sq['fid_gap']:+.4g} {ci(sq['fid_gap_ci95'])} = {_floors(sq)} floors "
            f"(real-vs-real floor {sq['fid_floor']:.4g}); ratio {_num(sq['fid_ratio'], '.3f')}; KID {sq['kid']:.4g}"
        )
    if "recognisable_share" in q:
        typer.echo(f"  recognisable {q['recognisable_share']:.3f}  all classes: {q['all_classes_present']}")
    psnr = "identical" if f["psnr_db"] is None else f"{f['psnr_db']:.2f} dB"
    typer.echo(f"  PSNR {psnr}   SSIM {f['ssim']:.4f}")
    typer.echo(
        f"  latency p50 {s['latency_ms_p50']:.1f} ms  p95 {s['latency_ms_p95']:.1f} ms   "
        f"throughput {s['throughput_img_s']:.1f} img/s @ {s['throughput_batch']}   "
        f"speedup ×{s['speedup_throughput']:.2f} (batch) ×{s['speedup_latency']:.2f} (latency)"
    )
    typer.echo(
        f"  memory peak {m['peak_sampling_mb']:.1f} MB   params {m['params']:,}   checkpoint {m['checkpoint_mb']:.2f} MB"
    )
    typer.echo(
        f"  wrote {_relative(str(out / 'metrics.json'), root)} and {result['grid']}  ({result['wall_time_s']:.0f} s)"
    )
