"""Read the registry for the commands: the client of a workspace, which model a command works on, the versions of
a model with their gates and evaluations, and the MLflow run that records a rollback."""

from __future__ import annotations

import os
from pathlib import Path


class UnknownModel(LookupError):
    """A `--model` name that is not registered."""


def registry_client(root: Path):
    """The MLflow client of workspace `root`, with no download progress bars in the commands' output."""
    from redistill.registry.client import client, tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in our output

    return client(tracking_uri(root))


def registered_names(c) -> list[str]:
    """Every registered model's name, all pages."""
    names, token = [], None
    while True:
        page = c.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def model_name(c, default: str, model: str | None) -> str:
    """The registered model a registry-reading command works on: `model`, else `default` (registry.student_name).

    The configured name is always accepted (before the first cycle it is simply not registered yet); any other
    name must be registered, or UnknownModel names the models that exist, before anything is read or changed."""
    from mlflow.exceptions import MlflowException

    if model is None or model == default:
        return default
    try:
        c.get_registered_model(model)
        return model
    except MlflowException as e:  # only "no such model" is a typo; a failing store is not
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = registered_names(c)
    have = f"registered models: {', '.join(names)}" if names else "no model is registered yet"
    raise UnknownModel(
        f"no registered model named {model!r} ({have}); pass one of them to --model, or leave --model "
        f"out for registry.student_name ({default!r})"
    )


def version_metrics(c, run_id: str) -> dict | None:
    """A version's evaluation (its run's evaluation/metrics.json), None before evaluation."""
    from redistill.registry.lineage import artifact_json

    return artifact_json(c, run_id, "evaluation/metrics.json")


def versions(c, name: str) -> list[dict]:
    """Every version of `name`, oldest first: its gate, trigger, init, teacher, aliases and evaluation."""
    from redistill.registry.client import PREFIX, alias

    champ, prev = alias(c, name, "champion"), alias(c, name, "previous")
    out = []
    for mv in sorted(c.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        tag = {k: mv.tags.get(PREFIX + k, "?") for k in ("gate", "trigger", "init", "teacher_uri", "gate_reasons")}
        out.append(
            {
                "version": str(mv.version),
                "gate": tag["gate"],
                "trigger": tag["trigger"],
                "init": tag["init"],
                "teacher": Path(tag["teacher_uri"]).name,
                "reasons": tag["gate_reasons"],
                "run_id": mv.run_id,
                "champion": champ is not None and str(champ.version) == str(mv.version),
                "previous": prev is not None and str(prev.version) == str(mv.version),
                "metrics": version_metrics(c, mv.run_id),
            }
        )
    return out


def last_decisions(c, name: str, n: int = 10) -> dict:
    """The champion and previous versions of `name` and its last `n` decisions, newest first."""
    from redistill.registry.client import CHAMPION, PREFIX, PREVIOUS, alias

    try:
        found = c.search_model_versions(f"name='{name}'")
    except Exception:  # no registry yet
        found = []
    champ, prev = alias(c, name, CHAMPION), alias(c, name, PREVIOUS)
    rows = [
        {
            "version": str(v.version),
            "gate": v.tags.get(PREFIX + "gate"),
            "trigger": v.tags.get(PREFIX + "trigger"),
            "method": v.tags.get(PREFIX + "method"),
            "steps": v.tags.get(PREFIX + "num_inference_steps"),
            "created": v.creation_timestamp,
            "key": v.tags.get(PREFIX + "key"),
        }
        for v in sorted(found, key=lambda v: int(v.version), reverse=True)[:n]
    ]
    return {
        "champion": str(champ.version) if champ else None,
        "previous": str(prev.version) if prev else None,
        "rows": rows,
    }


def experiment_id(c, name: str, root: Path) -> str:
    """The id of experiment `name`, created where missing (artifacts in the workspace for the embedded store)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # the embedded store keeps artifacts in the workspace; a tracking server decides for itself
    location = (Path(root) / "mlartifacts").as_uri() if not os.environ.get("MLFLOW_TRACKING_URI") else None
    return c.create_experiment(name, artifact_location=location)


def record_rollback(c, experiment: str, root: Path, record: dict) -> str:
    """Record a rollback (`record`, from registry.client.rollback, with its model) as a finished MLflow run in
    `experiment`; returns the run id."""
    run = c.create_run(
        experiment_id(c, experiment, root),
        run_name=f"rollback-v{record['from']}-to-v{record['to']}",
        tags={"redistill.kind": "rollback", **{f"redistill.rollback.{k}": v for k, v in record.items()}},
    )
    c.set_terminated(run.info.run_id)
    return run.info.run_id
