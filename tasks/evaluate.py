"""Evaluate the student against the teacher: quality, fidelity, latency and memory in one process."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from redistill.config import Params


@task(name="evaluate-student")
def evaluate_student(student: Path, steps: int, teacher: Path, data: Path, features: Path, p: Params,
                     out_dir: Path, cache_dir: Path) -> dict:
    """The metric suite on the student (its saved scheduler) against the teacher at reference_steps."""
    from redistill.data import load_image_folder
    from redistill.features import FeatureExtractor, load_classifier
    from redistill.metrics import Side, evaluate

    classifier = load_classifier(features)
    return evaluate(
        Side(student, steps, "saved"), Side(teacher, p.evaluate.reference_steps), load_image_folder(data),
        FeatureExtractor(classifier), p.evaluate, classifier=classifier, confidence=p.features.confidence,
        out_dir=out_dir, cache_dir=cache_dir,
    )
