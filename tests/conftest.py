"""Shared fixtures: a real digits workspace and tiny diffusers pipelines built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ENCODER_EPOCHS, SUMMARY_LINES, make_tiny_pipeline

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="module")
def prefect_harness():
    """The real Prefect engine on a temporary server, for one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def digits_ws(tmp_path_factory) -> Path:
    """A workspace with the real embedded data (prepare) and a briefly trained feature classifier."""
    from redistill.config import FeaturesParams, Params
    from redistill.data.digits import prepare
    from redistill.data.images import load_image_folder
    from redistill.evaluation.encoder import save_encoder, train_encoder
    from redistill.evaluation.features import save_classifier, train_classifier

    ws = tmp_path_factory.mktemp("ws")
    prepare(Params().prepare, ws / "data")
    fp = FeaturesParams(epochs=12)
    reference = load_image_folder(ws / "data/reference")
    model, metrics = train_classifier(fp, reference, load_image_folder(ws / "data/holdout"), log=lambda m: None)
    save_classifier(model, ws / "data" / "features", {"metrics": metrics})
    encoder, enc_metrics = train_encoder(reference.images, epochs=ENCODER_EPOCHS, log=lambda m: None)
    save_encoder(encoder, ws / "data" / "features", {"metrics": enc_metrics})
    (ws / "params.yaml").write_text(
        f"features: {{epochs: 12, encoder_epochs: {ENCODER_EPOCHS}}}\n"
        "evaluate: {num_samples: 120, max_samples: 240, bootstrap: 10, kid_subset_size: 50, sample_batch_size: 60,"
        " latency_repeats: 3, throughput_repeats: 1, throughput_batch: 8}\n"
    )
    return ws


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY_LINES:
        terminalreporter.write_line(line)
