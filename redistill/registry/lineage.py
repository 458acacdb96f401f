"""Lineage: what made a student. The code version and the cycle's idempotency key (DESIGN.md, "One cycle")."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def code_version(repo: Path | None = None) -> dict:
    """The git commit of the code and whether the tree was dirty; the package version outside git."""
    here = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"git_commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"git_commit": f"package-{version('redistill')}", "dirty": False}
        except PackageNotFoundError:
            return {"git_commit": "unknown", "dirty": True}


def idempotency_key(teacher_sha256: str, data_md5: str, params_sha256: str, code: str, features: str = "") -> str:
    """The cycle's key: same teacher bytes, data, distill/evaluate/gate settings, code and feature-space
    weights ⇒ same key."""
    parts = [teacher_sha256, data_md5, params_sha256, code] + ([features] if features else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def dvc_exe() -> str:
    """The `dvc` on PATH, else the one installed beside this Python (a venv used without activating it)."""
    import shutil
    import sys

    return shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def dvc_add(root: Path, path: Path, timeout: float = 300) -> dict:
    """Version `path` with `dvc add` when the workspace is a DVC repository; returns what was recorded.

    The md5 is DVC's own (from the written `.dvc` file), the same hash as `redistill.data.dir_md5`. Outside
    a DVC repository nothing is run and `{"dvc": False}` says so; a failing `dvc add` raises with its output.
    """
    import os

    import yaml

    root, path = Path(root), Path(path)
    if not (root / ".dvc").is_dir():
        return {"dvc": False, "reason": f"{root} is not a DVC repository (no .dvc/); run `dvc init` to version data"}
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(
        [dvc_exe(), "add", "-q", str(path.relative_to(root))],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"`dvc add {path.relative_to(root)}` failed: {(r.stderr or r.stdout).strip()[:500]}")
    dvc_file = path.with_name(path.name + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return {"dvc": True, "dvc_file": str(dvc_file.relative_to(root)), "md5": out["md5"], "nfiles": out.get("nfiles")}


class LineageError(LookupError):
    """The version (or alias) asked for does not exist; the message says what does."""


def artifact_json(c, run_id: str, path: str) -> dict | None:
    """A JSON artifact of a run, or None when the run has none (it stopped early, or predates it)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(c.download_artifacts(run_id, path, tmp)).read_text())
        except Exception:  # not logged (a run stopped early, or older than this artifact)
            return None


def resolve_version(c, name: str, version: str | int | None = None, alias: str | None = None):
    """The model version for `--version N` or `--alias A`, or LineageError naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, str(version))
    except MlflowException:
        try:
            existing = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        except MlflowException:
            existing = []
        what = f"alias {alias!r}" if alias else f"version {version}"
        have = (
            f"versions {existing[0]}–{existing[-1]}"
            if len(existing) > 1
            else f"only version {existing[0]}"
            if existing
            else "no versions yet"
        )
        raise LineageError(f"{name} has no {what} ({have}); `redistill status` lists them") from None


def lineage(c, name: str, mv, root: Path | None = None) -> dict:
    """The audit chain of one registered version: teacher, data, params, code, flow run, trigger, gate."""
    import json
    from datetime import datetime, timezone

    tag = lambda k: mv.tags.get("redistill." + k)  # noqa: E731
    run = c.get_run(mv.run_id)
    art = run.info.artifact_uri
    decision = artifact_json(c, mv.run_id, "gate/decision.json") or {}
    metrics = artifact_json(c, mv.run_id, "evaluation/metrics.json") or {}
    gx = artifact_json(c, mv.run_id, "validation/result.json") or {}
    params = artifact_json(c, mv.run_id, "params.json")
    try:
        detail = json.loads(tag("trigger_detail") or "null")
    except json.JSONDecodeError:
        detail = tag("trigger_detail")
    teacher_uri, teacher_sha = tag("teacher_uri"), tag("teacher_sha256")
    registered = (detail or {}).get("teacher_registry") if isinstance(detail, dict) else None
    if registered is None and root is not None:
        from redistill.core.watch_state import registered_teacher

        registered = registered_teacher(root, teacher_sha)
    trigger_files = [a.path for a in c.list_artifacts(mv.run_id, "trigger")]
    commit = tag("git_commit") or ""
    return {
        "model": name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "run_id": mv.run_id,
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
        "key": tag("key"),
        "method": tag("method"),
        "num_inference_steps": tag("num_inference_steps"),
        "teacher": {
            "uri": teacher_uri,
            "sha256": teacher_sha,
            "registered": registered,
            "present": bool(teacher_uri) and (Path(teacher_uri) / "model_index.json").is_file(),
        },
        "data": {
            "uri": tag("data_uri"),
            "md5": tag("data_md5"),
            "num_images": metrics.get("num_real"),
            "validation": {
                "success": gx.get("success"),
                "expectations": len(gx.get("results", [])) or None,
                "failed": sum(1 for r in gx.get("results", []) if not r.get("success")),
                "data_docs": f"{art}/validation/data_docs/index.html",
            },
        },
        "params": {"sha256": tag("params_sha256"), "values": params},
        "features": _json_tag(tag("features_sha256")),  # the FID/KID feature spaces' weights, by sha256
        "adapter": _json_tag(tag("adapter")),  # a LoRA student: its rank and its base teacher's sha256
        "init": {
            "kind": (tag("init") or "cold").split(":")[0],
            "from_version": (tag("init") or "").split(":", 1)[1] if ":" in (tag("init") or "") else None,
        },
        "code": {"git_commit": commit.removesuffix("-dirty"), "dirty": commit.endswith("-dirty")},
        "prefect": {"flow_run_id": tag("prefect_flow_run_id"), "url": tag("prefect_flow_run_url")},
        "trigger": {"kind": tag("trigger"), "detail": detail, "report": [f"{art}/{p}" for p in trigger_files] or None},
        "gate": {"verdict": tag("gate"), "reasons": tag("gate_reasons"), "checks": decision.get("checks", [])},
        "replaced": tag("replaced"),
        "rollbacks": tag("rollback"),
        "metrics": {k: metrics.get("quality", {}).get(k) for k in ("fid", "fid_ci95", "kid", "kid_ci95", "fid_ratio")},
        "mlflow": _mlflow_view(c, name, mv),
    }


def _mlflow_view(c, name: str, mv) -> dict:
    """MLflow's own records of the version (datasets, the teacher input, the logged model, the description) and
    where the UI shows each (redistill/mlflow_lineage.py)."""
    from redistill.registry.mlflow_lineage import mlflow_records, ui_base, ui_links

    rec = mlflow_records(c, mv)
    base = ui_base(str(c.tracking_uri))
    rec["ui"] = ui_links(
        base,
        rec["experiment_id"],
        mv.run_id,
        name,
        str(mv.version),
        rec["logged_model_id"],
        (rec["teacher_model"] or {}).get("model_id"),
    )
    rec["ui_base"] = base or f"`mlflow ui --backend-store-uri {c.tracking_uri}`, then http://127.0.0.1:5000"
    return rec


def _json_tag(value: str | None):
    import json

    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError:
        return value


def format_lineage(d: dict) -> str:
    """The lineage as a terminal page."""

    def line(label: str, value) -> str:
        return f"  {label:<12} {value}"

    t, data, code, pf, tr, g = d["teacher"], d["data"], d["code"], d["prefect"], d["trigger"], d["gate"]
    v = data["validation"]
    out = [
        f"{d['model']} version {d['version']}  aliases: {', '.join(d['aliases']) or '(none)'}  created {d['created']}",
        line("run", d["run_id"]),
        line("key", d["key"]),
        line("method", f"{d['method']} at {d['num_inference_steps']} steps"),
        line(
            "started",
            "from the teacher (cold)"
            if d["init"]["kind"] == "cold"
            else f"from champion version {d['init']['from_version']} (warm)",
        ),
        *(
            [
                line(
                    "student",
                    f"a LoRA adapter (rank {d['adapter'].get('rank')}) on the base teacher below"
                    + (
                        ""
                        if d["adapter"].get("base_sha256") == t["sha256"]
                        else f"  (BASE MISMATCH: the adapter's base is {d['adapter'].get('base_sha256')})"
                    ),
                )
            ]
            if d.get("adapter")
            else []
        ),
        "teacher",
        line("uri", t["uri"] + ("" if t["present"] else "  (no longer there)")),
        line("sha256", t["sha256"]),
        line("registered", t["registered"] or "no (a folder)"),
        "data",
        line("uri", data["uri"]),
        line("DVC md5", data["md5"]),
        line("images", data["num_images"]),
        line(
            "validation",
            f"{'passed' if v['success'] else 'FAILED' if v['success'] is False else '?'}"
            f" ({v['expectations']} expectations, {v['failed']} failed)",
        ),
        line("data docs", v["data_docs"]),
        "params",
        line("sha256", d["params"]["sha256"]),
        *[line(f"features {k}", v) for k, v in (d["features"] or {}).items()],
        "code",
        line("git commit", code["git_commit"] + ("  (tree was DIRTY)" if code["dirty"] else "  (clean tree)")),
        "prefect",
        line("flow run", pf["flow_run_id"]),
        line("url", pf["url"] or "(ephemeral server: no UI)"),
        "trigger",
        line("kind", tr["kind"]),
    ]
    if tr["detail"]:
        out.append(line("detail", tr["detail"]))
    for r in tr["report"] or []:
        out.append(line("report", r))
    out.append(f"gate: {g['verdict']}")
    for c in g["checks"]:
        value = "n/a" if c.get("value") is None else f"{c['value']:.4g}"
        bound = "" if c.get("bound") is None else f"{c['bound']:.4g}"
        out.append(
            f"  {'pass' if c['passed'] else 'FAIL':<4} {c['kind']:<8} {c['name']:<22} {value:>10} {c['op']} {bound}"
        )
    out.append(
        f"replaced     {('version ' + d['replaced']) if d['replaced'] else '(nothing: no champion before it, or not promoted)'}"
    )
    if d.get("rollbacks"):
        out.append(f"rollbacks    {d['rollbacks']}")
    m = d.get("mlflow")
    if m:
        ui = m["ui"]
        out += [
            f"in the MLflow UI ({m['ui_base']})",
            line("version", ui["version"] + ("  (description: the lineage summary)" if m["description"] else "")),
            line("run", ui["run"]),
            *[line("dataset", f"{ds['name']}  digest {ds['digest']}  [{ds['context']}]") for ds in m["datasets"]],
            line(
                "teacher",
                f"{ui['teacher_model']}  (model input, sha256 {(m['teacher_model'] or {}).get('sha256', '')[:16]}…)"
                if m["teacher_model"]
                else "(no model input: a version from before MLflow lineage)",
            ),
            line("student", ui.get("logged_model", "(no logged model: a version from before MLflow lineage)")),
        ]
    return "\n".join(out)


CARD_IMAGES = (
    ("teacher and student samples on the same noise", "evaluation/grid.png"),
    ("quality against steps", "evaluation/quality_vs_steps.png"),
)


def write_model_card(c, name: str, mv, folder: Path, root: Path | None = None) -> Path:
    """README.md in `folder` (a registered version's student, as `redistill export` writes it): a model card as
    diffusers' training scripts write one, from the version's lineage, with the run's sample grid and quality-vs-steps
    plot copied beside it (`images/`) when the run logged them. Returns the card's path."""
    import shutil
    import tempfile

    from redistill.registry.model_card import CARD, lineage_card

    folder = Path(folder)
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for caption, artifact in CARD_IMAGES:
            try:
                got = Path(c.download_artifacts(mv.run_id, artifact, tmp))
            except Exception:  # not logged (a run stopped early, or older than this artifact)
                continue
            (folder / "images").mkdir(exist_ok=True)
            shutil.copyfile(got, folder / "images" / got.name)
            images.append((caption, f"images/{got.name}"))
    card = folder / CARD
    card.write_text(lineage_card(lineage(c, name, mv, root), folder, images))
    return card
