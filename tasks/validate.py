"""Data validation as Prefect tasks: the great_expectations suite (`redistill.data.expectations`) and the
teacher's integrity check, retried on I/O errors."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from redistill.config import ValidateParams
from redistill.data.expectations import ValidationReport, validate_folder


@task(name="validate-data", retries=2, retry_delay_seconds=[2, 10], task_run_name="validate {folder}")
def validate_data(
    folder: Path,
    reference: Path,
    p: ValidateParams,
    out_dir: Path,
    reference_md5: str | None = None,
    teacher: Path | None = None,
) -> ValidationReport:
    """Prefect task: validate a data folder; retried on I/O errors (a failed validation is a result, not an error)."""
    return validate_folder(folder, reference, p, out_dir, reference_md5, teacher)


@task(name="check-teacher", retries=2, retry_delay_seconds=[2, 10])
def check_teacher(teacher: Path, channels: int, size: tuple[int, int], data: Path) -> dict:
    """Prefect task: the teacher loads from safetensors, fits the data and gives finite outputs.

    A refused teacher is a result ({"error": reason}), not an exception, so the retries are spent only
    on I/O errors, never on a teacher that is simply wrong.
    """
    from redistill.models.pipelines import PipelineError, validate_teacher

    try:
        return validate_teacher(teacher, channels, size, data_path=data)
    except PipelineError as e:
        return {"error": str(e)}
