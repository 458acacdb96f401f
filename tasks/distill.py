"""Distil the student with the configured method, in the cycle's run folder, cold or warm from the champion.

No retries on the distillation: a crashed distillation resumes from its last checkpoint when the cycle runs
again with the same key, because the run folder is named by the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task

from redistill.config import DistillParams, Params

SUMMARY = "redistill_distill.json"


@task(name="warm-start", retries=3, retry_delay_seconds=[2, 5, 15])
def warm_start(root: Path, p: Params, teacher: Path, run_dir: Path) -> dict:
    """Where the student starts (`distill.init`): {"init": "cold" | "warm:<version>", "note", and for a warm
    start the champion's student folder and sha256}; {"refused": reason} when `warm` cannot be honoured."""
    from redistill.cycle.warm import why_not
    from redistill.models.pipelines import pipeline_sha256
    from redistill.registry import client as registry
    from redistill.registry.client import tracking_uri

    mode, name = p.distill.init, p.registry.student_name
    if mode == "cold":
        return {"init": "cold", "note": "distill.init is cold"}
    c = registry.client(tracking_uri(root))
    champ = registry.champion(c, name)
    if champ is None:
        note = f"{name} has no champion yet"
        return (
            {
                "refused": f"distill.init is warm, but {note}; the first cycle must start cold (distill.init: auto or cold)"
            }
            if mode == "warm"
            else {"init": "cold", "note": note}
        )
    dst = Path(run_dir) / "init" / f"v{champ.version}"
    if not (dst / "student" / "model_index.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        c.download_artifacts(champ.run_id, "student", str(dst))
    reason = why_not(champ.tags, dst / "student", Path(teacher), p)
    if reason is not None:
        if mode == "warm":
            return {
                "refused": f"distill.init is warm, but the champion (version {champ.version}) does not fit this "
                f"cycle: {reason}. Set distill.init: auto to fall back to a cold start, or cold"
            }
        return {"init": "cold", "note": f"champion version {champ.version} does not fit: {reason}"}
    return {
        "init": f"warm:{champ.version}",
        "version": str(champ.version),
        "student": str(dst / "student"),
        "sha256": pipeline_sha256(dst / "student"),
        "note": f"from champion version {champ.version}",
    }


@task(name="distill-student", task_run_name="distill {p.method}")
def distill_student(
    teacher: Path, data: Path, p: DistillParams, run_dir: Path, root: Path | None = None, start: dict | None = None
) -> dict:
    """Distil `teacher` on `data` into `run_dir/student` (a stock diffusers pipeline folder), from the
    champion when `start` (from `warm_start`) says so."""
    import torch

    from redistill.cycle.warm import load_init
    from redistill.data.images import load_image_folder
    from redistill.methods import distill
    from redistill.models.pipelines import load_pipeline, save_pipeline

    out = Path(run_dir) / "student"
    init_tag = (start or {}).get("init", "cold")
    if (out / SUMMARY).is_file():  # finished earlier (e.g. the cycle died while registering): reuse it ...
        done = json.loads((out / SUMMARY).read_text())
        if done.get("init", "cold") == init_tag:
            check_adapter_base(out, Path(teacher))
            return done
        shutil.rmtree(out)  # ... unless it started elsewhere (a forced re-run that now starts warm)
    logger = get_run_logger()
    if p.num_processes > 1:  # data parallel under `accelerate launch`; its main process writes `out`
        from redistill.ops.launch import distill_in_processes

        summary = distill_in_processes(
            p,
            Path(teacher),
            Path(data),
            Path(run_dir) / "checkpoints",
            out,
            log=logger.info,
            workspace=root,
            init_student=(start or {}).get("student"),
            init_sha256=(start or {}).get("sha256", ""),
            init_tag=init_tag,
            summary_name=SUMMARY,
        )
        check_adapter_base(out, Path(teacher))
        return summary
    folder = load_image_folder(data)
    images = torch.from_numpy(folder.images)
    init = load_init(Path(start["student"])) if start and start.get("student") else None
    student, summary = distill(
        p,
        load_pipeline(teacher),
        images,
        Path(run_dir) / "checkpoints",
        log=logger.info,
        teacher_path=Path(teacher),
        workspace=root,
        init=init,
        init_sha256=(start or {}).get("sha256", ""),
        captions=getattr(folder, "captions", None),
    )
    summary["init"] = init_tag
    save_pipeline(student, out, extra={SUMMARY: summary})
    check_adapter_base(out, Path(teacher))
    return summary


@task(name="adopt-student")
def adopt_student(student: Path, sha256: str, teacher: Path, run_dir: Path) -> dict:
    """A student distilled elsewhere (trigger bootstrap: the committed champion), copied whole into `run_dir/student`
    as if this cycle had distilled it; returns its distillation summary with `init` and `init_note` saying where it
    came from. ValueError when its folder changed since the cycle resolved it, or it has no summary."""
    from redistill.core.files import copy_folder
    from redistill.models.pipelines import pipeline_sha256

    out = Path(run_dir) / "student"
    if not (out / SUMMARY).is_file():
        if pipeline_sha256(student) != sha256:
            raise ValueError(
                f"{student} changed while the cycle read it (sha256 {sha256[:16]}… at the start); run again "
                "once it is complete"
            )
        if not (Path(student) / SUMMARY).is_file():
            raise ValueError(
                f"{student} has no {SUMMARY} (what distilled it, and its step count): it was not written by "
                "redistill distill or the champion stage"
            )
        copy_folder(Path(student), out)
    summary = json.loads((out / SUMMARY).read_text())
    lineage = summary.get("lineage", {})
    summary["init"] = summary.get("init", "cold")
    summary["init_note"] = (
        f"adopted from {student} (sha256 {sha256[:16]}…), distilled {summary['init']} by "
        f"{summary['method']} in {summary.get('wall_time_s', 0):.0f} s"
        + (f" at commit {lineage['git_commit']}" if lineage.get("git_commit") else "")
    )
    check_adapter_base(out, Path(teacher))
    return summary


def check_adapter_base(student: Path, teacher: Path) -> None:
    """A LoRA student is registered only beside the teacher its adapter was trained on (AdapterBaseMismatch, a
    ValueError the cycle records as the failed run's reason, otherwise)."""
    from redistill.models.adapter_files import adapter_meta, check_base

    if adapter_meta(student) is not None:
        check_base(student, teacher)


@task(name="registered-form")
def registered_form(student: Path, run_dir: Path) -> Path:
    """What the registry keeps of a student: its whole folder, or for a LoRA student its adapter, scheduler and
    pointer to the base teacher (sha256 and path; redistill/lora.py), a few MB instead of a copy of the base.
    Everything that loads a registered student (evaluation, serving, export) rebuilds it on its base."""
    from redistill.models.adapter_files import adapter_meta
    from redistill.models.lora import adapter_only

    if adapter_meta(student) is None:
        return Path(student)
    return adapter_only(student, Path(run_dir) / "student-adapter")
