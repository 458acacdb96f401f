"""`redistill teacher …`: train the embedded teachers, or fine-tune one into a new teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _settings, echo_err, fail

teacher_app = typer.Typer(
    help="The teacher: train the embedded teachers (the default DDPM, the flow-matching and the text-to-image one), or fine-tune one into a new teacher.",
    no_args_is_help=True,
)


@teacher_app.command("train")
def teacher_train(
    out: Path | None = typer.Option(
        None, "--out", help="Pipeline folder to write. Default: data/teachers/<teacher.name>. Must not exist."
    ),
    data: Path | None = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Train a teacher with the `teacher` recipe: a DDPM (UNet2DModel + DDPMScheduler, ε, EMA) or, with
    teacher.objective flow_matching, a flow-matching one; resumes if killed."""
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.train import train_in_workspace

    root, p = _settings(ws, params)
    out = out or root / "data" / "teachers" / p.teacher.name
    try:
        summary = train_in_workspace(root, p.teacher, out, data or root / "data" / "reference", log=echo_err)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"teacher saved to {out} ({summary['train_steps']} steps in {summary['train_time_s']:.0f}s)")


@teacher_app.command("flow")
def teacher_flow(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Pipeline folder to write. Default: data/flow-teachers/<flow_teacher.name> (outside data/teachers/, where the watch would take it as a new teacher for the workspace's method). Must not exist.",
    ),
    data: Path | None = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Train the flow-matching teacher (velocity on the straight path, FlowMatchEulerDiscreteScheduler, saved as a
    stock DDPMPipeline folder): the `teacher` recipe with the `flow_teacher` overrides; resumes if killed."""
    import dataclasses

    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.train import train_in_workspace

    root, p = _settings(ws, params)
    f = p.flow_teacher
    out = out or root / "data" / "flow-teachers" / f.name
    recipe = dataclasses.replace(
        p.teacher,
        objective="flow_matching",
        name=f.name,
        train_steps=f.train_steps,
        shift=f.shift,
        ema_decay=f.ema_decay,
        seed=f.seed,
        class_conditional=False,
    )
    try:
        summary = train_in_workspace(root, recipe, out, data or root / "data" / "reference", log=echo_err)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(
        f"flow-matching teacher saved to {out} ({summary['train_steps']} steps in {summary['train_time_s']:.0f}s)"
    )


@teacher_app.command("text-to-image")
def teacher_text_to_image(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Pipeline folder to write. Default: data/t2i-teachers/<t2i_teacher.name> (outside data/teachers/, where the watch would take it as a new teacher for the workspace's method). Must not exist.",
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Train the embedded latent text-to-image teacher (a StableDiffusionPipeline: CLIP tokenizer and text encoder,
    AutoencoderKL, UNet2DConditionModel) on the captioned digits: the `t2i_teacher` recipe; resumes if killed."""
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.text_to_image import train_embedded

    root, p = _settings(ws, params)
    out = out or root / "data" / "t2i-teachers" / p.t2i_teacher.name
    if (out / "model_index.json").is_file():
        fail(f"{out} already holds a teacher; pass another --out, or remove it to train it again")
    try:
        summary = train_embedded(root, p, out, log=echo_err)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(
        f"text-to-image teacher saved to {out} ({summary['train_steps']} UNet steps in {summary['train_time_s']:.0f}s, "
        f"guidance_scale {summary['guidance_scale']})"
    )


def _transformer_teacher(layout: str, out: Path | None, ws: Path | None, params: Path | None) -> None:
    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.transformer import train_embedded

    root, p = _settings(ws, params)
    out = out or root / "data" / f"{layout}-teachers" / getattr(p, f"{layout}_teacher").name
    if (out / "model_index.json").is_file():
        fail(f"{out} already holds a teacher; pass another --out, or remove it to train it again")
    try:
        summary = train_embedded(layout, root, p, out, log=echo_err)
    except (DataError, PipelineError, ValueError) as e:
        fail(str(e))
    typer.echo(
        f"{layout} teacher saved to {out} ({summary['train_steps']} steps in {summary['train_time_s']:.0f}s, "
        f"guidance_scale {summary['guidance_scale']})"
    )


@teacher_app.command("dit")
def teacher_dit(
    out: Path | None = typer.Option(
        None, "--out", help="Pipeline folder to write. Default: data/dit-teachers/<dit_teacher.name>. Must not exist."
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Train the embedded class-conditional DiT teacher (a DiTPipeline on the embedded text-to-image teacher's VAE)
    on the labelled digits: the `dit_teacher` recipe; resumes if killed."""
    _transformer_teacher("dit", out, ws, params)


@teacher_app.command("sd3")
def teacher_sd3(
    out: Path | None = typer.Option(
        None, "--out", help="Pipeline folder to write. Default: data/sd3-teachers/<sd3_teacher.name>. Must not exist."
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Train the embedded text-to-image SD3-layout teacher (a StableDiffusion3Pipeline: two CLIP text encoders, no T5,
    an SD3Transformer2DModel, rectified flow) on the captioned digits: the `sd3_teacher` recipe; resumes if killed."""
    _transformer_teacher("sd3", out, ws, params)


@teacher_app.command("finetune")
def teacher_finetune(
    start: Path | None = typer.Option(
        None, "--from", help="Teacher to fine-tune. Default: data/teachers/<teacher.name>."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Pipeline folder to write. Default: data/teachers/<finetune.name>. Must not exist."
    ),
    data: Path | None = typer.Option(None, "--data", help="Training images. Default: data/reference."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Make a new teacher by training an existing one `finetune.steps` more steps (the teacher recipe, another seed)."""
    import dataclasses

    from redistill.data.base import DataError
    from redistill.models.pipelines import PipelineError
    from redistill.teachers.train import train_in_workspace

    root, p = _settings(ws, params)
    start = start or root / "data" / "teachers" / p.teacher.name
    out = out or root / "data" / "teachers" / p.finetune.name
    f = p.finetune
    recipe = dataclasses.replace(
        p.teacher,
        train_steps=f.steps,
        lr=f.lr,
        warmup_steps=f.warmup_steps,
        seed=f.seed,
        name=out.name,
        checkpoint_every=max(1, min(p.teacher.checkpoint_every, f.steps // 3)),
    )
    try:
        summary = train_in_workspace(root, recipe, out, data or root / "data" / "reference", log=echo_err, init=start)
    except (DataError, PipelineError) as e:
        fail(str(e))
    typer.echo(f"fine-tuned teacher saved to {out} ({f.steps} steps from {start}, {summary['train_time_s']:.0f}s)")
