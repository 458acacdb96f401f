"""What every command shares: the common options, one-line errors, the settings, and number formatting."""

from __future__ import annotations

from pathlib import Path

import typer

from redistill.config import ConfigError, load_params, workspace

WorkspaceOpt = typer.Option(
    None,
    "--workspace",
    help="Workspace folder (data/, MLflow store, runs). Default: $REDISTILL_HOME or the current folder.",
)
ParamsOpt = typer.Option(None, "--params", help="Settings file. Default: params.yaml in the workspace.")
StepsOpt = typer.Option(None, "--steps", help="The student's sampling steps (overrides distill.target_steps).")
ModelOpt = typer.Option(
    None, "--model", metavar="NAME", help="Registered model to read (default: registry.student_name in params.yaml)."
)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def echo_err(message: str) -> None:
    """Progress on stderr, so stdout holds only the command's result."""
    typer.echo(message, err=True)


def _relative(path: str, root: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _floors(q: dict) -> str:
    """The FID gap in floor units with its CI half-width, e.g. '0.21 ± 0.06'."""
    if q.get("fid_gap_floors") is None:
        return "n/a"
    return f"{q['fid_gap_floors']:.2f} ± {q['fid_gap_halfwidth_floors']:.2f}"


def _settings(ws: Path | None, params: Path | None):
    root = workspace(ws)
    try:
        p = load_params(params, root)
    except ConfigError as e:
        fail(str(e))
    from redistill.registry.client import configure_http

    configure_http(p.registry.http_retries, p.registry.http_timeout_s)  # a tracking server that went away
    return root, p  # costs bounded retries, not MLflow's minutes per request


def _with_method(p, method: str | None, steps: int | None = None):
    """The settings with --method and --steps (distill.target_steps) applied."""
    from redistill.config.overrides import with_method

    try:
        return with_method(p, method, steps)
    except ConfigError as e:
        fail(str(e))


def _check_method(p) -> None:
    """Refuse settings the method cannot serve before anything runs."""
    from redistill.methods import method_config

    try:
        method_config(p.distill)
    except ValueError as e:
        fail(f"distill settings: {e}")
