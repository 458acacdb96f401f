"""MLflow I/O of a cycle: its run, the failure record, the logged student and its registered version.

Every task here talks to the tracking server, so each retries. The MLflow client is used with explicit run
ids: the fluent active run is thread-local and Prefect runs tasks in threads (mlflow#13456).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task

from redistill.registry import client as registry
from redistill.registry.client import tracking_uri
from redistill.registry.queries import experiment_id as _experiment

IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15])  # the cycle applies `registry.retry_delays_s` instead


def with_retries(t, delays: list[float]):
    """Task `t` retried once after each pause in `delays` (the settings' `registry.retry_delays_s`)."""
    return t.with_options(retries=len(delays), retry_delay_seconds=[float(d) for d in delays] or 0)


@task(name="open-run", **IO_RETRIES)
def open_run(root: Path, experiment: str, tags: dict[str, str], params: dict) -> str:
    """Start the cycle's MLflow run with its lineage tags and every resolved setting."""
    c = registry.client(tracking_uri(root))
    run = c.create_run(_experiment(c, experiment, root), tags=tags)
    flat = _flatten(params)
    for k, v in flat.items():
        c.log_param(run.info.run_id, k, v)
    c.log_dict(run.info.run_id, params, "params.json")  # the exact settings, for `redistill reproduce`
    return run.info.run_id


@task(name="record-failure", **IO_RETRIES)
def record_failure(root: Path, run_id: str, stage: str, reason: str) -> None:
    """Close the run as FAILED with the reason as a tag; nothing is registered."""
    c = registry.client(tracking_uri(root))
    c.set_tag(run_id, "redistill.failed_stage", stage)
    c.set_tag(run_id, "redistill.failure", reason[:5000])
    c.set_terminated(run_id, status="FAILED")


@task(name="set-run-tags", **IO_RETRIES)
def set_tags(root: Path, run_id: str, tags: dict[str, str]) -> None:
    c = registry.client(tracking_uri(root))
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


@task(name="log-artifacts", **IO_RETRIES)
def log_artifacts(root: Path, run_id: str, folder: Path, artifact_path: str) -> None:
    registry.client(tracking_uri(root)).log_artifacts(run_id, str(folder), artifact_path)


@task(name="log-evaluation", **IO_RETRIES)
def log_evaluation(
    root: Path, run_id: str, result: dict, decision: dict, model_id: str | None = None, dataset: dict | None = None
) -> None:
    """Every numeric figure as a metric (linked to the student's logged model `model_id` and the evaluation
    `dataset` {name, digest} when given), the evaluation JSON, and the gate's checks."""
    c = registry.client(tracking_uri(root))
    link = {"model_id": model_id} if model_id else {}
    if dataset:
        link.update(dataset_name=dataset["name"], dataset_digest=dataset["digest"])
    for k, v in _flatten(result).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            c.log_metric(run_id, k, float(v), **link)
    c.log_dict(run_id, result, "evaluation/metrics.json")
    c.log_dict(run_id, decision, "gate/decision.json")
    for check in decision["checks"]:
        c.set_tag(run_id, f"redistill.gate.{check['name']}", "pass" if check["passed"] else "FAIL")


@task(name="log-pyfunc-model", **IO_RETRIES)
def log_pyfunc(
    root: Path, run_id: str, student: Path, tags: dict[str, str] | None = None, card: str | None = None
) -> str:
    """Log the student as an MLflow logged model of the pyfunc flavour (loader module and its code shipped, no pickle),
    the run's output, with its model `card`; returns its id, which the registered version is created from
    (redistill/mlflow_lineage.py)."""
    from redistill.registry.mlflow_lineage import log_student_model

    return log_student_model(registry.client(tracking_uri(root)), run_id, Path(student), tags or {}, card=card)


@task(name="log-lineage-inputs", **IO_RETRIES)
def log_lineage_inputs(
    root: Path, run_id: str, inputs: dict, teacher_name: str, trigger_info: dict | None = None
) -> dict:
    """The run's inputs as MLflow records the UI shows: the data as datasets (context training and evaluation; a
    drift batch that triggered the cycle, context drift), digest the DVC md5; the teacher as a model input.
    Returns what was logged: {"datasets": [...], "teacher_model_id"}."""
    from redistill.data.images import dir_md5
    from redistill.registry.mlflow_lineage import dataset, dvc_path, log_datasets, log_teacher_input

    c = registry.client(tracking_uri(root))
    data = Path(inputs["data_uri"])
    items = [dataset(root, data, inputs["data_md5"], "training"), dataset(root, data, inputs["data_md5"], "evaluation")]
    batch = Path(trigger_info["batch_path"]) if trigger_info and trigger_info.get("batch_path") else None
    if batch is not None and batch.is_dir():
        items.append(dataset(root, batch, dir_md5(batch), "drift"))
    log_datasets(c, run_id, items)
    teacher_id = log_teacher_input(c, run_id, teacher_name, inputs["teacher_uri"], inputs["teacher_sha256"])
    return {
        "datasets": [
            {
                "context": ctx,
                "name": ds.name,
                "digest": ds.digest,
                "path": json.loads(ds.source)["dvc_path"],
                "md5": json.loads(ds.source)["md5"],
            }
            for ds, ctx in items
        ],
        "teacher_model_id": teacher_id,
        "data_path": dvc_path(root, data),
    }


@task(name="register-student", **IO_RETRIES)
def register(
    root: Path,
    name: str,
    run_id: str,
    tags: dict[str, str],
    promote: bool,
    artifact_path: str = "model",
    model_id: str | None = None,
) -> dict:
    """Register the run's pyfunc model (the logged model `model_id`) with its tags; move the aliases only when it
    passed."""
    c = registry.client(tracking_uri(root))
    r = registry.register_student(c, name, run_id, artifact_path, tags, promote, model_id=model_id)
    c.set_terminated(run_id, status="FINISHED")
    return {"version": r.version, "promoted": r.promoted, "replaced": r.replaced}


@task(name="describe-version", **IO_RETRIES)
def describe_version(
    root: Path,
    name: str,
    reg: dict,
    inputs: dict,
    logged: dict,
    decision: dict,
    tags: dict,
    champion_before: str | None,
    run_id: str,
    steps: int,
) -> str:
    """The registered version's description (its page in the MLflow UI): a markdown lineage summary of the
    teacher, data, settings hash, commit, trigger, the gate's checks and the champion it replaced."""
    from redistill.registry.mlflow_lineage import version_description

    detail = tags.get("redistill.trigger_detail")
    text = version_description(
        name=name,
        version=str(reg["version"]),
        teacher_uri=inputs["teacher_uri"],
        teacher_sha256=inputs["teacher_sha256"],
        datasets=logged["datasets"],
        params_sha256=inputs["params_sha256"],
        git_commit=inputs["git_commit"],
        trigger=tags.get("redistill.trigger", "?"),
        trigger_detail=json.loads(detail) if detail else None,
        method=tags.get("redistill.method", "?"),
        steps=str(steps),
        checks=decision["checks"],
        verdict="passed" if decision["passed"] else "rejected",
        replaced=reg.get("replaced"),
        champion_before=champion_before,
        run_id=run_id,
        flow_run_url=tags.get("redistill.prefect_flow_run_url"),
    )
    registry.client(tracking_uri(root)).update_model_version(name, str(reg["version"]), description=text)
    return text


@task(name="champion-evaluation", **IO_RETRIES)
def champion_evaluation(
    root: Path, name: str, tmp: Path, inputs: dict, evaluate_settings: dict
) -> tuple[str | None, dict | None, Path | None, int]:
    """The current champion: (version, its recorded evaluation, None) when that evaluation measured what
    the candidate's will (same data md5, feature spaces and evaluate settings), else (version, None, its
    student folder downloaded under `tmp`, its step count) so the flow re-evaluates it on the candidate's data;
    (None, None, None, 0) without a champion."""
    c = registry.client(tracking_uri(root))
    champ = registry.champion(c, name)
    if champ is None:
        return None, None, None, 0
    steps = int(champ.tags.get(registry.PREFIX + "num_inference_steps", 0) or 0)
    tags, params = champ.tags, c.get_run(champ.run_id).data.params
    same = (
        tags.get(registry.PREFIX + "data_md5") == inputs["data_md5"]
        and tags.get(registry.PREFIX + "features_sha256") == inputs["features_sha256"]
        and all(params.get(k) == str(v) for k, v in _flatten({"evaluate": evaluate_settings}).items())
    )
    if same:
        recorded = c.download_artifacts(champ.run_id, "evaluation/metrics.json", str(tmp))
        return str(champ.version), json.loads(Path(recorded).read_text()), None, steps
    student = Path(c.download_artifacts(champ.run_id, "student", str(tmp)))
    return str(champ.version), None, student, steps


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


@task(name="publish-reports", **IO_RETRIES)
def publish_reports(root: Path, run_id: str, decision: str, version: str) -> str:
    """A Prefect markdown artifact linking the run's reports: sample grid, quality-vs-steps, GX data docs, drift."""
    from prefect.artifacts import create_markdown_artifact

    c = registry.client(tracking_uri(root))
    base = c.get_run(run_id).info.artifact_uri
    have = {a.path for a in c.list_artifacts(run_id, "evaluation")} | {
        a.path for a in c.list_artifacts(run_id, "trigger")
    }
    links = [
        ("teacher and student samples on the same noise", "evaluation/grid.png"),
        ("quality against steps", "evaluation/quality_vs_steps.png"),
        ("great_expectations data docs", "validation/data_docs/index.html"),
        ("drift report (the trigger)", "trigger/drift.png"),
        ("metrics", "evaluation/metrics.json"),
    ]
    lines = [f"- [{label}]({base}/{path})" for label, path in links if path in have or path.startswith("validation/")]
    md = f"# redistill: version {version} {decision}\n\nMLflow run `{run_id}`.\n\n" + "\n".join(lines) + "\n"
    create_markdown_artifact(key="redistill-reports", markdown=md, description="links to the cycle's reports")
    return md
