"""The gate calibrated on controls: the separation maths against hand-made figures, the transforms that make the
negative controls, and a whole calibration on the committed teacher at a small sample size, whose ordering must hold
(every positive control below every negative one, in every feature space)."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.cycle.calibration import NEGATIVE, POSITIVE
from redistill.cycle.controls import blurred, separation, suggest_bound, table, without_classes


def _row(name, group, gap, lo, hi, space="s"):
    return {
        "name": name,
        "group": group,
        "what": name,
        "spaces": {space: {"gap_floors": gap, "gap_floors_ci95": [lo, hi]}},
    }


def test_separation_uses_the_far_ends_of_the_intervals():
    rows = [
        _row("ddim25", POSITIVE, 0.05, -0.02, 0.12),
        _row("ddim100", POSITIVE, 0.2, 0.1, 0.3),
        _row("blurred", NEGATIVE, 3.0, 2.5, 3.5),
        _row("half", NEGATIVE, 1.2, 0.9, 1.5),
    ]
    sep = separation(rows, "s")
    assert sep["separates"] is True
    assert (sep["positive_max"], sep["positive_max_control"]) == (0.3, "ddim100")
    assert (sep["negative_min"], sep["negative_min_control"]) == (0.9, "half")
    # halfway between 0.3 and 0.9: the same margin from either group
    assert suggest_bound(sep) == pytest.approx(0.6)
    # an overlap: a positive control's upper end above a negative control's lower end
    rows.append(_row("seed", POSITIVE, 0.6, 0.2, 1.0))
    sep = separation(rows, "s")
    assert sep["separates"] is False and "seed" in sep["why"] and "half" in sep["why"]
    assert suggest_bound(sep) is None


def test_suggested_bound_stays_strictly_inside_when_rounding_would_land_on_an_edge():
    sep = {"separates": True, "positive_max": 0.26, "negative_min": 0.27}
    b = suggest_bound(sep)
    assert 0.26 < b < 0.27


def test_table_marks_a_control_the_bound_misjudges():
    rows = [_row("ddim25", POSITIVE, 0.1, 0.0, 0.2), _row("blurred", NEGATIVE, 0.4, 0.3, 0.5)]
    summary = {"spaces": {"s": {**separation(rows, "s")}}}
    text = table(rows, summary, {"s": 0.25})
    assert "+0.10 [+0.00, +0.20] pass" in text and "+0.40 [+0.30, +0.50] fail" in text and "WRONG" not in text
    assert "(WRONG)" in table(rows, summary, {"s": 0.05})  # a bound that fails a positive control says so


def test_blur_keeps_the_mean_and_removes_detail():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((4, 1, 8, 8), generator=g)
    b = blurred(x, 1.0)
    assert b.shape == x.shape and 0 <= b.min() and b.max() <= 1
    assert (b - b.mean((2, 3), keepdim=True)).abs().mean() < (x - x.mean((2, 3), keepdim=True)).abs().mean()
    assert torch.allclose(b.mean((2, 3)), x.mean((2, 3)), atol=0.05)


def test_mode_dropping_removes_exactly_the_dropped_classes():
    images = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 3])
    kept = without_classes(images, labels, [3, 8])
    assert sorted(kept[:, 0, 0, 0].long().tolist()) == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.slow
def test_calibration_on_the_committed_teacher_orders_the_controls(digits_ws, tmp_path):
    """The whole `redistill calibrate` at a few hundred samples: every positive control's gap lies below every
    negative control's, in both feature spaces, and the file and table say so."""
    import shutil

    from typer.testing import CliRunner

    from helpers import REPO
    from redistill.cli import app

    ws = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", ws / "data", ignore=shutil.ignore_patterns("samples", "pairs"))
    shutil.copytree(REPO / "data" / "teachers" / "digits-ddpm", ws / "data" / "teachers" / "digits-ddpm")
    (ws / "params.yaml").write_text(
        "evaluate: {num_samples: 400, max_samples: 400, reference_steps: 10, bootstrap: 20, kid_subset_size: 100,"
        " sample_batch_size: 200}\n"
        "calibrate: {positive_steps: [20], ddpm_samples: 0, finetuned: '', undistilled_steps: [1],"
        " half_trained_steps: 0, blur_sigma: 1.0, dropped_classes: [0, 1, 2, 3, 4]}\n"
    )
    r = CliRunner().invoke(app, ["calibrate", "--workspace", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads((ws / "metrics" / "calibration.json").read_text())["controls"] == result["controls"]
    names = {row["name"]: row["group"] for row in result["controls"]}
    assert names == {
        "ddim20": POSITIVE,
        "seed": POSITIVE,
        "teacher@1": NEGATIVE,
        "blurred": NEGATIVE,
        "mode-drop": NEGATIVE,
    }
    for space in ("classifier", "encoder"):
        pos = [r["spaces"][space]["gap_floors"] for r in result["controls"] if r["group"] == POSITIVE]
        neg = [r["spaces"][space]["gap_floors"] for r in result["controls"] if r["group"] == NEGATIVE]
        assert max(pos) < min(neg), (space, result["table"])
    assert "| bound |" in result["table"]


def test_a_workspace_of_your_own_data_calibrates_its_own_bounds_once(tmp_path):
    """A workspace derived from a user's data trains its own encoder, whose gaps are another scale than the embedded
    digits': its first cycle measures the cheap controls in its own spaces, records the bounds in
    data/calibration.json, and every later load of its settings judges with them, unless the settings set
    gate.fid_gap_max by hand. The embedded workspace and a teacher kind without DDIM controls keep the settings'."""
    from helpers import make_tiny_flow_pipeline, make_tiny_pipeline
    from redistill.config import FID_GAP_MAX, load_params
    from redistill.cycle.bootstrap import ensure_workspace
    from redistill.cycle.calibration import calibrate_workspace
    from redistill.data import shapes

    ws = tmp_path / "ws"
    ws.mkdir()
    teacher = make_tiny_pipeline(tmp_path / "teacher")
    data = shapes.write(tmp_path / "data", 80, size=8, channels=1, seed=1)
    settings = (
        "evaluate: {num_samples: 60, max_samples: 60, reference_steps: 10, bootstrap: 10, kid_subset_size: 30,"
        " sample_batch_size: 60, floor_splits: 4}\nfeatures: {encoder_epochs: 3}\n"
        "calibrate: {positive_steps: [20], undistilled_steps: [1]}\n"
    )
    (ws / "params.yaml").write_text(settings)
    p = load_params(ws=ws)
    assert calibrate_workspace(ws, p, teacher, log=print) is None  # not derived from a user's data: nothing to do
    assert ensure_workspace(ws, data, p, log=print) is not None

    record = calibrate_workspace(ws, p, teacher, log=print)
    assert {row["name"] for row in record["controls"]} == {"ddim20", "seed", "teacher@1", "blurred", "mode-drop"}
    assert record["left_out"] == ["ddpm1000", "half-trained", "finetuned"] and list(record["bounds"]) == ["encoder"]
    assert json.loads((ws / "data" / "calibration.json").read_text())["bounds"] == record["bounds"]
    expected = {**record["bounds"], "default": FID_GAP_MAX["default"]}
    assert p.gate.fid_gap_max == expected  # this cycle judges with them ...
    assert load_params(ws=ws).gate.fid_gap_max == expected  # ... and so does every later one
    assert calibrate_workspace(ws, load_params(ws=ws), teacher) is None  # measured once
    # bounds set by hand win
    (ws / "params.yaml").write_text(settings + "gate: {fid_gap_max: 0.7}\n")
    assert load_params(ws=ws).gate.fid_gap_max == 0.7

    # a flow-matching teacher's controls are not DDIM draws: its workspace keeps the settings' bounds, and says so
    (ws / "params.yaml").write_text(settings)
    (ws / "data" / "calibration.json").unlink()
    said = []
    p = load_params(ws=ws)
    assert calibrate_workspace(ws, p, make_tiny_flow_pipeline(tmp_path / "flow"), log=said.append) is None
    assert p.gate.fid_gap_max == FID_GAP_MAX and "not calibrated automatically" in said[0]
