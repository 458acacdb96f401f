"""The watch's units of work: teacher integrity, drift tests, the champion's fit check, the representative set.

Each returns a plain dict (a result, not an exception, for a broken teacher or a drifted batch), so the watch
flow records the outcome and keeps going. MLflow I/O retries. The plain functions at the end are the watch's
cheap reads and its state file: not worth a task run each.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from redistill.config import DriftParams, GateParams, Params
from redistill.data.base import DataError
from redistill.registry import client as registry
from redistill.registry.client import PREFIX, tracking_uri
from redistill.watch.policy import fit_verdict
from redistill.watch.scan import Scan, current_data, current_teacher, scan, signature
from redistill.watch.state import WatchState

IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15])


@task(name="inspect-teacher", task_run_name="inspect teacher {path}")
def inspect_teacher(path: Path, data: Path, method: str | None = None) -> dict:
    """Content hash plus the integrity checks: loads from safetensors, fits the data, finite probe outputs, and
    is a kind that `method` (distill.method) can distil, so a teacher no cycle could use never becomes current."""
    from redistill.data.images import load_image_folder
    from redistill.methods import refuses
    from redistill.models.pipelines import PipelineError, pipeline_sha256, validate_teacher

    try:
        sha = pipeline_sha256(path)
        images = load_image_folder(data)
        facts = validate_teacher(path, images.channels, images.size, data_path=data)
        why = refuses(method, facts["family"], facts["kind"]) if method else None
        if why:
            return {"ok": False, "error": f"{why}; the watch skips this folder until its contents change"}
        return {"ok": True, **facts, "sha256": sha}
    except (PipelineError, DataError, OSError) as e:
        return {"ok": False, "error": str(e)}


@task(name="known-teachers", **IO_RETRIES)
def known_teacher_shas(root: Path, name: str) -> list[str]:
    """Teacher hashes the registry already has students of (so an old teacher never re-triggers)."""
    from mlflow.exceptions import MlflowException

    c = registry.client(tracking_uri(root))
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return sorted({v.tags.get(PREFIX + "teacher_sha256") for v in versions} - {None})


@task(name="drift-test", task_run_name="drift test {batch}")
def drift_test(
    batch: Path, reference: Path, features: Path, p: DriftParams, out_dir: Path, teacher: Path | None = None
) -> dict:
    """MMD permutation test on the embeddings, Holm-corrected KS tests and, when the batch and the reference both
    have captions, the MMD test on their prompts (`drift.text_features`: hashed words, or the text-to-image
    `teacher`'s own text encoder); writes drift.json and drift.png."""
    from redistill.drift.features import embedding
    from redistill.drift.folders import check_folder

    try:
        text = prompt_embedding(teacher, p.text_features)
        report = check_folder(
            batch,
            reference,
            embedding(p.features, features),
            p.alpha,
            p.permutations,
            p.seed,
            out_dir,
            text_extractor=text,
            text_features=p.text_features if text else None,
        )
    except (ValueError, OSError) as e:  # unreadable, or images of another shape: a bad batch, not drift
        return {
            "batch": Path(batch).name,
            "drifted": None,
            "error": True,
            "reasons": [f"{e}. Fix or remove the batch folder {batch}: it is skipped until its contents change"],
        }
    return {**report.to_dict(), "reference": str(reference), "batch_path": str(batch), "report_dir": str(out_dir)}


def prompt_embedding(teacher: Path | None, space: str = "teacher"):
    """The prompts' drift feature space `drift.text_features`: None for the weightless words, a sentence encoder
    (minilm, sentence:DIR), or the text-to-image teacher's pooled text embedding; ValueError (a bad setting, said
    as such) when what it names is not there."""
    from redistill.drift.sentence import is_sentence_space, sentence_encoder

    if space == "words":
        return None
    if is_sentence_space(space):
        return sentence_encoder(space)
    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline

    model = adapter_for(load_pipeline(teacher)) if teacher is not None else None
    if model is None or not hasattr(model, "embed_prompts"):
        raise ValueError(
            "drift.text_features is teacher, but the current teacher is not a text-to-image model with a "
            "text encoder; set drift.text_features: words"
        )
    return model.embed_prompts


@task(name="log-watch-run", **IO_RETRIES)
def log_watch_run(
    root: Path,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    folder: Path | None = None,
    failed: bool = False,
) -> str:
    """One MLflow run recording what the watch saw and decided (drift checks, refused teachers, fit checks)."""
    from redistill.tasks.registry import _experiment

    c = registry.client(tracking_uri(root))
    run = c.create_run(_experiment(c, experiment, root), run_name=run_name, tags=tags)
    rid = run.info.run_id
    for k, v in metrics.items():
        c.log_metric(rid, k, float(v))
    if folder is not None and Path(folder).is_dir():
        c.log_artifacts(rid, str(folder))
    c.set_terminated(rid, status="FAILED" if failed else "FINISHED")
    return rid


@task(name="champion-fit-check", **IO_RETRIES)
def champion_fit(root: Path, p: Params, batch: Path, out_dir: Path) -> dict | None:
    """Re-evaluate the champion on the new batch and gate it on the absolute thresholds.

    Returns None when there is no champion. The champion is sampled at its registered step count against
    its own teacher at `evaluate.reference_steps`, with the batch as the real images, so the ratios say
    whether it still matches its teacher on the data that now arrives.
    """
    import dataclasses

    from redistill.evaluation.gate import judge
    from redistill.evaluation.sampling import sample_store
    from redistill.evaluation.suite import evaluate_student

    c = registry.client(tracking_uri(root))
    champ = registry.champion(c, p.registry.student_name)
    if champ is None:
        return None
    teacher = Path(champ.tags.get(PREFIX + "teacher_uri", ""))
    if not (teacher / "model_index.json").is_file():
        return {
            "version": str(champ.version),
            "passed": False,
            "reasons": f"the champion's teacher {teacher} is no longer there; cannot re-check it",
        }
    steps = int(champ.tags.get(PREFIX + "num_inference_steps", p.distill.target_steps))
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(c.download_artifacts(champ.run_id, "student", tmp))
        result = evaluate_student(
            student, steps, teacher, batch, Path(root) / "data" / "features", p, Path(out_dir), sample_store(root)
        )
    gate: GateParams = dataclasses.replace(p.gate, first_run="absolute")
    decision = judge(result, None, gate, method=champ.tags.get(PREFIX + "method"))
    passed, reasons = fit_verdict(decision.checks)
    (Path(out_dir) / "fit.json").write_text(
        json.dumps({"version": str(champ.version), "passed": passed, "reasons": reasons, "metrics": result}, indent=2)
        + "\n"
    )
    create_markdown_artifact(
        key="redistill-champion-fit",
        description="champion re-checked after drift",
        markdown=f"# Champion v{champ.version} {'still fit' if passed else 'no longer fit'} "
        f"on batch {Path(batch).name}\n\n" + "\n".join(f"- {r}" for r in reasons.split("; ")),
    )
    return {
        "version": str(champ.version),
        "passed": passed,
        "reasons": reasons,
        "fid_ratio": result["quality"]["fid_ratio"],
        "fid_gap_floors": result["quality"]["fid_gap_floors"],
        "run_dir": str(out_dir),
    }


@task(name="tag-version", **IO_RETRIES)
def tag_version(root: Path, name: str, version: str, tags: dict[str, str]) -> None:
    c = registry.client(tracking_uri(root))
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)


@task(name="update-representative-set")
def update_representative(root: Path, base: Path, batch: Path, batch_name: str) -> dict:
    """data/representative = the current representative set + the batch, with `grown_from.json` (the reference
    it grew from and the batches it accepted, which validation reads), versioned with `dvc add`."""
    import shutil

    from redistill.core.files import swap_in
    from redistill.data.growth import merge_batch
    from redistill.data.images import dir_md5
    from redistill.data.validation import GROWN_FROM, grown_from
    from redistill.registry.lineage import dvc_add

    out = Path(root) / "data" / "representative"
    record = grown_from(root, base, batch, batch_name)
    # merged aside, recorded, then swapped in whole: the set is never on disk without its record
    staged = out.with_name(out.name + f".grow{os.getpid()}")
    try:
        count = merge_batch(base, batch, staged, batch_name)
        (staged / GROWN_FROM).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # nothing half written under data/
        raise
    swap_in(staged, out)
    dvc = dvc_add(root, out)
    md5 = dir_md5(out)
    if dvc.get("dvc") and dvc["md5"] != md5:
        raise RuntimeError(f"DVC recorded {dvc['md5']} for {out} but redistill computes {md5}")
    return {"path": str(out), "md5": md5, "images": count, **dvc, "pid": os.getpid(), "grown_from": record}


@task(name="fetch-registered-teacher", **IO_RETRIES)
def fetch_registered_teacher(root: Path, model: str, which: str, seen: str | None) -> dict | None:
    """The teacher registered as `model@which`, downloaded to data/teachers/<model>-v<N> when it is a
    version not seen before; None when there is no such alias or nothing changed."""
    import shutil

    from mlflow.artifacts import download_artifacts

    from redistill.data.images import safe_name

    c = registry.client(tracking_uri(root))
    mv = registry.alias(c, model, which)
    if mv is None or str(mv.version) == seen:
        return None
    out = Path(root) / "data" / "teachers" / f"{safe_name(model)}-v{mv.version}"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            uri = c.get_model_version_download_uri(model, str(mv.version))  # where the version's files are
            local = Path(download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri(root)))
            if not (local / "model_index.json").is_file():  # the pipeline folder may sit one level down
                inner = [p.parent for p in local.rglob("model_index.json")]
                local = inner[0] if len(inner) == 1 else local
            shutil.move(str(local), str(out))
    return {
        "name": out.name,
        "path": str(out),
        "version": str(mv.version),
        "model": model,
        "alias": which,
        "signature": signature(out)[0],
    }


def load_watch_state(root: Path) -> WatchState:
    """The watch state of the workspace (a damaged file raises ValueError saying what to do)."""
    return WatchState.load(root)


def save_watch_state(root: Path, state: WatchState) -> None:
    """Write the watch state whole."""
    state.save(root)


def look_for_changes(root: Path, settle_seconds: float, state: WatchState, what: tuple[str, ...]) -> Scan:
    """Teacher folders and incoming batches that changed since `state` (folder listings and stats only)."""
    return scan(root, settle_seconds, state, look=what)


def watch_data(root: Path) -> Path:
    """The representative set cycles and drift tests use now."""
    return current_data(root)


def watch_teacher(root: Path, default_name: str, state: WatchState | None = None) -> Path:
    """The teacher cycles use now: the newest the watch accepted, else data/teachers/<default_name>."""
    return current_teacher(root, default_name, state)


def drift_report_dir(root: Path, batch: str) -> str | None:
    """The newest drift report folder of `batch` (a deferred episode acts on the report its batch left)."""
    found = sorted((Path(root) / "runs" / "watch" / "drift").glob(f"{batch}-*"))
    return str(found[-1]) if found else None
