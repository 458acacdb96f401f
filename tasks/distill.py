"""Distil the student with the configured method, in the cycle's run folder.

No retries: a crashed distillation resumes from its last checkpoint when the cycle runs again with the same
key, because the run folder is named by the key.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from redistill.config import DistillParams

SUMMARY = "redistill_distill.json"


@task(name="distill-student", task_run_name="distill {p.method}")
def distill_student(teacher: Path, data: Path, p: DistillParams, run_dir: Path, root: Path | None = None) -> dict:
    """Distil `teacher` on `data` into `run_dir/student` (a stock diffusers pipeline folder)."""
    import torch

    from redistill.data import load_image_folder
    from redistill.methods import distill
    from redistill.teacher import load_pipeline, save_pipeline

    out = Path(run_dir) / "student"
    if (out / SUMMARY).is_file():  # finished earlier (e.g. the cycle died while registering): reuse it
        return json.loads((out / SUMMARY).read_text())
    logger = get_run_logger()
    images = torch.from_numpy(load_image_folder(data).images)
    student, summary = distill(p, load_pipeline(teacher), images, Path(run_dir) / "checkpoints", log=logger.info,
                               teacher_path=Path(teacher), workspace=root)
    save_pipeline(student, out, extra={SUMMARY: summary})
    return summary
