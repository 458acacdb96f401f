"""The cycle's lineage in MLflow's own records, where the MLflow UI shows it (beside the `redistill.*` tags).

| record | MLflow entity | where the UI shows it |
|---|---|---|
| the data the student was trained on, the set it was evaluated on, a drift batch that triggered it | dataset inputs of the run (`log_inputs`), context `training` / `evaluation` / `drift`; digest = DVC md5, source = DVC path (and remote URL) | the run's "Datasets used" |
| the teacher | a logged model (`redistill.role: teacher`, found again by its sha256) given to the run as a model input | the run's model inputs; the teacher's own page |
| the student | a logged model of the pyfunc flavour (loader module `redistill.registry.serving`, no pickle), the run's output, with the evaluation's metrics linked to it; the registered version is created from it | the run's "Logged models"; the version's source |
| the version's story | the version description: a markdown lineage summary | the registered version's page |

MLflow caps a dataset digest at 36 characters: DVC's folder md5 (`<32 hex>.dir`) fits; a sha256 does not, which is
one reason the teacher is a logged model (its sha256 a tag and a param) rather than a dataset.
"""

from __future__ import annotations

import configparser
import json
import os
from contextlib import contextmanager
from pathlib import Path

TEACHER_ROLE = "redistill.role"
SHA_TAG = "redistill.teacher_sha256"
CONTEXT_TAG = "mlflow.data.context"  # the input tag the UI shows as the dataset's context


def dvc_path(root: Path, folder: Path) -> str:
    """`folder` relative to the workspace (what `dvc` names it), or its absolute path outside the workspace."""
    folder, root = Path(folder).resolve(), Path(root).resolve()
    try:
        return folder.relative_to(root).as_posix()
    except ValueError:
        return str(folder)


def dvc_remote_url(root: Path) -> str | None:
    """The URL of the workspace's default DVC remote (.dvc/config.local over .dvc/config), or None."""
    cfg = configparser.ConfigParser()
    try:
        cfg.read([Path(root) / ".dvc" / "config", Path(root) / ".dvc" / "config.local"])
    except configparser.Error:
        return None
    name = cfg.get("core", "remote", fallback=None)
    return cfg.get(f"'remote \"{name}\"'", "url", fallback=None) if name else None


def dataset(root: Path, folder: Path, md5: str, context: str, num_images: int | None = None):
    """(MLflow Dataset entity, context) of a DVC-tracked image folder: digest the DVC md5, source its DVC path."""
    from mlflow.entities import Dataset

    path = dvc_path(root, folder)
    remote = dvc_remote_url(root)
    source = {"dvc_path": path, **({"dvc_remote": remote} if remote else {}), "md5": md5}
    profile = {"num_images": num_images} if num_images is not None else {}
    # name: the path and the context, so the same folder used for training and for evaluation is two inputs
    return Dataset(
        name=f"{path} ({context})",
        digest=md5[:36],
        source_type="dvc",
        source=json.dumps(source),
        profile=json.dumps(profile) if profile else None,
    ), context


def log_datasets(c, run_id: str, datasets: list) -> None:
    """Log (Dataset, context) pairs as the run's inputs; an input already logged is not logged twice."""
    from mlflow.entities import DatasetInput, InputTag

    have = {(d.dataset.name, d.dataset.digest) for d in (c.get_run(run_id).inputs.dataset_inputs or [])}
    new = [
        DatasetInput(ds, tags=[InputTag(CONTEXT_TAG, ctx)]) for ds, ctx in datasets if (ds.name, ds.digest) not in have
    ]
    if new:
        c.log_inputs(run_id, datasets=new)


def teacher_model(c, experiment_id: str, name: str, uri: str, sha256: str) -> str:
    """The id of the teacher's logged model in `experiment_id`: found by sha256, else created (READY, no
    artifacts: the teacher stays where it is, named by its URI and sha256)."""
    found = c.search_logged_models([experiment_id], filter_string=f"tags.`{SHA_TAG}` = '{sha256}'", max_results=1)
    if len(found):
        return found[0].model_id
    m = c.create_logged_model(
        experiment_id,
        name=f"teacher-{name}"[:250],
        model_type="teacher",
        tags={TEACHER_ROLE: "teacher", SHA_TAG: sha256, "redistill.teacher_uri": uri},
        params={"teacher_sha256": sha256, "teacher_uri": uri},
    )
    c.finalize_logged_model(m.model_id, "READY")
    return m.model_id


def log_teacher_input(c, run_id: str, name: str, uri: str, sha256: str) -> str:
    """Give the run its teacher as a model input; returns the teacher's logged-model id."""
    from mlflow.entities import LoggedModelInput

    run = c.get_run(run_id)
    model_id = teacher_model(c, run.info.experiment_id, name, uri, sha256)
    inputs = run.inputs
    if model_id not in {m.model_id for m in (getattr(inputs, "model_inputs", None) or [])}:
        c.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    return model_id


def log_student_model(c, run_id: str, student: Path, tags: dict[str, str], card: str | None = None) -> str:
    """The student as a logged model of the pyfunc flavour (`serving.save_pyfunc`: loader module, its code shipped, no
    pickle), the run's output; returns its id. `card` (model_card.cycle_card) becomes its README.md. A retried call
    finds the model it made before instead of making a second."""
    import tempfile

    from mlflow.entities import LoggedModelOutput

    from redistill.registry.serving import save_pyfunc

    run = c.get_run(run_id)
    exp = run.info.experiment_id
    for m in c.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}' AND name = 'student'"):
        if str(m.status) in ("READY", "LoggedModelStatus.READY"):
            return m.model_id
    m = c.create_logged_model(
        exp,
        name="student",
        source_run_id=run_id,
        model_type="diffusion-student",
        tags={k: str(v) for k, v in tags.items()},
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_pyfunc(Path(student), Path(tmp) / "model", card=card)
        c.log_model_artifacts(m.model_id, str(Path(tmp) / "model"))
    c.finalize_logged_model(m.model_id, "READY")
    c.log_outputs(run_id, models=[LoggedModelOutput(m.model_id, step=0)])
    return m.model_id


@contextmanager
def default_store(c):
    """`c`'s tracking URI as the process's default for a block. MLflow's SQL registry store resolves a `models:/<id>`
    source with a default `MlflowClient()`, which otherwise opens another store (or none); the URI in force before
    is restored, and the environment with it."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = c.tracking_uri
    if mlflow.get_tracking_uri() == uri:
        yield
        return
    with _use_tracking_uri(uri):
        yield


def ui_base(tracking_uri: str) -> str | None:
    """The MLflow UI's address: the tracking server itself, or None for a local store (`mlflow ui` serves it)."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def ui_links(
    base: str | None,
    experiment_id: str,
    run_id: str,
    name: str,
    version: str,
    model_id: str | None = None,
    teacher_model_id: str | None = None,
) -> dict:
    """Where each record is in the MLflow UI (fragments after the UI's address when there is no server)."""
    b = base or ""
    links = {
        "version": f"{b}/#/models/{name}/versions/{version}",
        "run": f"{b}/#/experiments/{experiment_id}/runs/{run_id}",
        "datasets": f"{b}/#/experiments/{experiment_id}/runs/{run_id}",
    }
    if model_id:
        links["logged_model"] = f"{b}/#/experiments/{experiment_id}/models/{model_id}"
    if teacher_model_id:
        links["teacher_model"] = f"{b}/#/experiments/{experiment_id}/models/{teacher_model_id}"
    return links


def version_description(
    *,
    name: str,
    version: str,
    teacher_uri: str,
    teacher_sha256: str,
    datasets: list[dict],
    params_sha256: str,
    git_commit: str,
    trigger: str,
    trigger_detail: dict | None,
    method: str,
    steps: str,
    checks: list[dict],
    verdict: str,
    replaced: str | None,
    champion_before: str | None,
    run_id: str,
    flow_run_url: str | None,
) -> str:
    """The registered version's description: a short markdown lineage summary."""
    lines = [
        f"**{name} v{version}**: {method} student at {steps} steps, gate **{verdict}**"
        + (
            f"; replaced champion v{replaced}"
            if replaced
            else f"; champion stays v{champion_before}"
            if champion_before and verdict != "passed"
            else ""
        ),
        "",
        "| lineage | |",
        "|---|---|",
        f"| teacher | `{teacher_uri}` (sha256 `{teacher_sha256[:16]}…`) |",
        *[f"| data ({d['context']}) | `{d['path']}` (DVC md5 `{d['md5']}`) |" for d in datasets],
        f"| settings | sha256 `{params_sha256[:16]}…` |",
        f"| code | git `{git_commit[:12]}`{' (dirty tree)' if git_commit.endswith('-dirty') else ''} |",
        f"| trigger | {trigger}{_trigger_note(trigger_detail)} |",
        f"| source run | `{run_id}` |",
        *([f"| Prefect flow run | {flow_run_url} |"] if flow_run_url else []),
        "",
        *gate_table(checks),
    ]
    return "\n".join(lines)[:5000]


def gate_table(checks: list[dict]) -> list[str]:
    """The gate's checks as markdown table lines: name, value, bound, verdict (the version description, the model
    card)."""
    return [
        "| gate check | value | bound | |",
        "|---|---|---|---|",
        *[
            f"| {ch.get('name')} | {_fmt(ch.get('value'))} | {ch.get('op', '')} {_fmt(ch.get('bound'))} | "
            f"{'pass' if ch.get('passed') else 'FAIL'} |"
            for ch in checks
        ],
    ]


def _trigger_note(detail: dict | None) -> str:
    if not isinstance(detail, dict):
        return ""
    if detail.get("batch"):
        return f" (batch `{detail['batch']}`)"
    return ""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def mlflow_records(c, mv) -> dict:
    """What MLflow itself holds of a version's lineage: datasets, model inputs, the logged model, the description."""
    run = c.get_run(mv.run_id)
    inputs = run.inputs
    datasets = []
    for d in inputs.dataset_inputs or []:
        ctx = next((t.value for t in d.tags if t.key == CONTEXT_TAG), None)
        try:
            source = json.loads(d.dataset.source)
        except (TypeError, json.JSONDecodeError):
            source = d.dataset.source
        datasets.append(
            {
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "context": ctx,
                "source_type": d.dataset.source_type,
                "source": source,
            }
        )
    model_inputs = [m.model_id for m in (getattr(inputs, "model_inputs", None) or [])]
    teacher = None
    for mid in model_inputs:
        try:
            lm = c.get_logged_model(mid)
        except Exception:
            continue
        if lm.tags.get(TEACHER_ROLE) == "teacher":
            teacher = {"model_id": mid, "name": lm.name, "sha256": lm.tags.get(SHA_TAG)}
    model_id = getattr(mv, "model_id", None) or (
        mv.source[len("models:/") :] if (mv.source or "").startswith("models:/m-") else None
    )
    if model_id is None:  # older versions: the run's own output model, if it has one
        outputs = getattr(run, "outputs", None)
        model_id = next((m.model_id for m in (getattr(outputs, "model_outputs", None) or [])), None)
    return {
        "experiment_id": run.info.experiment_id,
        "datasets": datasets,
        "teacher_model": teacher,
        "logged_model_id": model_id,
        "description": mv.description or None,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
    }
