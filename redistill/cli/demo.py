"""`redistill demo`: the loop on the embedded digits, one cold cycle, or a latent demo (text-to-image, DiT, SD3); prints what
redistill.cycle.demo did."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from redistill.cli.common import ParamsOpt, WorkspaceOpt, _floors, _settings, _with_method, echo_err, fail
from redistill.cli.cycle import print_decision, run_cycle


def demo(
    kind: str = typer.Option(
        "digits",
        "--kind",
        help="digits (the default: the continuous loop on the embedded digits); text-to-image (the embedded latent text-to-image UNet teacher and an LCM-LoRA student); dit (the embedded class-conditional DiT and an LCM-LoRA student, injected by peft); sd3 (the embedded SD3-layout MMDiT and an LCM-LoRA student). The latent kinds run in their own workspace runs/demo-<kind>.",
    ),
    cold: bool = typer.Option(
        False,
        "--cold",
        help="Instead of the loop: one cold cycle of demo.cold_method (progressive) from the committed teacher, about 7 minutes.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as one JSON object (the model, versions, decisions and figures)."
    ),
    ws: Path | None = WorkspaceOpt,
    params: Path | None = ParamsOpt,
) -> None:
    """The main job on the embedded digits: the committed champion is registered (version 1, through the real
    evaluation and gate), a fine-tuned teacher lands in data/teachers/, the watch finds it, a warm re-distillation
    from the champion is judged against the new teacher and the champion, and promoted or rejected."""
    from redistill.cycle.demo import LATENT_DEMOS, DemoStopped, demo_cycle, demo_loop
    from redistill.data.digits import prepare as build
    from redistill.teachers.train import train_in_workspace

    if kind not in ("digits", *LATENT_DEMOS):
        fail(f"--kind must be digits, {', '.join(LATENT_DEMOS)}; got {kind!r}")
    root, p = _settings(ws, params)
    if kind in LATENT_DEMOS:
        return _demo_latent(kind, root, p, as_json)
    teacher = root / "data" / "teachers" / p.teacher.name
    log = echo_err if as_json else typer.echo
    prepare, train = (
        lambda: build(p.prepare, root / "data"),
        lambda: train_in_workspace(root, p.teacher, teacher, root / "data" / "reference", log=echo_err),
    )
    recipe = "the `teacher` recipe (about 30 min on 2 cores)"
    cycle = lambda ws, sp, t, data, trigger, student: run_cycle(ws, sp, t, data, trigger, False, student)  # noqa: E731
    if not cold:
        from redistill.cli.watch import watch_once

        try:
            r = demo_loop(
                root,
                p,
                teacher,
                prepare,
                train,
                recipe,
                log,
                echo_err,
                cycle,
                lambda: watch_once(root, p, params, ("teachers",)),
            )
        except DemoStopped as e:
            if e.message:
                fail(e.message, e.code)
            raise typer.Exit(e.code) from None
        return _print_loop(r, as_json)
    p = _with_method(p, p.demo.cold_method, p.demo.cold_steps)
    result, timings = demo_cycle(root, p, teacher, prepare, train, recipe, log, cycle)
    if _demo_report("digits", root, p.registry.student_name, teacher, result, timings, as_json):
        return
    _demo_next(root, p.registry.student_name)


def _print_loop(r: dict, as_json: bool) -> None:
    """The demo loop's outcome: one JSON object, or each version's table, the decision and the time per step."""
    if as_json:
        typer.echo(json.dumps(r, default=str))
        return
    name, versions, timings = r["model"], r["versions"], r["timings_s"]
    for v in versions:
        typer.echo("")
        typer.echo(
            f"version {v['version']} of {name}: {v['gate']} ({v['trigger']}, init {v['init']}), "
            f"teacher {v['teacher']}"
            + (", champion" if v["champion"] else "")
            + (", previous" if v["previous"] else "")
        )
        if v.get("metrics"):
            typer.echo(comparison_table(v["metrics"]))
        if v["gate"] != "passed":
            typer.echo(f"  gate: {v['reasons']}")
    typer.echo("")
    newest = versions[-1] if versions else None
    if newest is not None:
        typer.echo(
            f"decision: {'promoted' if newest['gate'] == 'passed' else 'rejected'}, version {newest['version']} "
            f"of {name} (init {newest['init']})"
        )
    typer.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    _demo_next(Path(r["workspace"]), name)


def _demo_next(root: Path, name: str) -> None:
    """Where to look after a demo."""
    from redistill.registry.client import champion, tracking_uri
    from redistill.registry.queries import registry_client

    champ = champion(registry_client(root), name)
    typer.echo(f"look: mlflow ui --backend-store-uri {tracking_uri(root)}  →  Models → {name}")
    if champ is None:
        typer.echo("      no champion: the gate lines above say why")
        return
    typer.echo(
        f"      redistill lineage --alias champion  (version {champ.version}: which teacher, which data, which code)"
    )
    typer.echo("      redistill rollback  (champion back to the previous version; who, when and why are recorded)")
    typer.echo(
        "      redistill export --alias champion --out student/  (a stock diffusers pipeline folder with its model card)"
    )
    typer.echo(
        f"      mlflow models serve -m models:/{name}@champion -p 5001  (MLFLOW_TRACKING_URI={tracking_uri(root)})"
    )


def _demo_report(kind: str, ws: Path, name: str, teacher: Path, result: dict, timings: dict, as_json: bool) -> bool:
    """Print a demo's outcome: one JSON object (returns True), or the decision, the teacher-vs-student table and
    the time per step (returns False: the caller adds where to look next)."""
    from redistill.cycle.demo import demo_summary
    from redistill.registry.queries import registry_client, version_metrics

    metrics = result.get("metrics") or version_metrics(registry_client(ws), result["run_id"])
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "kind": kind,
                    "workspace": str(ws),
                    "model": name,
                    "teacher": str(teacher),
                    **demo_summary(result, metrics),
                    "timings_s": timings,
                }
            )
        )
        return True
    print_decision(result, name)
    if metrics:
        typer.echo("")
        typer.echo(comparison_table(metrics))
    typer.echo("")
    typer.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return False


def _demo_latent(kind: str, root: Path, p, as_json: bool) -> None:
    """`demo --kind text-to-image|dit|sd3`: one cycle that distils the kind's demo student in runs/demo-<kind> (its own
    data, feature spaces, MLflow store and registered model)."""
    from redistill.config import ConfigError
    from redistill.cycle.demo import LATENT_DEMOS, demo_latent, latent_demo_workspace

    section = LATENT_DEMOS[kind][0]
    try:
        sub, sp = latent_demo_workspace(root, p, kind)
    except ConfigError as e:
        fail(f"{section} settings: {e}")
    log = echo_err if as_json else typer.echo
    cycle = lambda ws, s, t, data, trigger, student: run_cycle(ws, s, t, data, trigger, False, student)  # noqa: E731
    teacher, result, timings = demo_latent(kind, root, sub, sp, log, echo_err, cycle)
    name = getattr(p, section).student_name
    if _demo_report(kind, sub, name, teacher, result, timings, as_json):
        return
    typer.echo(f"look: redistill status --workspace {sub} --model {name}")
    typer.echo(
        f"      redistill export --workspace {sub} --model {name} --alias champion --out {kind}-student/  "
        "(a stock pipeline folder; a LoRA student with its adapter fused in and beside it)"
    )


def comparison_table(m: dict) -> str:
    """The teacher-against-student table of a version's evaluation."""
    q, f, s, mem = m["quality"], m["fidelity"], m["speed"], m["memory"]
    ref, cand = f"teacher@{m['reference']['steps']}", f"student@{m['steps']}"
    psnr = "identical" if f["psnr_db"] is None else f"{f['psnr_db']:.2f} dB"
    rows = [
        (
            "FID (95% CI)",
            f"{q['reference_fid']:.3f} [{q['reference_fid_ci95'][0]:.3f}, {q['reference_fid_ci95'][1]:.3f}]",
            f"{q['fid']:.3f} [{q['fid_ci95'][0]:.3f}, {q['fid_ci95'][1]:.3f}]",
        ),
        ("KID", f"{q['reference_kid']:.4f}", f"{q['kid']:.4f}"),
        *[
            (
                f"FID gap [{name}]",
                f"floor {sq['fid_floor']:.3f}",
                f"{sq['fid_gap']:+.3f} [{sq['fid_gap_ci95'][0]:+.3f}, {sq['fid_gap_ci95'][1]:+.3f}] = {_floors(sq)} floors",
            )
            for name, sq in q.get("spaces", {}).items()
        ],
        (
            "recognisable",
            f"{q.get('reference_recognisable_share', float('nan')):.3f}",
            f"{q.get('recognisable_share', float('nan')):.3f}",
        ),
        *(
            [
                (
                    "prompt adherence",
                    f"{q['reference_prompt_adherence']:.3f}",
                    f"{q['prompt_adherence']:.3f} ({-q['prompt_adherence_gap_points']:+.1f} points)",
                )
            ]
            if "prompt_adherence" in q
            else []
        ),
        *(
            [
                ("UNet passes per step", f"{s['reference_unet_passes_per_step']}", f"{s['unet_passes_per_step']}"),
                ("VAE decode (in the latency)", "", f"{s['vae_decode_ms_p50']:.1f} ms"),
            ]
            if "vae_decode_ms_p50" in s
            else []
        ),
        ("PSNR / SSIM to teacher", "—", f"{psnr} / {f['ssim']:.3f}"),
        ("latency p50 (batch 1)", f"{s['reference_latency_ms_p50']:.1f} ms", f"{s['latency_ms_p50']:.1f} ms"),
        (
            f"throughput (batch {s['throughput_batch']})",
            f"{s['reference_throughput_img_s']:.0f} img/s",
            f"{s['throughput_img_s']:.0f} img/s (×{s['speedup_throughput']:.1f})",
        ),
        (
            "peak sampling memory",
            "—" if mem["reference_peak_sampling_mb"] is None else f"{mem['reference_peak_sampling_mb']:.0f} MB",
            f"{mem['peak_sampling_mb']:.0f} MB",
        ),
        ("parameters", f"{mem['reference_params']:,}", f"{mem['params']:,}"),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows + [("", ref, "")])
    lines = [f"{'':<{w0}}  {ref:<{w1}}  {cand}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
