"""The `redistill` command line (typer): one module per command group; each command parses its options, calls the
library and prints. Heavy imports happen inside the commands so `--help` is fast."""

from __future__ import annotations

import os

import typer

from redistill.cli import bench, champion, cycle, data, demo, distill, registry, watch
from redistill.cli.drift import drift_app
from redistill.cli.stack import stack_app
from redistill.cli.teacher import teacher_app

# Against a tracking server MLflow prints "View run … at: http://…" to stdout whenever a run ends, which broke the
# one JSON object `--json` promises (`rollback --json` against `redistill stack`); the commands say what they did.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

app = typer.Typer(
    help="redistill: continuous re-distillation of pre-trained diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(teacher_app, name="teacher")
app.add_typer(drift_app, name="drift")
app.add_typer(stack_app, name="stack")
for command in (
    data.prepare,
    data.features,
    distill.evaluate,
    champion.champion,
    champion.calibrate,
    data.validate,
    distill.distill,
    cycle.cycle,
    demo.demo,
    bench.bench,
    watch.watch,
    watch.serve,
    registry.status,
    registry.export,
    registry.lineage,
    registry.rollback,
    registry.reproduce,
):
    app.command()(command)


def main() -> None:  # pragma: no cover - console entry point
    """The console entry point (`python -m redistill`)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
