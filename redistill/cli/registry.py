"""`redistill status`, `export`, `lineage`, `rollback` and `reproduce`: read and move the registry."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ModelOpt, ParamsOpt, WorkspaceOpt, _settings, echo_err, fail


def _model(root: Path, p, model: str | None):
    """(registry client, the model a command works on: --model, else registry.student_name)."""
    from redistill.registry.queries import UnknownModel, model_name, registry_client

    c = registry_client(root)
    try:
        return c, model_name(c, p.registry.student_name, model)
    except UnknownModel as e:
        fail(str(e))


def _status_hint(name: str, p) -> str:
    """`redistill status`, with `--model NAME` when the model is not the configured one."""
    return "`redistill status`" if name == p.registry.student_name else f"`redistill status --model {name}`"


def _one_version(c, name: str, alias_name: str | None, version: int | None):
    from redistill.registry.lineage import LineageError, resolve_version

    if (alias_name is None) == (version is None):
        fail("pass exactly one of --alias A or --version N")
    try:
        return resolve_version(c, name, version, alias_name)
    except LineageError as e:
        fail(str(e))


def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: str | None = ModelOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """The champion, the last ten decisions and the pending triggers (reads the registry and the watch state; starts nothing)."""
    from redistill.registry.queries import last_decisions
    from redistill.watch.look import pending_triggers

    root, p = _settings(ws, params)
    c, name = _model(root, p, model)
    d = last_decisions(c, name)
    rows = d["rows"]
    pending, state = pending_triggers(root, p)
    out = {
        "model": name,
        "champion": d["champion"],
        "previous": d["previous"],
        "last_decisions": rows,
        "pending_triggers": pending,
        "drift_episode": state.get("episode"),
        "current_teacher": state.get("current_teacher"),
    }
    if as_json:
        typer.echo(json.dumps(out))
        return
    from datetime import datetime, timezone

    typer.echo(f"{name}: champion {out['champion'] or '(none)'}, previous {out['previous'] or '(none)'}")
    if not rows:
        typer.echo(
            "no decisions yet: run `redistill cycle` or `make demo`"
            if name == p.registry.student_name
            else f"{name} has no versions yet"
        )
    if rows:
        typer.echo(f"  {'version':<8} {'gate':<9} {'created (UTC)':<17} {'trigger':<9} {'method':<12} {'steps':<5} key")
    for r in rows:
        when = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        mark = " *" if r["version"] == out["champion"] else ""
        typer.echo(
            f"  {'v' + r['version'] + mark:<8} {r['gate'] or '?':<9} {when:<17} {r['trigger'] or '?':<9} "
            f"{r['method'] or '?':<12} {r['steps'] or '?':<5} {r['key']}"
        )
    if pending:
        typer.echo("pending triggers (`redistill watch --once` handles them):")
        for f in pending:
            typer.echo(f"  {f['kind']} {f['name']}: {f['status']}" + (f" ({f['reason']})" if f["reason"] else ""))
    if out["drift_episode"]:
        e = out["drift_episode"]
        typer.echo(f"drift episode open since batch {e['id']}: {e.get('action') or 'deferred by cooldown'}")


def export(
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist)."),
    alias_name: str | None = typer.Option(None, "--alias", help="Registry alias, e.g. champion or previous."),
    version: int | None = typer.Option(None, "--version", help="Registry version number."),
    model: str | None = ModelOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Write a registered student as a diffusers pipeline folder (DiffusionPipeline.from_pretrained loads it)."""
    from redistill.registry.client import alias
    from redistill.registry.export import export_version

    root, p = _settings(ws, params)
    if (alias_name is None) == (version is None):
        fail("pass exactly one of --alias A or --version N")
    if out.exists():
        fail(f"{out} already exists; exports never overwrite, pick a new --out")
    c, name = _model(root, p, model)
    try:
        mv = alias(c, name, alias_name) if alias_name else c.get_model_version(name, str(version))
    except Exception:
        mv = None
    if mv is None:
        what = f"alias {alias_name!r}" if alias_name else f"version {version}"
        fail(f"{name} has no {what}; {_status_hint(name, p)} lists the versions")
    try:
        e = export_version(c, name, mv, out, root)
    except ValueError as err:
        fail(str(err))
    steps, own_code, adapter = e["steps"], e["own_code"], e["adapter"]
    load = f"DiffusionPipeline.from_pretrained('{out}'{', trust_remote_code=True' if own_code else ''})"
    call = f"(class_labels=[0, 1], num_inference_steps={steps})" if own_code else f"(num_inference_steps={steps})"
    if e["sampling"]:  # text-to-image: a prompt, and the guidance it was distilled to be sampled at (DiT: labels)
        what = "class_labels=[0, 1]" if "num_classes" in e["sampling"] else '"a prompt"'
        call = f"({what}, num_inference_steps={steps}, guidance_scale={e['sampling'].get('guidance_scale', 1.0)})"
    from redistill.models.adapter_files import LORA_WEIGHTS, has_lora_loader  # torch: only when exporting

    how = f"pipe.load_lora_weights('{out}')" if adapter and has_lora_loader(out) else "peft (docs/teachers.md)"
    typer.echo(
        f"wrote version {mv.version} of {name} to {out}; sample it with {load}{call}"
        + (f" (its pipeline code is {out}/pipeline_redistill.py; read it before trusting it)" if own_code else "")
        + f"; its model card is {out}/README.md"
        + (f"; its LoRA adapter alone is {out}/{LORA_WEIGHTS}: {how} on its base teacher" if adapter else "")
        + (", then this folder's scheduler" if adapter else "")
    )


def lineage(
    alias_name: str | None = typer.Option(None, "--alias", help="Registry alias, e.g. champion or previous."),
    version: int | None = typer.Option(None, "--version", help="Registry version number."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole chain as one JSON object."),
    model: str | None = ModelOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Which teacher, data, settings, code and flow run made a student, why it ran, and how the gate judged it; and
    where MLflow's own records of it (datasets, the teacher input, the logged model, the summary) are in the MLflow UI."""
    from redistill.registry.lineage import format_lineage
    from redistill.registry.lineage import lineage as chain

    root, p = _settings(ws, params)
    c, name = _model(root, p, model)
    mv = _one_version(c, name, alias_name, version)
    d = chain(c, name, mv, root)
    typer.echo(json.dumps(d, default=str) if as_json else format_lineage(d))


def rollback(
    to: int | None = typer.Option(
        None, "--to", help="Version to make champion (it must have passed its gate). Default: `previous`."
    ),
    reason: str = typer.Option("", "--reason", help="Why; recorded with who and when."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: str | None = ModelOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Move `champion` back to `previous` (or to --to N), and `previous` to the old champion; recorded as a tag and a run.

    Rolling back twice returns to where it started. A version that was rejected by its gate is refused."""
    import getpass
    import socket

    from redistill.registry.client import RegistryError
    from redistill.registry.client import rollback as move
    from redistill.registry.queries import record_rollback

    root, p = _settings(ws, params)
    c, name = _model(root, p, model)
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        record = move(c, name, None if to is None else str(to), who, reason or "(no reason given)")
    except RegistryError as e:
        fail(str(e))
    record["model"] = name  # the experiment is shared by every model, so its rollback runs say which one moved
    record["run_id"] = run_id = record_rollback(c, p.registry.experiment, root, record)
    if as_json:
        typer.echo(json.dumps(record))
    else:
        typer.echo(
            f"champion of {name}: version {record['from']} → {record['to']} "
            f"(previous is now {record['from']}); recorded by {who} in MLflow run {run_id}"
        )


def reproduce(
    version: int = typer.Option(..., "--version", help="Registry version to rebuild."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Work folder. Default: runs/reproduce/v<N> "
        "(runs/reproduce/<model>/v<N> for a --model other than registry.student_name).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    model: str | None = ModelOpt,
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """Re-run a version's distillation and evaluation from its recorded lineage; each figure next to its record."""
    from redistill.cycle.reproduce import ReproduceError
    from redistill.cycle.reproduce import reproduce as rebuild
    from redistill.data.base import DataError
    from redistill.data.images import safe_name
    from redistill.models.pipelines import PipelineError

    root, p = _settings(ws, params)
    c, name = _model(root, p, model)
    mv = _one_version(c, name, None, version)
    # another model's version N must not land in (and clear the student of) the configured model's folder
    work = root / "runs" / "reproduce" / ("" if name == p.registry.student_name else safe_name(name)) / f"v{mv.version}"
    try:
        r = rebuild(c, name, mv, root, out or work, log=echo_err)
    except (ReproduceError, DataError, PipelineError, FileNotFoundError) as e:
        fail(f"cannot reproduce version {mv.version}: {e}")
    if as_json:
        typer.echo(json.dumps(r, default=str))
        return
    typer.echo(
        f"version {r['version']} of {name} rebuilt from its lineage in {r['wall_time_s']:.0f} s "
        f"(teacher {r['teacher']}; data from the {r['data_source']})"
    )
    if not r["same_code"]:
        typer.echo(f"  note: recorded code {r['code_then']}, running {r['code_now']}")
    typer.echo(f"  {'metric':<20} {'recorded':>12} {'now':>12}  recorded 95% CI       verdict")
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    for row in r["rows"]:
        ci = row["recorded_ci95"]
        verdict = "no CI recorded" if row["within_ci"] is None else ("within CI" if row["within_ci"] else "OUTSIDE CI")
        ci_s = "" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"
        typer.echo(f"  {row['metric']:<20} {fmt(row['recorded']):>12} {fmt(row['new']):>12}  {ci_s:<20}  {verdict}")
    typer.echo(
        f"  {'all recorded CIs hold' if r['all_within_ci'] else 'SOME FIGURES FELL OUTSIDE THEIR RECORDED CI'}; "
        f"wrote {r['out_dir']}/reproduce.json"
    )
