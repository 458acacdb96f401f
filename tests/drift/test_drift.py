"""Drift detection on the real embedded data: calibrated false alarms, every drifted batch caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from redistill.cli import app
from redistill.data.stats import image_stats
from redistill.drift.detect import calibrate, detect, holm, mmd_permutation_test

runner = CliRunner()


def test_holm_adjusts_like_the_textbook():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 → 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_mmd_permutation_test_holds_its_level_and_sees_a_shift():
    rejections = 0
    for s in range(100):  # same distribution: p is uniform, so about 5% of draws have p ≤ 0.05
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(40, 4, generator=g), torch.randn(80, 4, generator=g)
        rejections += mmd_permutation_test(x, y, 99, seed=s)[1] <= 0.05
    assert rejections <= 10
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=g), torch.randn(300, 8, generator=g)
    _, p_shift, _, null = mmd_permutation_test(x + 0.5, y, 199, seed=1)
    assert p_shift == pytest.approx(1 / 200) and len(null) == 199


def test_image_stats_see_thicker_strokes():
    thin = np.zeros((4, 1, 8, 8), np.float32)
    thin[:, :, 2:6, 3] = 1.0
    thick = thin.copy()
    thick[:, :, 2:6, 4] = 1.0
    a, b = image_stats(thin), image_stats(thick)
    assert (b["mean_c0"] > a["mean_c0"]).all() and (b["ink"] > a["ink"]).all()
    assert np.allclose(a["row_centre"], 0.5 * (2 + 5) / 7)


@pytest.fixture(scope="module")
def embedded(digits_ws):
    from redistill.data.images import load_image_folder
    from redistill.evaluation.features import FeatureExtractor, load_classifier

    ext = FeatureExtractor(load_classifier(digits_ws / "data" / "features"))
    ref = load_image_folder(digits_ws / "data" / "reference")
    return ext, ext(torch.from_numpy(ref.images)), image_stats(ref.images)


def test_false_alarm_rate_at_most_5_percent_over_50_reference_splits(embedded):
    _, feats, stats = embedded
    result = calibrate(feats, stats, batch_size=150, splits=50, alpha=0.02, permutations=300, seed=0)
    assert result["splits"] == 50 and len(result["per_split"]) == 50
    assert result["false_alarm_rate"] <= 0.05, result


@pytest.mark.parametrize("batch,drifted", [("nodrift", False), ("class_mix", True), ("style", True)])
def test_every_prepared_drift_is_detected_and_the_clean_batch_is_not(digits_ws, embedded, batch, drifted):
    from redistill.data.images import load_image_folder

    ext, feats, stats = embedded
    im = load_image_folder(digits_ws / "data" / "incoming" / batch).images
    rep = detect(batch, feats, stats, ext(torch.from_numpy(im)), image_stats(im), alpha=0.02, permutations=500)
    assert rep.drifted is drifted, rep.reasons
    assert bool(rep.reasons) is drifted


def test_cli_check_and_calibrate(digits_ws, tmp_path):
    r = runner.invoke(
        app,
        [
            "drift",
            "check",
            str(digits_ws / "data" / "incoming" / "style"),
            "--workspace",
            str(digits_ws),
            "--out",
            str(tmp_path / "style"),
            "--json",
        ],
    )
    assert r.exit_code == 1, r.output  # drifted
    assert json.loads(r.stdout)["drifted"] and (tmp_path / "style" / "drift.png").stat().st_size > 0
    r = runner.invoke(
        app,
        [
            "drift",
            "check",
            str(digits_ws / "data" / "incoming" / "nodrift"),
            "--workspace",
            str(digits_ws),
            "--out",
            str(tmp_path / "nodrift"),
        ],
    )
    assert r.exit_code == 0 and "no drift" in r.output
    r = runner.invoke(
        app,
        [
            "drift",
            "calibrate",
            "--splits",
            "50",
            "--workspace",
            str(digits_ws),
            "--out",
            str(tmp_path / "cal.json"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["splits"] == 50 and out["false_alarm_rate"] <= 0.05
    assert out["batches"] == {**out["batches"], "style": out["batches"]["style"]} and out["batches"]["style"]["drifted"]
    r = runner.invoke(app, ["drift", "calibrate", "--splits", "10", "--workspace", str(digits_ws)])
    assert r.exit_code != 0 and "50" in r.output  # too few splits to measure a 5% rate
