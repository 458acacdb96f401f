"""Drift and validation on colour images of any size (`redistill.shapes`), not only on the grey digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from redistill.cli import app
from redistill.config import ValidateParams
from redistill.data import shapes
from redistill.data.stats import LUMA, image_stats
from redistill.data.validation import image_table, reference_profile
from redistill.drift.detect import calibrate, detect
from redistill.drift.features import pixel_features

runner = CliRunner()
ALPHA, PERMUTATIONS = 0.02, 199


def nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) or (N, H, W) as float (N, C, H, W) in [0, 1]."""
    x = images[..., None] if images.ndim == 3 else images
    return (x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


def desaturate(x: np.ndarray, keep: float) -> np.ndarray:
    """Each pixel moved towards its grey value: `keep` of its colour is left."""
    grey = np.einsum("nchw,c->nhw", x, LUMA)[:, None]
    return grey + keep * (x - grey)


def embed(x: np.ndarray):
    return pixel_features(torch.from_numpy(x)), image_stats(x)


@pytest.fixture(scope="module")
def rgb():
    """A 16×16 RGB reference of 300 shapes, embedded without weights."""
    x = nchw(shapes.draw(300, 16, 3, seed=0)[0])
    return x, *embed(x)


def batch(seed: int, n: int = 80, channels: int = 3, **kw) -> np.ndarray:
    return nchw(shapes.draw(n, 16, channels, seed=seed, **kw)[0])


def test_statistics_are_per_channel_and_see_colour_and_edges():
    red = np.zeros((1, 3, 4, 4))
    red[:, 0] = 1.0
    step = np.zeros((1, 1, 4, 4))
    step[..., 2:] = 1.0  # columns 0 0 1 1: one unit step in each of the 3×3 gradient cells' middle column
    s, g = image_stats(red), image_stats(step)
    assert s["mean_c0"] == pytest.approx([1.0]) and s["mean_c1"] == pytest.approx([0.0])
    assert s["saturation"] == pytest.approx([1.0]) and g["saturation"] == pytest.approx([0.0])
    assert s["hist"][0, 0, -1] == 1.0 and s["hist"][0, 1, 0] == 1.0  # all red in the top bin, no green
    assert g["sharpness"] == pytest.approx([1 / 3]) and s["sharpness"] == pytest.approx([0.0])
    assert "ink" in g and "ink" not in s and "mean_c2" not in g  # the digits' stroke statistics: grey only
    big = image_stats(nchw(shapes.draw(4, 40, 3, seed=1)[0]))  # any size
    assert set(big) == set(s) and big["std_c2"].shape == (4,)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_from_the_same_generator_do_not_drift(rgb, seed):
    _, feats, stats = rgb
    b = batch(seed)
    rep = detect(f"seed{seed}", feats, stats, *embed(b), ALPHA, PERMUTATIONS, seed)
    assert not rep.drifted, rep.reasons
    assert set(rep.ks) == {
        "mean_c0",
        "mean_c1",
        "mean_c2",
        "std_c0",
        "std_c1",
        "std_c2",
        "sharpness",
        "saturation",
        "hist_tv",
    }
    assert rep.histogram_tv < 0.1


def test_a_desaturated_and_a_darkened_batch_are_flagged_naming_the_statistic(rgb):
    _, feats, stats = rgb
    b = batch(7)
    grey = detect("desaturated", feats, stats, *embed(desaturate(b, 0.5)), ALPHA, PERMUTATIONS)
    assert grey.drifted and any("per-image saturation" in r for r in grey.reasons), grey.reasons
    dark = detect("darkened", feats, stats, *embed(b * 0.8), ALPHA, PERMUTATIONS)
    assert dark.drifted and any("per-image mean_c" in r and "median −" in r for r in dark.reasons), dark.reasons
    mix = detect("discs and squares", feats, stats, *embed(batch(7, classes=(0, 1))), ALPHA, PERMUTATIONS)
    assert mix.drifted, mix.reasons  # no stripes or rings: fewer edges


def test_false_alarm_rate_at_most_5_percent_over_50_rgb_reference_splits(rgb):
    _, feats, stats = rgb
    result = calibrate(feats, stats, batch_size=60, splits=50, alpha=ALPHA, permutations=99, seed=0)
    assert result["splits"] == 50 and "saturation" in result["statistics"]
    assert result["false_alarm_rate"] <= 0.05, [r["reasons"] for r in result["per_split"] if r["drifted"]]


def test_grey_shapes_still_work():
    ref = batch(0, 300, channels=1)
    feats, stats = embed(ref)
    clean = detect("grey", feats, stats, *embed(batch(1, channels=1)), ALPHA, PERMUTATIONS)
    assert not clean.drifted, clean.reasons
    assert "saturation" not in clean.ks and {"mean_c0", "ink", "row_centre", "hist_tv"} <= set(clean.ks)
    dark = detect("grey dark", feats, stats, *embed(batch(1, channels=1) * 0.7), ALPHA, PERMUTATIONS)
    assert dark.drifted and any("mean_c0" in r for r in dark.reasons), dark.reasons
    with pytest.raises(ValueError, match="one channel count"):
        detect("rgb", feats, stats, *embed(batch(1)), ALPHA, PERMUTATIONS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A labelled RGB reference, a like batch without labels, a red-cast batch and a greyed batch."""
    from redistill.data.images import write_image_folder

    root = tmp_path_factory.mktemp("shapes")
    ref = shapes.write(root / "reference", 160, seed=0, labels=True)
    shapes.write(root / "like", 120, seed=1)
    images = shapes.draw(120, 16, 3, seed=2)[0].astype(np.float64) / 255
    red = images.copy()
    red[..., 0] = 0.85 + 0.15 * red[..., 0]  # a red cast: only the first channel moves
    write_image_folder(root / "red", np.rint(red * 255).astype(np.uint8), None)
    grey = images @ LUMA
    write_image_folder(root / "grey", np.rint(np.repeat(grey[..., None], 3, -1) * 255).astype(np.uint8), None)
    return root, ref


def test_gx_bands_are_learnt_per_channel_and_refuse_an_out_of_band_batch(folders, tmp_path):
    from redistill.data.expectations import validate_folder

    root, ref = folders
    profile = reference_profile(image_table(ref), ValidateParams())
    assert set(profile["bands"]) == {
        "mean_c0",
        "mean_c1",
        "mean_c2",
        "std_c0",
        "std_c1",
        "std_c2",
        "sharpness",
        "saturation",
    }
    assert profile["channels"] == 3 and "label_values" in profile
    like = validate_folder(root / "like", ref, ValidateParams(), tmp_path / "like")  # no labels.csv: no label check
    assert like.success, like.message()
    suite = json.loads(like.suite_json.read_text())
    columns = {e["kwargs"].get("column") for e in suite["expectations"]}
    assert {"mean_c0", "mean_c2", "saturation"} <= columns and "label" not in columns

    red = validate_folder(root / "red", ref, ValidateParams(), tmp_path / "red")
    assert not red.success and "column=mean_c0" in red.message(), red.message()
    assert "column=mean_c1" not in red.message() and "column=mean_c2" not in red.message()
    grey = validate_folder(root / "grey", ref, ValidateParams(), tmp_path / "grey")
    assert not grey.success and "column=saturation" in grey.message(), grey.message()

    own = validate_folder(ref, ref, ValidateParams(), tmp_path / "ref")  # labels on both sides: the KL check runs
    assert own.success and "kl_divergence" in own.suite_json.read_text()


def test_grey_bands_are_the_single_channel(tmp_path):
    ref = shapes.write(tmp_path / "grey", 120, channels=1, seed=0)
    profile = reference_profile(image_table(ref), ValidateParams())
    assert set(profile["bands"]) == {"mean_c0", "std_c0", "sharpness"} and profile["channels"] == 1


def test_cli_calibrates_and_checks_any_reference_folder(folders, tmp_path):
    root, ref = folders
    incoming = tmp_path / "incoming"
    shapes.write(incoming / "like", 60, seed=11)
    from redistill.data.images import write_image_folder

    write_image_folder(
        incoming / "washed", np.rint(desaturate(batch(12, 60), 0.4).transpose(0, 2, 3, 1) * 255).astype(np.uint8), None
    )
    (tmp_path / "params.yaml").write_text("drift: {permutations: 99}\n")
    args = ["--workspace", str(tmp_path), "--features", "pixels"]
    r = runner.invoke(
        app,
        [
            "drift",
            "calibrate",
            "--splits",
            "50",
            "--reference",
            str(ref),
            "--incoming",
            str(incoming),
            "--batch-size",
            "40",
            "--out",
            str(tmp_path / "cal.json"),
            "--json",
            *args,
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["splits"] == 50 and out["batch_size"] == 40 and out["false_alarm_rate"] <= 0.05, out
    assert out["batches"]["washed"]["drifted"] and not out["batches"]["like"]["drifted"], out["batches"]
    assert out["flagged_batches"] == "1 of 2" and out["features"] == "pixels"

    r = runner.invoke(
        app,
        ["drift", "check", str(incoming / "washed"), "--reference", str(ref), "--out", str(tmp_path / "washed"), *args],
    )
    assert r.exit_code == 1 and "saturation" in r.output, r.output
    assert (tmp_path / "washed" / "drift.png").stat().st_size > 0
    r = runner.invoke(
        app,
        [
            "drift",
            "check",
            str(incoming / "like"),
            "--reference",
            str(ref),
            "--workspace",
            str(tmp_path),
            "--features",
            "nonsense",
        ],
    )
    assert r.exit_code == 2 and "pixels" in r.output, r.output
