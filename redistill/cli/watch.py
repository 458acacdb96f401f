"""`redistill watch` and `serve`: look for new teachers and drifted batches, once or on a schedule."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _settings, fail


def watch_once(root: Path, p, params: Path | None, look: tuple[str, ...] | None = None) -> dict:
    """One look (`look`: only "teachers" or only "batches"; default both). With nothing new it only lists folders:
    no model, no Prefect server."""
    import time

    from redistill.watch.look import LookFailed, quick_look
    from redistill.watch.scan import LOOKS

    look = look or LOOKS
    t0 = time.perf_counter()
    try:
        quiet = quick_look(root, p, look)
    except LookFailed as e:
        fail(str(e))
    if quiet is not None:
        return {**quiet, "wall_time_s": round(time.perf_counter() - t0, 3)}
    from redistill.core.env import quiet_prefect

    quiet_prefect()
    from redistill.flows.watch import watch as watch_flow

    out = watch_flow(str(root), str(params) if params else None, list(look))
    return {"changed": True, **out, "wall_time_s": round(time.perf_counter() - t0, 3)}


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
        typer.echo(
            f"drift episode open since batch {e['id']} ({len(e['batches'])} drifted batch(es), "
            f"{e.get('clean_streak', 0)} clean since; action: {e.get('action') or 'deferred by cooldown'})"
        )


def watch(
    once: bool = typer.Option(False, "--once", help="Look once and exit (default: look every watch.interval_minutes)."),
    only: str | None = typer.Option(
        None,
        "--only",
        help="Look only for new `teachers` (data/teachers/) or only for drifted `batches` (data/incoming/); default both.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per look."),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
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
        r = watch_once(root, p, params, (only,) if only else None)
        if as_json:
            typer.echo(json.dumps(r, default=str))
        else:
            _print_watch(r)
        if once:
            return
        time.sleep(p.watch.interval_minutes * 60)


def serve(
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Serve two Prefect deployments in this process: `nightly` (cron watch.nightly_cron) and `watch` (every
    watch.interval_minutes). Against a Prefect server when PREFECT_API_URL is set; Ctrl-C stops."""
    from redistill.core.env import quiet_prefect

    root, p = _settings(ws, params)
    quiet_prefect()
    from redistill.flows.serve import AlreadyDeployed
    from redistill.flows.serve import serve as serve_deployments

    try:
        serve_deployments(root, p, params)
    except AlreadyDeployed as e:
        fail(str(e))
