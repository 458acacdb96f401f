"""`redistill stack …`: the production shape on one machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _settings, echo_err, fail

stack_app = typer.Typer(
    help="The production shape on one machine: PostgreSQL, an MLflow server (artifacts proxied) and a Prefect server on it, a process work pool with workers, a DVC remote (the `stack` settings; data under <workspace>/stack/).",
    no_args_is_help=True,
)


@stack_app.command("up")
def stack_up(
    as_json: bool = typer.Option(
        False, "--json", help="Print the client environment as one JSON object of variables (progress goes to stderr)."
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Start what of the stack is not running (PostgreSQL, MLflow server, Prefect server, work pool, workers, DVC
    remote) and print the environment to export; a failure stops what this call started."""
    from redistill.ops.servers import StackError
    from redistill.ops.stack import up

    root, p = _settings(ws, params)
    log = echo_err if as_json else typer.echo
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
    typer.echo(
        f"# then: prefect deploy --all (work pool {p.stack.work_pool}); redistill cycle, status, lineage ... "
        "talk to the servers; redistill stack down stops them"
    )


@stack_app.command("down")
def stack_down(ws: Path | None = WorkspaceOpt) -> None:
    """Stop the stack's workers, servers and PostgreSQL; the databases, artifacts and DVC remote stay."""
    from redistill.config import workspace as _workspace
    from redistill.ops.servers import StackError
    from redistill.ops.stack import down

    try:
        down(_workspace(ws), log=typer.echo)
    except StackError as e:
        fail(str(e))


@stack_app.command("status")
def stack_status(
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
    ws: Path | None = WorkspaceOpt,
) -> None:
    """Each service of the stack: running or not, pid, port, URL, health and log; exits 1 unless all are up."""
    from redistill.config import workspace as _workspace
    from redistill.ops.servers import StackError
    from redistill.ops.stack import status

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
