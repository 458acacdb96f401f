"""The `redistill` command line (typer). Heavy imports happen inside the commands so `--help` is fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from redistill.config import ConfigError, load_params, workspace

# Against a tracking server MLflow prints "View run … at: http://…" to stdout whenever a run ends, which broke the
# one JSON object `--json` promises (`rollback --json` against `redistill stack`); the commands say what they did.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

app = typer.Typer(
    help="redistill: continuous re-distillation of pre-trained diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teacher_app = typer.Typer(help="The teacher: train the embedded teachers (the default DDPM, the flow-matching and the text-to-image one), or fine-tune one into a new teacher.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
drift_app = typer.Typer(help="Drift detection: test a batch, or calibrate the false-alarm rate.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")
stack_app = typer.Typer(help="The production shape on one machine: PostgreSQL, an MLflow server (artifacts proxied) and a Prefect server on it, a process work pool with workers, a DVC remote (the `stack` settings; data under <workspace>/stack/).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")

WorkspaceOpt = typer.Option(None, "--workspace", help="Workspace folder (data/, MLflow store, runs). Default: $REDISTILL_HOME or the current folder.")
ParamsOpt = typer.Option(None, "--params", help="Settings file. Default: params.yaml in the workspace.")
StepsOpt = typer.Option(None, "--steps", help="The student's sampling steps (overrides distill.target_steps).")
ModelOpt = typer.Option(None, "--model", metavar="NAME",
                        help="Registered model to read (default: registry.student_name in params.yaml).")


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _relative(path: str, root: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _train_features(root: Path, p, log) -> dict:
    """Train and save the workspace's feature spaces (the `features` stage): the digit classifier and the
    label-free encoder; returns their metrics."""
    from redistill.data.images import load_image_folder
    from redistill.evaluation.encoder import save_encoder, train_encoder
    from redistill.evaluation.features import save_classifier, train_classifier

    reference = load_image_folder(root / "data" / "reference")
    model, metrics = train_classifier(p.features, reference, load_image_folder(root / "data" / "holdout"), log=log)
    save_classifier(model, root / "data" / "features", {"params": vars(p.features), "metrics": metrics})
    encoder, enc_metrics = train_encoder(reference.images, epochs=p.features.encoder_epochs, dim=p.features.encoder_dim,
                                         seed=p.features.seed, log=log)
    save_encoder(encoder, root / "data" / "features", {"params": vars(p.features), "metrics": enc_metrics})
    return {**metrics, "encoder": enc_metrics}


def _train_teacher(root: Path, recipe, out: Path, data: Path) -> dict:
    """Train a teacher into `out` with `recipe` (TeacherParams); checkpoints resume under runs/teacher/<name>."""
    from redistill.data.images import load_image_folder, safe_name
    from redistill.teachers.train import train_teacher

    ckpt = root / "runs" / "teacher" / safe_name(out.name) / "checkpoints"
    return train_teacher(recipe, load_image_folder(data), out, ckpt, log=lambda m: typer.echo(m, err=True))


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _floors(q: dict) -> str:
    """The FID gap in floor units with its CI half-width, e.g. '0.21 ± 0.06'."""
    if q.get("fid_gap_floors") is None:
        return "n/a"
    return f"{q['fid_gap_floors']:.2f} ± {q['fid_gap_halfwidth_floors']:.2f}"


def _settings(ws: Optional[Path], params: Optional[Path]):
    root = workspace(ws)
    try:
        p = load_params(params, root)
    except ConfigError as e:
        fail(str(e))
    from redistill.registry.client import configure_http

    configure_http(p.registry.http_retries, p.registry.http_timeout_s)  # a tracking server that went away
    return root, p  # costs bounded retries, not MLflow's minutes per request


@app.command()
def prepare(
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Build the embedded data set from sklearn's digits: data/reference, data/holdout, data/incoming/*."""
    from redistill.data.images import DataError
    from redistill.data.images import prepare as build

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


@app.command()
def features(
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Train the FID/KID feature spaces on data/reference: the digit classifier (tested on data/holdout) and the label-free encoder."""
    from redistill.data.images import DataError

    root, p = _settings(ws, params)
    try:
        metrics = _train_features(root, p, log=lambda m: typer.echo(m, err=True))
    except (DataError, ValueError) as e:
        fail(str(e))
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "features.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        typer.echo(f"held-out accuracy {metrics['heldout_accuracy']:.4f} on {metrics['num_test']} images; "
                   f"not-a-digit examples rejected {metrics['not_digit_rejected']:.4f}")


@teacher_app.command("train")
def teacher_train(
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline folder to write. Default: data/teachers/<teacher.name>. Must not exist."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Train a teacher with the `teacher` recipe: a DDPM (UNet2DModel + DDPMScheduler, ε, EMA) or, with
    teacher.objective flow_matching, a flow-matching one; resumes if killed."""
    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    out = out or root / "data" / "teachers" / p.teacher.name
    try:
        summary = _train_teacher(root, p.teacher, out, data or root / "data" / "reference")
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"teacher saved to {out} ({summary['train_steps']} steps in {summary['train_time_s']:.0f}s)")


@teacher_app.command("flow")
def teacher_flow(
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline folder to write. Default: data/flow-teachers/<flow_teacher.name> (outside data/teachers/, where the watch would take it as a new teacher for the workspace's method). Must not exist."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Train the flow-matching teacher (velocity on the straight path, FlowMatchEulerDiscreteScheduler, saved as a
    stock DDPMPipeline folder): the `teacher` recipe with the `flow_teacher` overrides; resumes if killed."""
    import dataclasses

    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    f = p.flow_teacher
    out = out or root / "data" / "flow-teachers" / f.name
    recipe = dataclasses.replace(p.teacher, objective="flow_matching", name=f.name, train_steps=f.train_steps,
                                 shift=f.shift, ema_decay=f.ema_decay, seed=f.seed, class_conditional=False)
    try:
        summary = _train_teacher(root, recipe, out, data or root / "data" / "reference")
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"flow-matching teacher saved to {out} ({summary['train_steps']} steps in {summary['train_time_s']:.0f}s)")


@teacher_app.command("text-to-image")
def teacher_text_to_image(
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline folder to write. Default: data/t2i-teachers/<t2i_teacher.name> (outside data/teachers/, where the watch would take it as a new teacher for the workspace's method). Must not exist."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Train the embedded latent text-to-image teacher (a StableDiffusionPipeline: CLIP tokenizer and text encoder,
    AutoencoderKL, UNet2DConditionModel) on the captioned digits: the `t2i_teacher` recipe; resumes if killed."""
    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    out = out or root / "data" / "t2i-teachers" / p.t2i_teacher.name
    if (out / "model_index.json").is_file():
        fail(f"{out} already holds a teacher; pass another --out, or remove it to train it again")
    try:
        summary = _train_t2i_teacher(root, p, out)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"text-to-image teacher saved to {out} ({summary['train_steps']} UNet steps in {summary['train_time_s']:.0f}s, "
               f"guidance_scale {summary['guidance_scale']})")


@teacher_app.command("finetune")
def teacher_finetune(
    start: Optional[Path] = typer.Option(None, "--from", help="Teacher to fine-tune. Default: data/teachers/<teacher.name>."),
    out: Optional[Path] = typer.Option(None, "--out", help="Pipeline folder to write. Default: data/teachers/<finetune.name>. Must not exist."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Make a new teacher by training an existing one `finetune.steps` more steps (the teacher recipe, another seed)."""
    import dataclasses

    from redistill.data.images import DataError, load_image_folder, safe_name
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.train import train_teacher

    root, p = _settings(ws, params)
    start = start or root / "data" / "teachers" / p.teacher.name
    out = out or root / "data" / "teachers" / p.finetune.name
    f = p.finetune
    recipe = dataclasses.replace(p.teacher, train_steps=f.steps, lr=f.lr, warmup_steps=f.warmup_steps, seed=f.seed,
                                 name=out.name, checkpoint_every=max(1, min(p.teacher.checkpoint_every, f.steps // 3)))
    try:
        summary = train_teacher(recipe, load_image_folder(data or root / "data" / "reference"), out,
                                root / "runs" / "teacher" / safe_name(out.name) / "checkpoints",
                                log=lambda m: typer.echo(m, err=True), init=start)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"fine-tuned teacher saved to {out} ({f.steps} steps from {start}, {summary['train_time_s']:.0f}s)")


@app.command()
def evaluate(
    pipeline: Path = typer.Argument(..., help="A diffusers pipeline folder (save_pretrained layout, safetensors weights)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Denoising steps for the candidate (≥ 1)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference pipeline for fidelity and speedup. Default: the teacher, data/teachers/<teacher.name>."),
    reference_steps: Optional[int] = typer.Option(None, "--reference-steps", min=1, help="Reference steps. Default: evaluate.reference_steps (50)."),
    scheduler: str = typer.Option("auto", "--scheduler", help="Candidate sampler: auto (saved one; DDPM below its training steps → DDIM), saved, ddim, ddpm."),
    reference_scheduler: str = typer.Option("auto", "--reference-scheduler", help="Reference sampler, as --scheduler."),
    data: Optional[Path] = typer.Option(None, "--data", help="Real images for FID/KID. Default: data/reference."),
    features_dir: Optional[Path] = typer.Option(None, "--features", help="Folder of the feature classifier and encoder. Default: data/features."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception-v3 .safetensors file: FID/KID in Inception space instead of evaluate.features."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=2, help="Generated samples, exactly. Default: evaluate.num_samples, doubled up to evaluate.max_samples until the FID gap's CI lies on one side of the gate's bound."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder for metrics.json and grid.png. Default: runs/evaluate/<name>-<steps>-<time>."),
    metrics_out: Optional[Path] = typer.Option(None, "--metrics-out", help="Also write the JSON here (for `dvc metrics show`)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Sample the reference afresh instead of reusing the workspace's store of drawn samples (data/samples)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every figure."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Measure quality (FID/KID + CI), fidelity (PSNR/SSIM), latency, throughput and memory of a pipeline."""
    import dataclasses
    from datetime import datetime, timezone

    from redistill.data.images import DataError, load_image_folder, safe_name
    from redistill.evaluation import spaces as feature_spaces
    from redistill.evaluation.suite import SCHEDULER_CHOICES, Side, sample_store
    from redistill.evaluation.suite import evaluate as run_suite
    from redistill.models.pipelines import PipelineError, check_pipeline_folder

    root, p = _settings(ws, params)
    for name, choice in (("--scheduler", scheduler), ("--reference-scheduler", reference_scheduler)):
        if choice not in SCHEDULER_CHOICES:
            fail(f"{name} must be one of {', '.join(SCHEDULER_CHOICES)}, got {choice!r}")
    # --num-samples fixes the sample (no growth towards the gate's precision target)
    ep = p.evaluate if num_samples is None else dataclasses.replace(p.evaluate, num_samples=num_samples,
                                                                     max_samples=num_samples)
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
            images, extractor, ep, classifier=classifier, confidence=p.features.confidence,
            out_dir=out, device=device, data_path=data, log=lambda m: typer.echo(m, err=True),
            cache_dir=None if no_cache else sample_store(root), bounds=p.gate.fid_gap_max,
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
    typer.echo(f"{result['pipeline']} @ {result['steps']} steps ({result['scheduler']}) vs "
               f"{result['reference']['pipeline']} @ {result['reference']['steps']} ({result['reference']['scheduler']})")
    for name, sq in q["spaces"].items():
        typer.echo(f"  [{name}] FID {sq['fid']:.4g} {ci(sq['fid_ci95'])}, reference {sq['reference_fid']:.4g}; "
                   f"gap {sq['fid_gap']:+.4g} {ci(sq['fid_gap_ci95'])} = {_floors(sq)} floors "
                   f"(real-vs-real floor {sq['fid_floor']:.4g}); ratio {_num(sq['fid_ratio'], '.3f')}; KID {sq['kid']:.4g}")
    if "recognisable_share" in q:
        typer.echo(f"  recognisable {q['recognisable_share']:.3f}  all classes: {q['all_classes_present']}")
    psnr = "identical" if f["psnr_db"] is None else f"{f['psnr_db']:.2f} dB"
    typer.echo(f"  PSNR {psnr}   SSIM {f['ssim']:.4f}")
    typer.echo(f"  latency p50 {s['latency_ms_p50']:.1f} ms  p95 {s['latency_ms_p95']:.1f} ms   "
               f"throughput {s['throughput_img_s']:.1f} img/s @ {s['throughput_batch']}   "
               f"speedup ×{s['speedup_throughput']:.2f} (batch) ×{s['speedup_latency']:.2f} (latency)")
    typer.echo(f"  memory peak {m['peak_sampling_mb']:.1f} MB   params {m['params']:,}   checkpoint {m['checkpoint_mb']:.2f} MB")
    typer.echo(f"  wrote {_relative(str(out / 'metrics.json'), root)} and {result['grid']}  ({result['wall_time_s']:.0f} s)")


@app.command()
def champion(
    out: Optional[Path] = typer.Option(None, "--out", help="The champion's folder (must not exist). Default: champion.out."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Build the committed champion (the DVC stage `champion`): distil the committed teacher with the `distill`
    settings, judge it as a cycle would, and write a stock diffusers folder with its lineage and model card; resumes
    if killed."""
    from redistill.cycle.champion import build
    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    out = out or root / p.champion.out
    _check_method(p)
    teacher = root / "data" / "teachers" / p.teacher.name
    try:
        record = build(root, p, teacher, root / "data" / "reference", out, p.champion.budget_minutes,
                       log=lambda m: typer.echo(m, err=True))
    except (DataError, PipelineError, FileExistsError, ValueError) as e:
        fail(str(e))
    g, b = record["figures"], record["budget"]
    typer.echo(f"champion written to {_relative(str(out), root)}: {g['steps']}-step {p.distill.method} student, "
               f"distilled in {b['wall_time_s'] / 60:.1f} min (budget {b['limit_s'] / 60:.0f} min), gate "
               f"{'passed' if g['gate']['passed'] else 'REJECTED'}; FID gap "
               + ", ".join(f"{k} {v:+.2f}" for k, v in g["fid_gap_floors"].items()) + " floors")
    if not g["gate"]["passed"]:
        typer.echo("  " + "; ".join(c["name"] for c in g["gate"]["checks"] if not c["passed"]) + " failed", err=True)


@app.command()
def calibrate(
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The teacher whose controls are measured. Default: data/teachers/<teacher.name>."),
    metrics_out: Path = typer.Option(Path("metrics/calibration.json"), "--metrics-out", help="The JSON written (relative to the workspace; `dvc metrics show` reads it)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Measure the gate's FID gap on controls (the DVC stage `calibrate`): positive controls a user accepts as the
    teacher, negative ones a user rejects, in every evaluate.features space; print where each space's bound belongs."""
    from redistill.cycle.calibration import run
    from redistill.evaluation.suite import sample_store
    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    teacher = teacher or root / "data" / "teachers" / p.teacher.name
    try:
        result = run(root, p, teacher, sample_store(root), root / "runs" / "calibrate", log=lambda m: typer.echo(m, err=True))
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
        typer.echo(f"{space}: " + (f"the controls separate; a bound belongs between {s['positive_max']:.2f} and "
                                   f"{s['negative_min']:.2f} floors (suggested {s['suggested_bound']:.2f}; the gate's bounds "
                                   "are in params.yaml, gate)" if s["separates"] else f"reports only: {s['why']}"))
    typer.echo(f"wrote {_relative(str(out), root)} ({result['wall_time_s']:.0f} s)")


@app.command()
def validate(
    folder: Optional[Path] = typer.Argument(None, help="Image folder to validate. Default: data/reference."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for suite.json, result.json and the GX data docs. Default: runs/validation/<name>-<time>."),
    metrics_out: Optional[Path] = typer.Option(None, "--metrics-out", help="Also write a JSON summary here (for DVC)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Validate an image folder with the great_expectations suite learnt from data/reference; exit 1 if it fails."""
    from datetime import datetime, timezone

    from redistill.data.images import DataError, safe_name
    from redistill.data.expectations import validate_folder

    root, p = _settings(ws, params)
    folder = folder or root / "data" / "reference"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = out or root / "runs" / "validation" / f"{safe_name(Path(folder).resolve().name)}-{stamp}"
    try:
        report = validate_folder(folder, root / "data" / "reference", p.validate, out)
    except (DataError, ValueError) as e:
        fail(str(e))
    summary = {"success": report.success, "num_images": report.num_images, "failed": report.failed,
               "data_docs": _relative(str(report.data_docs), root) if report.data_docs else None}
    if metrics_out:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary) if as_json else report.message())
    if not report.success:
        raise typer.Exit(1)


@app.command()
def distill(
    out: Path = typer.Option(..., "--out", help="Student pipeline folder to write (must not exist)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher pipeline folder. Default: data/teachers/<teacher.name>."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    method: Optional[str] = typer.Option(None, "--method", help="Distillation method (overrides distill.method)."),
    steps: Optional[int] = StepsOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Distil a student with the `distill` settings, without the registry (the DVC distill stage); resumes if killed.

    Data parallel: `accelerate launch --multi_gpu --num_processes N -m redistill distill --out DIR` (gloo on
    CPUs, NCCL on GPUs); distill.batch_size is the global batch, split over the N processes, and only the
    main process logs and writes."""
    import torch

    from redistill.data.images import DataError, load_image_folder, safe_name
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
                summary = distill_in_processes(p.distill, teacher, data or root / "data" / "reference", ckpt_dir, out,
                                               log=lambda m: typer.echo(m, err=True), workspace=root)
            except RuntimeError as e:
                fail(str(e))
            typer.echo(f"student saved to {out} ({summary['num_inference_steps']} steps, {summary['wall_time_s']:.0f} s, "
                       f"{summary['num_processes']} processes)")
            return
        student, summary = run_method(p.distill, load_pipeline(teacher), torch.from_numpy(images.images),
                                      ckpt_dir, log=lambda m: typer.echo(m, err=True), teacher_path=teacher, workspace=root,
                                      captions=getattr(images, "captions", None))
    except (DataError, PipelineError, ValueError) as e:
        fail(str(e))
    from redistill.methods import process_group

    if process_group()[1]:  # under `accelerate launch`, the main process writes the student
        save_pipeline(student, out, extra={"redistill_distill.json": summary})
        typer.echo(f"student saved to {out} ({summary['num_inference_steps']} steps, {summary['wall_time_s']:.0f} s)")


TRIGGERS = ("manual", "schedule", "drift", "teacher", "bootstrap")


def _run_cycle(root: Path, p, teacher: Path, data: Path, trigger: str, force: bool, student: Path | None = None,
               params: Optional[Path] = None) -> dict:
    """Resolve the inputs, return an earlier decision for the same key, else run the flow (with `student`, trigger
    bootstrap: judge and register that student instead of distilling one).

    The fast path (same key, already decided) starts no Prefect server. Otherwise the cycle waits for the
    one-distillation slot and checks the key again, so simultaneous identical triggers give one run.
    """
    import os

    from redistill.cycle.runs import earlier_decision, recover, resolve_inputs
    from redistill.data.images import DataError
    from redistill.registry.client import client, tracking_uri
    from redistill.models.pipelines import PipelineError

    if trigger not in TRIGGERS:
        fail(f"--trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if (trigger == "bootstrap") != (student is not None):
        fail("--student DIR and --trigger bootstrap go together: a bootstrap cycle judges and registers a student "
             "distilled elsewhere (the committed champion), any other cycle distils its own")
    if student is None:
        _check_method(p)
    from redistill.cycle.bootstrap import ensure_workspace, name_model
    from redistill.config import settings_name_model

    try:  # an empty workspace: the reference set and the label-free feature space come from --data
        if ensure_workspace(root, data, p, log=lambda m: typer.echo(m, err=True)) is not None:
            # its model: named after the teacher unless the settings name it
            name = name_model(root, p, teacher, settings_name_model(params, root))
            typer.echo(f"workspace: the registered model is {name}", err=True)
    except (DataError, ValueError) as e:
        fail(f"cannot set up the workspace from {data}: {e}")
    if student is None:  # a workspace of a user's data: the gate's bounds from its own spaces' controls, once
        from redistill.cycle.calibration import calibrate_workspace

        try:
            calibrate_workspace(root, p, teacher, params, log=lambda m: typer.echo(m, err=True))
        except (PipelineError, DataError, FileNotFoundError, ValueError) as e:
            fail(f"cannot calibrate the gate in this workspace: {e}; or set gate.fid_gap_max in params.yaml")
    try:
        inputs = resolve_inputs(teacher, data, p, root, student)
    except (PipelineError, DataError, FileNotFoundError) as e:
        fail(str(e))
    uri = tracking_uri(root)
    try:
        c = client(uri)
        c.search_experiments(max_results=1)
    except Exception as e:  # any transport or store error: say which URI and stop before any work
        from redistill.registry.client import server_trouble

        trouble = server_trouble(uri)
        why = f"it {trouble}" if trouble else f"{type(e).__name__}: {str(e)[:200]}"
        fail(f"MLflow tracking URI {uri} cannot be reached: {why}, after {p.registry.http_retries} retries "
             "(registry.http_retries); start the server or unset MLFLOW_TRACKING_URI to use the workspace's "
             "SQLite store")
    recover(c, p.registry.student_name, p.registry.experiment, inputs["key"], root)  # what a killed run left behind
    earlier = None if force else earlier_decision(c, p.registry.student_name, inputs["key"])
    if earlier is not None:
        return earlier
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from redistill.cycle.runs import servers_in_trouble
    from redistill.flows.cycle import CycleStopped, locked_cycle
    from redistill.tasks.concurrency import api_url

    prefect = api_url()
    if prefect and (trouble := servers_in_trouble(root, prefect)):  # before any work, like the tracking server
        fail(f"the Prefect API at {prefect} {next(iter(trouble.values()))}; start it (`prefect server start`) or "
             "unset PREFECT_API_URL to let the cycle start a temporary one")
    try:
        return locked_cycle(inputs, p, root, trigger, force)
    except CycleStopped as e:
        _stop(f"cycle stopped: {e}", prefect)
    except Exception as e:  # raised outside the cycle's stages (Prefect's own bookkeeping, the slot): a server
        trouble = servers_in_trouble(root, prefect)  # that went away is the usual cause; say which
        if not trouble:
            raise
        from redistill.cycle.runs import stopped_by_servers

        run_dir = root / "runs" / "cycles" / inputs["key"]
        _stop(f"cycle stopped: {stopped_by_servers(trouble, 'orchestration', run_dir, f'{type(e).__name__}: {e}')}",
              prefect)


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


def _with_method(p, method: Optional[str], steps: Optional[int] = None):
    """The settings with --method and --steps (distill.target_steps) applied."""
    import dataclasses

    changes = {k: v for k, v in (("method", method), ("target_steps", steps)) if v is not None}
    if changes:
        try:
            p.distill = dataclasses.replace(p.distill, **changes)
        except ConfigError as e:
            fail(str(e))
    return p



def _check_method(p) -> None:
    """Refuse settings the method cannot serve before anything runs."""
    from redistill.methods import method_config

    try:
        method_config(p.distill)
    except ValueError as e:
        fail(f"distill settings: {e}")


def _print_decision(result: dict, name: str) -> None:
    note = " (same inputs as before: earlier decision, nothing distilled)" if result["deduplicated"] else ""
    typer.echo(f"decision: {result['decision']}, version {result['version']} of {name}{note}")
    typer.echo(f"  key {result['key']}  MLflow run {result['run_id']}")
    typer.echo(f"  gate: {result['reasons']}")


@app.command()
def cycle(
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher pipeline folder. Default: the newest teacher `redistill watch` accepted, else data/teachers/<teacher.name>."),
    data: Optional[Path] = typer.Option(None, "--data", help="Representative images. Default: data/representative once drift has grown it, else data/reference."),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="Why this cycle runs: manual (default), schedule, drift, teacher, or bootstrap (with --student)."),
    student: Optional[Path] = typer.Option(None, "--student", help="Judge and register this student folder (distilled elsewhere, e.g. the committed champion data/champion/digits-student) instead of distilling one: trigger bootstrap, the same validation, evaluation and gate."),
    method: Optional[str] = typer.Option(None, "--method", help="Distillation method (overrides distill.method)."),
    steps: Optional[int] = StepsOpt,
    force: bool = typer.Option(False, "--force", help="Run even if these exact inputs already have a decision."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """One re-distillation cycle as a Prefect flow: validate, distil, evaluate, gate, register.

    In an empty workspace, --teacher and --data are all it needs: the first cycle derives the reference set and a
    label-free encoder from the data, names the model after the teacher, and (unless params.yaml sets
    gate.fid_gap_max) calibrates the gate's bounds on the workspace's own controls (data/calibration.json)."""
    root, p = _settings(ws, params)
    p = _with_method(p, method, steps)
    from redistill.watch.policy import current_data, current_teacher

    try:
        default_teacher = current_teacher(root, p.teacher.name)
    except ValueError as e:  # a damaged watch state
        fail(str(e))
    trigger = trigger or ("bootstrap" if student is not None else "manual")
    result = _run_cycle(root, p, teacher or default_teacher, data or current_data(root), trigger, force, student, params)
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        _print_decision(result, p.registry.student_name)


@app.command()
def demo(
    kind: str = typer.Option("digits", "--kind", help="digits (the default: the continuous loop on the embedded digits) or text-to-image (the embedded latent text-to-image teacher and an LCM-LoRA student, in its own workspace runs/demo-text-to-image)."),
    cold: bool = typer.Option(False, "--cold", help="Instead of the loop: one cold cycle of demo.cold_method (progressive) from the committed teacher, about 7 minutes."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (the model, versions, decisions and figures)."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """The main job on the embedded digits: the committed champion is registered (version 1, through the real
    evaluation and gate), a fine-tuned teacher lands in data/teachers/, the watch finds it, a warm re-distillation
    from the champion is judged against the new teacher and the champion, and promoted or rejected."""
    from redistill.data.images import prepare as build

    if kind not in ("digits", "text-to-image"):
        fail(f"--kind must be digits or text-to-image, got {kind!r}")
    root, p = _settings(ws, params)
    if kind == "text-to-image":
        return _demo_text_to_image(root, p, as_json)
    teacher = root / "data" / "teachers" / p.teacher.name
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    prepare, train = (lambda: build(p.prepare, root / "data"),
                      lambda: _train_teacher(root, p.teacher, teacher, root / "data" / "reference"))
    recipe = "the `teacher` recipe (about 30 min on 2 cores)"
    if not cold:
        return _demo_loop(root, p, params, teacher, prepare, train, recipe, log, as_json)
    p = _with_method(p, p.demo.cold_method, p.demo.cold_steps)
    result, timings = _demo_cycle(root, p, teacher, prepare, train, recipe, log)
    if _demo_report("digits", root, p.registry.student_name, teacher, result, timings, as_json):
        return
    _demo_next(root, p.registry.student_name)


def _demo_loop(root: Path, p, params: Optional[Path], teacher: Path, prepare, train, recipe: str, log, as_json: bool) -> None:
    """`demo`: the committed champion as version 1 (trigger bootstrap), a new teacher landing, the watch's look, the
    warm cycle it starts; prints both versions' tables. A second run finds every step done and changes nothing."""
    import time

    from redistill.core.files import copy_folder

    name = p.registry.student_name
    timings, t = {}, time.perf_counter()
    champion_dir = root / p.champion.out
    if not (champion_dir / "model_index.json").is_file():
        fail(f"no committed champion at {champion_dir}; restore it (`git checkout -- {p.champion.out}`) or rebuild it "
             "with `dvc repro -s champion` (about 90 minutes on 2 cores)")
    log(f"1. the committed champion {p.champion.out}: registered through the evaluation and the gate (trigger bootstrap)")
    v1, step = _demo_cycle(root, p, teacher, prepare, train, recipe, log, student=champion_dir)
    timings.update(step)
    if v1["decision"] != "promoted":
        log(f"the committed champion was {v1['decision']} (version {v1['version']}): {v1['reasons']}")
        log("no champion to re-distil from; see `redistill lineage --version "
            f"{v1['version']}` and the calibration (`redistill calibrate`)")
        raise typer.Exit(1)
    t = time.perf_counter()
    landed = root / "data" / "teachers" / Path(p.demo.new_teacher).name
    source = root / p.demo.new_teacher
    if not (landed / "model_index.json").is_file():
        if not (source / "model_index.json").is_file():
            fail(f"no new teacher at {source}; restore it (`git checkout -- {p.demo.new_teacher}`) or make one with "
                 f"`redistill teacher finetune` (the DVC stage finetune)")
        copy_folder(source, landed)  # whole or not at all, as a finished download lands
        log(f"2. a new teacher landed: {_relative(str(landed), root)} (fine-tuned from {p.teacher.name})")
    else:
        log(f"2. the new teacher {_relative(str(landed), root)} landed in an earlier run")
    log("3. the watch looks for new teachers (`redistill watch --once --only teachers`, as the watch deployment does)")
    look = _demo_watch(root, p, params, landed.name)
    timings["watch and cycle"] = time.perf_counter() - t
    versions = _demo_versions(root, name)
    if as_json:
        typer.echo(json.dumps({"kind": "digits", "workspace": str(root), "model": name, "bootstrap": v1,
                               "watch": look, "versions": versions, "timings_s": timings}, default=str))
        return
    for v in versions:
        typer.echo("")
        typer.echo(f"version {v['version']} of {name}: {v['gate']} ({v['trigger']}, init {v['init']}), "
                   f"teacher {v['teacher']}" + (", champion" if v["champion"] else "")
                   + (", previous" if v["previous"] else ""))
        if v.get("metrics"):
            typer.echo(_comparison_table(v["metrics"]))
        if v["gate"] != "passed":
            typer.echo(f"  gate: {v['reasons']}")
    typer.echo("")
    newest = versions[-1] if versions else None
    if newest is not None:
        typer.echo(f"decision: {'promoted' if newest['gate'] == 'passed' else 'rejected'}, version {newest['version']} "
                   f"of {name} (init {newest['init']})")
    typer.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    _demo_next(root, name)


def _demo_watch(root: Path, p, params: Optional[Path], teacher_name: str) -> dict:
    """The watch's look at data/teachers/ until the landed teacher is handled (a folder that changed less than
    watch.settle_seconds ago is pending: looked at again once it has settled, as the deployment would)."""
    import time

    deadline = time.time() + p.watch.settle_seconds + 30
    while True:
        r = _watch_once(root, p, params, ("teachers",))
        waiting = [f for f in r.get("pending", []) if f["name"] == teacher_name]
        if not waiting or time.time() > deadline:
            return r
        typer.echo(f"   {teacher_name} is settling ({waiting[0]['reason']}); looking again in 5 s", err=True)
        time.sleep(5)


def _demo_versions(root: Path, name: str) -> list[dict]:
    """Every version of `name`, oldest first: its gate, trigger, init, teacher, aliases and evaluation."""
    from redistill.registry.client import PREFIX, alias

    c = _registry_client(root)
    champ, prev = alias(c, name, "champion"), alias(c, name, "previous")
    out = []
    for mv in sorted(c.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        tag = lambda k: mv.tags.get(PREFIX + k, "?")  # noqa: E731
        out.append({"version": str(mv.version), "gate": tag("gate"), "trigger": tag("trigger"), "init": tag("init"),
                    "teacher": Path(tag("teacher_uri")).name, "reasons": tag("gate_reasons"), "run_id": mv.run_id,
                    "champion": champ is not None and str(champ.version) == str(mv.version),
                    "previous": prev is not None and str(prev.version) == str(mv.version),
                    "metrics": _version_metrics(root, mv.run_id)})
    return out


def _demo_next(root: Path, name: str) -> None:
    """Where to look after a demo."""
    from redistill.registry.client import champion, tracking_uri

    champ = champion(_registry_client(root), name)
    typer.echo(f"look: mlflow ui --backend-store-uri {tracking_uri(root)}  →  Models → {name}")
    if champ is None:
        typer.echo("      no champion: the gate lines above say why")
        return
    typer.echo(f"      redistill lineage --alias champion  (version {champ.version}: which teacher, which data, which code)")
    typer.echo("      redistill rollback  (champion back to the previous version; who, when and why are recorded)")
    typer.echo("      redistill export --alias champion --out student/  (a stock diffusers pipeline folder with its model card)")
    typer.echo(f"      mlflow models serve -m models:/{name}@champion -p 5001  (MLFLOW_TRACKING_URI={tracking_uri(root)})")


def _demo_cycle(ws: Path, p, teacher: Path, prepare, train_teacher, recipe: str, log,
                student: Path | None = None) -> tuple[dict, dict]:
    """A demo's steps in workspace `ws`: its data (`prepare`) and feature spaces where missing, its teacher
    (`train_teacher` with `recipe` where missing), one cycle (with `student`: trigger bootstrap, that student judged
    and registered); returns (the cycle's result, seconds per step)."""
    import time

    timings, t = {}, time.perf_counter()
    if not (ws / "data" / "reference").is_dir():
        prepare()
    timings["prepare"], t = time.perf_counter() - t, time.perf_counter()
    if not all((ws / "data" / "features" / f).is_file() for f in ("classifier.safetensors", "encoder.safetensors")):
        _train_features(ws, p, log=lambda _: None)
    timings["features"], t = time.perf_counter() - t, time.perf_counter()
    if not (teacher / "model_index.json").is_file():
        log(f"no teacher at {teacher}: training one with {recipe}")
        train_teacher()
    timings["teacher"], t = time.perf_counter() - t, time.perf_counter()
    result = _run_cycle(ws, p, teacher, ws / "data" / "reference", "bootstrap" if student else "manual", False, student)
    timings["bootstrap cycle" if student else "cycle"] = time.perf_counter() - t
    return result, timings


def _demo_report(kind: str, ws: Path, name: str, teacher: Path, result: dict, timings: dict, as_json: bool) -> bool:
    """Print a demo's outcome: one JSON object (returns True), or the decision, the teacher-vs-student table and
    the time per step (returns False: the caller adds where to look next)."""
    metrics = result.get("metrics") or _version_metrics(ws, result["run_id"])
    if as_json:
        typer.echo(json.dumps({"kind": kind, "workspace": str(ws), "model": name, "teacher": str(teacher),
                               **_demo_summary(result, metrics), "timings_s": timings}))
        return True
    _print_decision(result, name)
    if metrics:
        typer.echo("")
        typer.echo(_comparison_table(metrics))
    typer.echo("")
    typer.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return False


def _demo_summary(result: dict, metrics: dict | None) -> dict:
    """The decision and the headline figures of a demo cycle, for --json."""
    out = {k: result.get(k) for k in ("decision", "version", "run_id", "key", "deduplicated", "reasons")}
    if metrics:
        q, s = metrics["quality"], metrics["speed"]
        out["figures"] = {"steps": metrics["steps"], "reference_steps": metrics["reference"]["steps"],
                          "fid": q["fid"], "reference_fid": q["reference_fid"],
                          "fid_ratio": q["fid"] / q["reference_fid"] if q["reference_fid"] else None,
                          **{k: q[k] for k in ("recognisable_share", "reference_recognisable_share", "prompt_adherence",
                                               "reference_prompt_adherence", "prompt_adherence_gap_points") if k in q},
                          **{k: s[k] for k in ("speedup_throughput", "speedup_latency", "unet_passes_per_step",
                                               "reference_unet_passes_per_step", "vae_decode_ms_p50") if k in s}}
    return out


def _demo_text_to_image(root: Path, p, as_json: bool) -> None:
    """`demo --kind text-to-image`: the captioned digits, the embedded latent text-to-image teacher (trained here if
    missing), and one cycle that distils an LCM-LoRA student, in the workspace runs/demo-text-to-image (its own
    data, feature spaces, MLflow store and registered model `t2i_demo.student_name`)."""
    import yaml

    from redistill.config import ConfigError, parse_params
    from redistill.data.captions import prepare_t2i

    d = p.t2i_demo
    sub = root / "runs" / "demo-text-to-image"
    raw = p.to_dict()
    raw["registry"]["student_name"] = d.student_name
    raw["distill"].update(method=d.method, target_steps=d.target_steps, lr=d.lr, batch_size=d.batch_size, init="cold")
    raw["distill"]["student"]["lora_rank"] = d.lora_rank
    raw["distill"][d.method]["steps"] = d.steps
    try:
        sp = parse_params(raw)
    except ConfigError as e:
        fail(f"t2i_demo settings: {e}")
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "params.yaml").write_text("# written by `redistill demo --kind text-to-image` from the workspace's params.yaml "
                                     "and its t2i_demo section\n" + yaml.safe_dump(raw, sort_keys=False))
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    teacher = root / "data" / "t2i-teachers" / sp.t2i_teacher.name
    result, timings = _demo_cycle(
        sub, sp, teacher,
        lambda: prepare_t2i(sp.prepare, sub / "data", seed=sp.t2i_teacher.seed, image_size=sp.t2i_teacher.image_size),
        lambda: _train_t2i_teacher(root, sp, teacher), "the `t2i_teacher` recipe (about 45 min on one core)", log)
    name = d.student_name
    if _demo_report("text-to-image", sub, name, teacher, result, timings, as_json):
        return
    typer.echo(f"look: redistill status --workspace {sub} --model {name}")
    typer.echo(f"      redistill export --workspace {sub} --model {name} --alias champion --out t2i-student/  "
               "(a StableDiffusionPipeline folder with the adapter fused in and beside it)")


def _train_t2i_teacher(root: Path, p, out: Path) -> dict:
    """Train the embedded text-to-image teacher into `out` as it was made (redistill/teacher_t2i.py: the captioned
    digits in data/t2i/, the `t2i_teacher` recipe, w chosen with the digits classifier); resumes if killed."""
    from redistill.teachers.text_to_image import train_embedded

    return train_embedded(root, p, out, log=lambda m: typer.echo(m, err=True))


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="CI-sized smoke run: 200 samples, a few dozen optimiser steps per method, no DDPM row."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as one JSON object."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.json, bench.md, quality_vs_nfe.png and one student folder per row (<method>-<steps>/). Default: runs/bench (runs/bench/quick with --quick)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher pipeline folder. Default: data/teachers/<teacher.name>."),
    device: str = typer.Option("cpu", "--device", help="torch device for sampling and timing, e.g. cpu or cuda."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods to bench. Default: all (progressive,consistency,output,adversarial,dmd,rectified); those that do not serve the teacher's kind are skipped and listed."),
    teacher_rows: bool = typer.Option(True, "--teacher-rows/--no-teacher-rows", help="Include the teacher's rows (DDIM/DDPM; a flow-matching teacher's own Euler sampler)."),
    ddpm: bool = typer.Option(True, "--ddpm/--no-ddpm", help="Include the teacher's DDPM row at its full training steps (about 9 minutes on 2 CPU cores)."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Benchmark the teacher (DDIM 10/25/50/100, DDPM 1000) and every method at 1/2/4/8 steps; logs to MLflow."""
    from redistill.ops.bench import run_bench
    from redistill.data.images import DataError
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    teacher = teacher or root / "data" / "teachers" / p.teacher.name
    out = out or root / "runs" / "bench" / ("quick" if quick else "")
    for needed in (root / "data" / "reference", root / "data" / "features", teacher):
        if not needed.exists():
            fail(f"{needed} does not exist; run `redistill demo` (or `dvc repro evaluate`) first")
    try:
        from redistill.config import METHODS

        chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else METHODS
        result = run_bench(root, p, teacher, out, quick=quick, device=device, log=lambda m: typer.echo(m, err=True),
                           methods=chosen, teacher_rows=teacher_rows, ddpm=ddpm)
    except (DataError, PipelineError, ValueError) as e:
        fail(str(e))
    run_id = _log_bench(root, result, out)
    result["mlflow_run_id"] = run_id
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo((out / "bench.md").read_text())
    typer.echo(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'quality_vs_nfe.png'}; "
               f"MLflow run {run_id} in experiment redistill-bench ({result['wall_time_s']:.0f} s)")


def _log_bench(root: Path, result: dict, out: Path) -> str:
    """Log the bench's figures and its three files to MLflow (experiment `redistill-bench`)."""
    from redistill.registry.client import client, tracking_uri

    c = client(tracking_uri(root))
    exp = c.get_experiment_by_name("redistill-bench")
    exp_id = exp.experiment_id if exp else c.create_experiment("redistill-bench")
    run = c.create_run(exp_id, tags={"redistill.bench": "quick" if result["quick"] else "full"})
    rid = run.info.run_id
    for k in ("quick", "num_samples", "reference_steps", "seed", "device", "threads"):
        c.log_param(rid, k, result[k])
    c.log_param(rid, "methods", ",".join(result["methods"]))
    for r in result["rows"]:
        name = ("teacher_" + r["sampler"] if r["kind"] == "teacher" else r["method"]) + f"_{r['steps']}"
        for m in ("fid", "fid_ratio", "kid", "recognisable_share", "psnr_db", "ssim", "latency_ms_p50", "throughput_img_s",
                  "speedup", "peak_mb", "distill_wall_s"):
            if r[m] is not None:
                c.log_metric(rid, f"{name}.{m}", float(r[m]))
        for space, gap in (r.get("fid_gap_floors") or {}).items():
            if gap is not None:
                c.log_metric(rid, f"{name}.fid_gap_floors.{space}", float(gap))
        if r.get("student"):  # the row's student, so it can be judged again or served later
            c.log_artifacts(rid, r["student"], f"students/{Path(r['student']).name}")
    for f in ("bench.json", "bench.md", "quality_vs_nfe.png"):
        c.log_artifact(rid, str(out / f))
    c.set_terminated(rid)
    return rid


def _prefect_env() -> None:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _watch_once(root: Path, p, params: Optional[Path], look: tuple[str, ...] | None = None) -> dict:
    """One look (`look`: only "teachers" or only "batches"; default both). With nothing new it only lists folders:
    no model, no Prefect server."""
    import time

    from redistill.watch.policy import LOOKS, due_episode, load_state, scan

    look = look or LOOKS
    t0 = time.perf_counter()
    try:
        state = load_state(root)
    except ValueError as e:
        fail(str(e))
    found = scan(root, p.watch.settle_seconds, state, look=look)
    due = due_episode(state, time.time(), p.drift.cooldown_hours) if "batches" in look else None
    registered = "teachers" in look and p.watch.teacher_model and _registered_teacher_changed(root, p, state)
    if not found.actionable and due is None and not registered:
        return {"changed": False, "pending": [f.to_dict() for f in found.pending],
                "episode": state.get("episode"), "wall_time_s": round(time.perf_counter() - t0, 3)}
    _prefect_env()
    from redistill.flows.watch import watch as watch_flow

    out = watch_flow(str(root), str(params) if params else None, list(look))
    return {"changed": True, **out, "wall_time_s": round(time.perf_counter() - t0, 3)}


def _registered_teacher_changed(root: Path, p, state: dict) -> bool:
    """Whether watch.teacher_model@teacher_alias points at a version the watch has not handled yet."""
    from redistill.registry.client import alias

    try:
        mv = alias(_registry_client(root), p.watch.teacher_model, p.watch.teacher_alias)
    except Exception as e:  # an unreachable tracking server: say so, do not guess
        fail(f"cannot read the registered teacher {p.watch.teacher_model}@{p.watch.teacher_alias}: {e}")
    return mv is not None and str(mv.version) != state["registry_teachers"].get(p.watch.teacher_model)


def _print_watch(r: dict) -> None:
    if not r["changed"]:
        typer.echo(f"nothing changed ({r['wall_time_s']:.2f} s)")
    for t in r.get("teachers", []):
        line = f"teacher {t['teacher']}: {t['status']}"
        if t.get("reason"):
            line += f" ({t['reason']})"
        if t.get("cycle"):
            c = t["cycle"]
            line += f" → cycle {c['decision']}" + (f", version {c['version']}" if c.get("version") else "")
        typer.echo(line)
    for b in r.get("batches", []):
        line = f"batch {b['batch']}: {'DRIFT' if b['drifted'] else 'no drift'}, {b['action']}"
        o = b.get("outcome")
        if o:
            line += f" → {o['decision']}" + (f", version {o['version']}" if o.get("version") else "")
        typer.echo(line)
        for reason in b.get("reasons", [])[:3]:
            typer.echo(f"    {reason}")
    if r.get("deferred"):
        typer.echo(f"deferred drift episode → {r['deferred']['decision']}")
    for f in r.get("pending", []):
        typer.echo(f"pending {f['kind']} {f['name']}: {f['reason']}")
    if r.get("episode"):
        e = r["episode"]
        typer.echo(f"drift episode open since batch {e['id']} ({len(e['batches'])} drifted batch(es), "
                   f"{e.get('clean_streak', 0)} clean since; action: {e.get('action') or 'deferred by cooldown'})")


@app.command()
def watch(
    once: bool = typer.Option(False, "--once", help="Look once and exit (default: look every watch.interval_minutes)."),
    only: Optional[str] = typer.Option(None, "--only", help="Look only for new `teachers` (data/teachers/) or only for drifted `batches` (data/incoming/); default both."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per look."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Look for new teachers in data/teachers/ and new batches in data/incoming/; start cycles when needed.

    A new teacher (new content hash, complete and settled, passing its integrity checks) starts one cycle
    with trigger=teacher. A batch that drifts opens a drift episode: the champion is re-checked on it and,
    only if it no longer passes the gate, the student is re-distilled on the representative set grown by
    the batch. Nothing new: done in well under a second, with no model loaded and no Prefect server.
    """
    import time

    root, p = _settings(ws, params)
    if only not in (None, "teachers", "batches"):
        fail(f"--only must be teachers or batches, got {only!r}")
    while True:
        r = _watch_once(root, p, params, (only,) if only else None)
        if as_json:
            typer.echo(json.dumps(r, default=str))
        else:
            _print_watch(r)
        if once:
            return
        time.sleep(p.watch.interval_minutes * 60)


@app.command()
def serve(
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Serve two Prefect deployments in this process: `nightly` (cron watch.nightly_cron) and `watch` (every
    watch.interval_minutes). Against a Prefect server when PREFECT_API_URL is set; Ctrl-C stops."""
    from datetime import timedelta

    root, p = _settings(ws, params)
    _prefect_env()
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron, Interval

    from redistill.flows.cycle import nightly
    from redistill.flows.watch import watch as watch_flow

    parameters = {"workspace_dir": str(root), "params_file": str(params.resolve()) if params else None}
    from redistill.tasks.concurrency import server_configured

    if server_configured():
        taken = _worker_deployments(["redistill-nightly/nightly", "redistill-watch/watch"])
        if taken:
            fail(f"{', '.join(taken)} already exist on this Prefect server for a work pool (from `prefect deploy`), "
                 "where a worker runs them. Use one or the other: delete them (`prefect deployment delete NAME`) "
                 "to serve from this process, or keep the worker and skip `redistill serve`")
    prefect_serve(
        nightly.to_deployment(name="nightly", schedule=Cron(p.watch.nightly_cron, timezone=p.watch.timezone),
                              parameters=parameters, tags=["redistill"],
                              description="The nightly re-distillation cycle (trigger=schedule)."),
        watch_flow.to_deployment(name="watch", schedule=Interval(timedelta(minutes=p.watch.interval_minutes)),
                                 parameters=parameters, tags=["redistill"],
                                 description="New teachers and drifted batches."),
    )


def _worker_deployments(names: list[str]) -> list[str]:
    """Those of `names` that exist on the Prefect server with a work pool."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                d = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if d.work_pool_name:
                taken.append(name)
    return taken


@drift_app.command("check")
def drift_check(
    batch: Path = typer.Argument(..., help="A folder of PNG images (one incoming batch)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Representative set. Default: data/representative, else data/reference."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for drift.json and drift.png. Default: runs/drift/<batch>."),
    features: Optional[str] = typer.Option(None, "--features", help="Embedding for the MMD test: auto, a feature space in data/features (classifier, encoder, inception:FILE, clip:DIR, dinov2:DIR), or pixels (no weights: any images). Default: drift.features."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Test one batch for drift (MMD permutation test + Holm-corrected KS tests); exit 1 when it drifted."""
    from redistill.data.images import DataError, safe_name
    from redistill.drift.detect import check_folder
    from redistill.watch.policy import current_data

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
        typer.echo(f"{rep.batch}: {'DRIFT' if rep.drifted else 'no drift'} (MMD p {rep.mmd_p:.4g} on {features}; "
                   f"min Holm KS p {min(v['p_holm'] for v in rep.ks.values()):.4g}; colour-histogram TV "
                   f"{rep.histogram_tv:.3f}; alpha {rep.alpha:g})")
        for r in rep.reasons:
            typer.echo(f"  {r}")
        typer.echo(f"  wrote {out / 'drift.json'} and {out / 'drift.png'}")
    if rep.drifted:
        raise typer.Exit(1)


def _drift_embedding(root: Path, p, features: Optional[str]):
    """(name, embedding) of the drift commands' MMD test: --features, else drift.features; a clear error otherwise."""
    from redistill.drift.detect import PIXELS, embedding

    features = features or p.drift.features
    try:
        return features, embedding(features, root / "data" / "features")
    except ValueError as e:
        fail(f"{e}; drift also takes --features {PIXELS} (no weights: any images)")
    except FileNotFoundError as e:
        fail(str(e))


@drift_app.command("calibrate")
def drift_calibrate(
    splits: Optional[int] = typer.Option(None, "--splits", min=50, help="Reference-against-reference splits (≥ 50). Default: drift.calibration_splits."),
    batches: bool = typer.Option(True, "--batches/--no-batches", help="Also test every batch folder under --incoming (the detection rate)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Image folder split against itself (grey or RGB, any size). Default: data/reference."),
    incoming: Optional[Path] = typer.Option(None, "--incoming", help="Folder of batch folders to test. Default: data/incoming."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Images per pseudo-batch; below half the reference. Default: prepare.batch_size."),
    features: Optional[str] = typer.Option(None, "--features", help="Embedding for the MMD test: auto, a feature space in data/features (classifier, encoder, inception:FILE, clip:DIR, dinov2:DIR), or pixels (no weights: any images). Default: drift.features."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file to write. Default: metrics/drift.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Measure the drift tests' false-alarm rate on reference splits, and which incoming batches they flag."""
    import time

    from redistill.data.images import DataError
    from redistill.drift.detect import calibrate, detect, embed_folder

    root, p = _settings(ws, params)
    reference = reference or root / "data" / "reference"
    incoming = incoming or root / "data" / "incoming"
    t0 = time.perf_counter()
    features, ext = _drift_embedding(root, p, features)
    try:
        feats, stats, shape = embed_folder(reference, ext)
        result = calibrate(feats, stats, batch_size or p.prepare.batch_size, splits or p.drift.calibration_splits,
                           p.drift.alpha, p.drift.permutations, p.drift.seed)
        result.update({"reference": str(reference), "features": features, "batches": {}})
        if batches and incoming.is_dir():
            for b in sorted(x for x in incoming.iterdir() if x.is_dir()):
                b_feats, b_stats, b_shape = embed_folder(b, ext)
                if b_shape != shape:
                    raise ValueError(f"batch {b} holds {b_shape[0]}-channel {b_shape[1]} images, the reference "
                                     f"{shape[0]}-channel {shape[1]}; drift is tested between sets of one shape")
                rep = detect(b.name, feats, stats, b_feats, b_stats, p.drift.alpha, p.drift.permutations, p.drift.seed)
                result["batches"][b.name] = {"drifted": rep.drifted, "mmd_p": rep.mmd_p,
                                             "ks_min_p_holm": min(v["p_holm"] for v in rep.ks.values()),
                                             "reasons": rep.reasons}
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
    typer.echo(f"false alarms: {result['false_alarms']} of {result['splits']} reference splits "
               f"(rate {result['false_alarm_rate']:.3f}, 95% CI {lo:.3f}–{hi:.3f}) at alpha {result['alpha']:g}")
    for name, b in result["batches"].items():
        typer.echo(f"  batch {name}: {'DRIFT' if b['drifted'] else 'no drift'} (MMD p {b['mmd_p']:.4g}, "
                   f"min Holm KS p {b['ks_min_p_holm']:.3g})" + (f": {b['reasons'][0]}" if b["reasons"] else ""))
    if result["batches"]:
        typer.echo(f"flagged batches: {result['flagged_batches']}")
    typer.echo(f"wrote {out} ({result['wall_time_s']:.0f} s)")


def _registry_client(root: Path):
    import os

    from redistill.registry.client import client, tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in our output

    return client(tracking_uri(root))


def _registered_names(c) -> list[str]:
    """Every registered model's name, all pages."""
    names, token = [], None
    while True:
        page = c.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def _model_name(c, p, model: Optional[str]) -> str:
    """The registered model a registry-reading command works on: `--model`, else `registry.student_name`.

    The configured name is always accepted (before the first cycle it is simply not registered yet, as
    today); any other name must be registered, or the command fails here, naming the models that exist,
    before it reads or changes anything."""
    from mlflow.exceptions import MlflowException

    default = p.registry.student_name
    if model is None or model == default:
        return default
    try:
        c.get_registered_model(model)
        return model
    except MlflowException as e:  # only "no such model" is a typo; a failing store is not
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = _registered_names(c)
    have = f"registered models: {', '.join(names)}" if names else "no model is registered yet"
    fail(f"no registered model named {model!r} ({have}); pass one of them to --model, or leave --model out "
         f"for registry.student_name ({default!r})")


def _status_hint(name: str, p) -> str:
    """`redistill status`, with `--model NAME` when the model is not the configured one."""
    return "`redistill status`" if name == p.registry.student_name else f"`redistill status --model {name}`"


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: Optional[str] = ModelOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """The champion, the last ten decisions and the pending triggers (reads the registry and the watch state; starts nothing)."""
    from redistill.registry.client import CHAMPION, PREFIX, PREVIOUS, alias

    root, p = _settings(ws, params)
    c = _registry_client(root)
    name = _model_name(c, p, model)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except Exception:  # no registry yet
        versions = []
    champ, prev = alias(c, name, CHAMPION), alias(c, name, PREVIOUS)
    rows = [{
        "version": str(v.version), "gate": v.tags.get(PREFIX + "gate"), "trigger": v.tags.get(PREFIX + "trigger"),
        "method": v.tags.get(PREFIX + "method"), "steps": v.tags.get(PREFIX + "num_inference_steps"),
        "created": v.creation_timestamp, "key": v.tags.get(PREFIX + "key"),
    } for v in sorted(versions, key=lambda v: int(v.version), reverse=True)[:10]]
    from redistill.watch.policy import load_state, scan

    try:
        state = load_state(root)
        pending = [f.to_dict() for f in scan(root, p.watch.settle_seconds, state).findings]
    except ValueError as e:
        state, pending = {}, [{"kind": "state", "name": "watch", "status": "bad", "reason": str(e)}]
    out = {"model": name, "champion": str(champ.version) if champ else None,
           "previous": str(prev.version) if prev else None, "last_decisions": rows,
           "pending_triggers": pending, "drift_episode": state.get("episode"),
           "current_teacher": state.get("current_teacher")}
    if as_json:
        typer.echo(json.dumps(out))
        return
    from datetime import datetime, timezone

    typer.echo(f"{name}: champion {out['champion'] or '(none)'}, previous {out['previous'] or '(none)'}")
    if not rows:
        typer.echo("no decisions yet: run `redistill cycle` or `make demo`" if name == p.registry.student_name
                   else f"{name} has no versions yet")
    if rows:
        typer.echo(f"  {'version':<8} {'gate':<9} {'created (UTC)':<17} {'trigger':<9} {'method':<12} {'steps':<5} key")
    for r in rows:
        when = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        mark = " *" if r["version"] == out["champion"] else ""
        typer.echo(f"  {'v' + r['version'] + mark:<8} {r['gate'] or '?':<9} {when:<17} {r['trigger'] or '?':<9} "
                   f"{r['method'] or '?':<12} {r['steps'] or '?':<5} {r['key']}")
    if pending:
        typer.echo("pending triggers (`redistill watch --once` handles them):")
        for f in pending:
            typer.echo(f"  {f['kind']} {f['name']}: {f['status']}" + (f" ({f['reason']})" if f["reason"] else ""))
    if out["drift_episode"]:
        e = out["drift_episode"]
        typer.echo(f"drift episode open since batch {e['id']}: {e.get('action') or 'deferred by cooldown'}")


@app.command()
def export(
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist)."),
    alias_name: Optional[str] = typer.Option(None, "--alias", help="Registry alias, e.g. champion or previous."),
    version: Optional[int] = typer.Option(None, "--version", help="Registry version number."),
    model: Optional[str] = ModelOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Write a registered student as a diffusers pipeline folder (DiffusionPipeline.from_pretrained loads it)."""
    import shutil
    import tempfile

    from redistill.registry.client import alias
    from redistill.models.pipelines import PipelineError, check_pipeline_folder

    root, p = _settings(ws, params)
    if (alias_name is None) == (version is None):
        fail("pass exactly one of --alias A or --version N")
    if out.exists():
        fail(f"{out} already exists; exports never overwrite, pick a new --out")
    c = _registry_client(root)
    name = _model_name(c, p, model)
    try:
        mv = alias(c, name, alias_name) if alias_name else c.get_model_version(name, str(version))
    except Exception:
        mv = None
    if mv is None:
        what = f"alias {alias_name!r}" if alias_name else f"version {version}"
        fail(f"{name} has no {what}; {_status_hint(name, p)} lists the versions")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        local = Path(c.download_artifacts(mv.run_id, "student", tmp))
        from redistill.models.lora import is_adapter_only, write_complete

        adapter = is_adapter_only(local)
        try:
            if adapter:  # a LoRA student is registered as its adapter: the folder is rebuilt on its base teacher
                out.parent.mkdir(parents=True, exist_ok=True)
                write_complete(local, out)
            else:
                check_pipeline_folder(local)
        except (PipelineError, ValueError) as e:
            fail(f"version {mv.version}'s student is not a usable pipeline: {e}")
        if not adapter:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, out)
    from redistill.registry.lineage import write_model_card

    write_model_card(c, name, mv, out, root)  # README.md: how to load it, its lineage and its gate's figures
    steps = mv.tags.get("redistill.num_inference_steps")
    own_code = isinstance(json.loads((out / "model_index.json").read_text()).get("_class_name"), list)
    load = f"DiffusionPipeline.from_pretrained('{out}'{', trust_remote_code=True' if own_code else ''})"
    call = f"(class_labels=[0, 1], num_inference_steps={steps})" if own_code else f"(num_inference_steps={steps})"
    sampling = json.loads((out / "redistill_sampling.json").read_text()) if (out / "redistill_sampling.json").is_file() else {}
    if sampling:  # text-to-image: a prompt, and the guidance it was distilled to be sampled at
        call = f"(\"a prompt\", num_inference_steps={steps}, guidance_scale={sampling.get('guidance_scale', 1.0)})"
    typer.echo(f"wrote version {mv.version} of {name} to {out}; sample it with {load}{call}"
               + (f" (its pipeline code is {out}/pipeline_redistill.py; read it before trusting it)" if own_code else "")
               + f"; its model card is {out}/README.md"
               + (f"; its LoRA adapter alone is {out}/pytorch_lora_weights.safetensors: pipe.load_lora_weights('{out}') "
                  "on its base teacher, then this folder's scheduler" if adapter else ""))


def _one_version(c, name: str, alias_name: Optional[str], version: Optional[int]):
    from redistill.registry.lineage import LineageError, resolve_version

    if (alias_name is None) == (version is None):
        fail("pass exactly one of --alias A or --version N")
    try:
        return resolve_version(c, name, version, alias_name)
    except LineageError as e:
        fail(str(e))


@app.command()
def lineage(
    alias_name: Optional[str] = typer.Option(None, "--alias", help="Registry alias, e.g. champion or previous."),
    version: Optional[int] = typer.Option(None, "--version", help="Registry version number."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole chain as one JSON object."),
    model: Optional[str] = ModelOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Which teacher, data, settings, code and flow run made a student, why it ran, and how the gate judged it; and
    where MLflow's own records of it (datasets, the teacher input, the logged model, the summary) are in the MLflow UI."""
    from redistill.registry.lineage import format_lineage
    from redistill.registry.lineage import lineage as chain

    root, p = _settings(ws, params)
    c = _registry_client(root)
    name = _model_name(c, p, model)
    mv = _one_version(c, name, alias_name, version)
    d = chain(c, name, mv, root)
    typer.echo(json.dumps(d, default=str) if as_json else format_lineage(d))


@app.command()
def rollback(
    to: Optional[int] = typer.Option(None, "--to", help="Version to make champion (it must have passed its gate). Default: `previous`."),
    reason: str = typer.Option("", "--reason", help="Why; recorded with who and when."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: Optional[str] = ModelOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Move `champion` back to `previous` (or to --to N), and `previous` to the old champion; recorded as a tag and a run.

    Rolling back twice returns to where it started. A version that was rejected by its gate is refused."""
    import getpass
    import socket

    from redistill.registry.client import RegistryError
    from redistill.registry.client import rollback as move

    root, p = _settings(ws, params)
    c = _registry_client(root)
    name = _model_name(c, p, model)
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        record = move(c, name, None if to is None else str(to), who, reason or "(no reason given)")
    except RegistryError as e:
        fail(str(e))
    from redistill.tasks.registry import _experiment

    record["model"] = name  # the experiment is shared by every model, so its rollback runs say which one moved
    run = c.create_run(_experiment(c, p.registry.experiment, root), run_name=f"rollback-v{record['from']}-to-v{record['to']}",
                       tags={"redistill.kind": "rollback", **{f"redistill.rollback.{k}": v for k, v in record.items()}})
    c.set_terminated(run.info.run_id)
    record["run_id"] = run.info.run_id
    if as_json:
        typer.echo(json.dumps(record))
    else:
        typer.echo(f"champion of {name}: version {record['from']} → {record['to']} "
                   f"(previous is now {record['from']}); recorded by {who} in MLflow run {run.info.run_id}")


@app.command()
def reproduce(
    version: int = typer.Option(..., "--version", help="Registry version to rebuild."),
    out: Optional[Path] = typer.Option(None, "--out", help="Work folder. Default: runs/reproduce/v<N> "
                                       "(runs/reproduce/<model>/v<N> for a --model other than registry.student_name)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: Optional[str] = ModelOpt,
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Re-run a version's distillation and evaluation from its recorded lineage; each figure next to its record."""
    from redistill.data.images import DataError, safe_name
    from redistill.cycle.reproduce import ReproduceError
    from redistill.cycle.reproduce import reproduce as rebuild
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    c = _registry_client(root)
    name = _model_name(c, p, model)
    mv = _one_version(c, name, None, version)
    # another model's version N must not land in (and clear the student of) the configured model's folder
    work = root / "runs" / "reproduce" / ("" if name == p.registry.student_name else safe_name(name)) / f"v{mv.version}"
    try:
        r = rebuild(c, name, mv, root, out or work, log=lambda m: typer.echo(m, err=True))
    except (ReproduceError, DataError, PipelineError, FileNotFoundError) as e:
        fail(f"cannot reproduce version {mv.version}: {e}")
    if as_json:
        typer.echo(json.dumps(r, default=str))
        return
    typer.echo(f"version {r['version']} of {name} rebuilt from its lineage in {r['wall_time_s']:.0f} s "
               f"(teacher {r['teacher']}; data from the {r['data_source']})")
    if not r["same_code"]:
        typer.echo(f"  note: recorded code {r['code_then']}, running {r['code_now']}")
    typer.echo(f"  {'metric':<20} {'recorded':>12} {'now':>12}  recorded 95% CI       verdict")
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    for row in r["rows"]:
        ci = row["recorded_ci95"]
        verdict = "no CI recorded" if row["within_ci"] is None else ("within CI" if row["within_ci"] else "OUTSIDE CI")
        ci_s = "" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"
        typer.echo(f"  {row['metric']:<20} {fmt(row['recorded']):>12} {fmt(row['new']):>12}  {ci_s:<20}  {verdict}")
    typer.echo(f"  {'all recorded CIs hold' if r['all_within_ci'] else 'SOME FIGURES FELL OUTSIDE THEIR RECORDED CI'}; "
               f"wrote {r['out_dir']}/reproduce.json")


def _version_metrics(root: Path, run_id: str) -> dict | None:
    from redistill.registry.lineage import artifact_json

    return artifact_json(_registry_client(root), run_id, "evaluation/metrics.json")  # None before evaluation


def _comparison_table(m: dict) -> str:
    q, f, s, mem = m["quality"], m["fidelity"], m["speed"], m["memory"]
    ref, cand = f"teacher@{m['reference']['steps']}", f"student@{m['steps']}"
    psnr = "identical" if f["psnr_db"] is None else f"{f['psnr_db']:.2f} dB"
    rows = [
        ("FID (95% CI)", f"{q['reference_fid']:.3f} [{q['reference_fid_ci95'][0]:.3f}, {q['reference_fid_ci95'][1]:.3f}]",
         f"{q['fid']:.3f} [{q['fid_ci95'][0]:.3f}, {q['fid_ci95'][1]:.3f}]"),
        ("KID", f"{q['reference_kid']:.4f}", f"{q['kid']:.4f}"),
        *[(f"FID gap [{name}]", f"floor {sq['fid_floor']:.3f}",
           f"{sq['fid_gap']:+.3f} [{sq['fid_gap_ci95'][0]:+.3f}, {sq['fid_gap_ci95'][1]:+.3f}] = {_floors(sq)} floors")
          for name, sq in q.get("spaces", {}).items()],
        ("recognisable", f"{q.get('reference_recognisable_share', float('nan')):.3f}", f"{q.get('recognisable_share', float('nan')):.3f}"),
        *([("prompt adherence", f"{q['reference_prompt_adherence']:.3f}",
            f"{q['prompt_adherence']:.3f} ({-q['prompt_adherence_gap_points']:+.1f} points)")] if "prompt_adherence" in q else []),
        *([("UNet passes per step", f"{s['reference_unet_passes_per_step']}", f"{s['unet_passes_per_step']}"),
           ("VAE decode (in the latency)", "", f"{s['vae_decode_ms_p50']:.1f} ms")] if "vae_decode_ms_p50" in s else []),
        ("PSNR / SSIM to teacher", "—", f"{psnr} / {f['ssim']:.3f}"),
        ("latency p50 (batch 1)", f"{s['reference_latency_ms_p50']:.1f} ms", f"{s['latency_ms_p50']:.1f} ms"),
        (f"throughput (batch {s['throughput_batch']})", f"{s['reference_throughput_img_s']:.0f} img/s",
         f"{s['throughput_img_s']:.0f} img/s (×{s['speedup_throughput']:.1f})"),
        ("peak sampling memory", "—" if mem["reference_peak_sampling_mb"] is None else f"{mem['reference_peak_sampling_mb']:.0f} MB",
         f"{mem['peak_sampling_mb']:.0f} MB"),
        ("parameters", f"{mem['reference_params']:,}", f"{mem['params']:,}"),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows + [("", ref, "")])
    lines = [f"{'':<{w0}}  {ref:<{w1}}  {cand}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


@stack_app.command("up")
def stack_up(
    as_json: bool = typer.Option(False, "--json", help="Print the client environment as one JSON object of variables (progress goes to stderr)."),
    ws: Optional[Path] = WorkspaceOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Start what of the stack is not running (PostgreSQL, MLflow server, Prefect server, work pool, workers, DVC
    remote) and print the environment to export; a failure stops what this call started."""
    from redistill.ops.stack import StackError, up

    root, p = _settings(ws, params)
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    try:
        state = up(root, p.stack, log=log)
    except StackError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: what this call started was stopped")
    if as_json:
        typer.echo(json.dumps(state["env"]))
        return
    typer.echo("")
    for k, v in state["env"].items():
        typer.echo(f"export {k}={v}")
    typer.echo(f"# then: prefect deploy --all (work pool {p.stack.work_pool}); redistill cycle, status, lineage ... "
               "talk to the servers; redistill stack down stops them")


@stack_app.command("down")
def stack_down(ws: Optional[Path] = WorkspaceOpt) -> None:
    """Stop the stack's workers, servers and PostgreSQL; the databases, artifacts and DVC remote stay."""
    from redistill.config import workspace as _workspace
    from redistill.ops.stack import StackError, down

    try:
        down(_workspace(ws), log=typer.echo)
    except StackError as e:
        fail(str(e))


@stack_app.command("status")
def stack_status(
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
    ws: Optional[Path] = WorkspaceOpt,
) -> None:
    """Each service of the stack: running or not, pid, port, URL, health and log; exits 1 unless all are up."""
    from redistill.config import workspace as _workspace
    from redistill.ops.stack import StackError, status

    try:
        st = status(_workspace(ws))
    except StackError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(st))
    else:
        if not st["services"]:
            typer.echo("no stack in this workspace: redistill stack up starts one")
        for name, v in st["services"].items():
            state = "running" if v["running"] else "stopped"
            if v["running"] and v.get("healthy") is False:
                state = "running, not answering"
            typer.echo(f"{name:10s} {state:24s} {v.get('url') or ''}  pid {v.get('pid') or '-'}  log {v.get('log')}")
        if st.get("dvc_remote"):
            typer.echo(f"{'dvc':10s} {'remote':24s} {st['dvc_remote']}")
    raise typer.Exit(0 if st["up"] else 1)

