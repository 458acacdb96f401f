"""Data validation with a real great_expectations 1.x suite over the per-image table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from redistill.config import ValidateParams
from redistill.data.expectations import validate_folder, validate_table
from redistill.data.validation import image_table, reference_profile
from redistill.tasks.validate import validate_data


@pytest.fixture()
def ref(digits_ws):
    return digits_ws / "data" / "reference"


def copy_of(src, dst, n=None):
    dst.mkdir(parents=True)
    files = sorted(p.name for p in src.glob("*.png"))[:n]
    for f in files:
        shutil.copy2(src / f, dst / f)
    return dst


def test_reference_and_a_like_batch_pass_and_leave_gx_files(digits_ws, ref, tmp_path):
    r = validate_folder(ref, ref, ValidateParams(), tmp_path / "ref")
    assert r.success, r.message()
    r = validate_data.fn(digits_ws / "data" / "incoming" / "nodrift", ref, ValidateParams(), tmp_path / "nd")
    assert r.success and r.num_images == 150
    suite = json.loads(r.suite_json.read_text())
    types = {e["type"] for e in suite["expectations"]}
    assert {
        "expect_column_values_to_be_unique",
        "expect_table_row_count_to_be_between",
        "expect_column_kl_divergence_to_be_less_than",
    } <= types
    assert json.loads(r.result_json.read_text())["success"] is True
    assert r.data_docs.is_file() and "<html" in r.data_docs.read_text().lower()


def test_wrong_size_unreadable_and_duplicate_images_fail_with_reasons(ref, tmp_path):
    bad = copy_of(ref, tmp_path / "bad", n=150)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(bad / "zz-wrong-size.png")
    (bad / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy2(bad / sorted(p.name for p in bad.glob("0*.png"))[0], bad / "zz-duplicate.png")
    r = validate_folder(bad, ref, ValidateParams(), tmp_path / "out")
    assert not r.success
    text = r.message()
    for column in ("height", "width", "readable", "pixel_sha256"):
        assert f"column={column}" in text, text
    assert json.loads(r.result_json.read_text())["success"] is False


def test_too_few_images_and_an_empty_folder_fail(ref, tmp_path):
    few = copy_of(ref, tmp_path / "few", n=10)
    r = validate_folder(few, ref, ValidateParams(), tmp_path / "out")
    assert not r.success and "expect_table_row_count_to_be_between" in r.message()
    (tmp_path / "empty").mkdir()
    r = validate_folder(tmp_path / "empty", ref, ValidateParams(), tmp_path / "out2")
    assert not r.success and "holds no PNG images" in r.message()


def test_nan_and_inf_pixels_fail(ref, tmp_path):
    # PNG cannot hold NaN, so the table is altered the way a float image format would show it
    p = ValidateParams()
    table = image_table(ref)
    table.loc[0, "nan_count"] = 3
    table.loc[1, "inf_count"] = 1
    r = validate_table(table, reference_profile(image_table(ref), p), p, tmp_path / "out")
    assert not r.success
    assert "column=nan_count" in r.message() and "column=inf_count" in r.message()


def test_a_skewed_label_mix_fails_the_kl_expectation(ref, tmp_path):
    p = ValidateParams()
    table = image_table(ref)
    skewed = table[table["label"].isin([0, 1])]  # two classes of ten
    r = validate_table(skewed, reference_profile(table, p), p, tmp_path / "out")
    assert not r.success and "kl_divergence" in r.message()


def dimmed(src, dst, factor=0.6):
    """A copy of an image folder at `factor`× contrast: per-image std below the reference's band."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.png"):
        Image.fromarray((np.asarray(Image.open(f)) * factor).astype(np.uint8)).save(f)
    return dst


@pytest.fixture()
def grown_ws(digits_ws, tmp_path):
    """A workspace whose representative set the watch grew by a dimmed batch (no DVC: nothing to version)."""
    from redistill.tasks.watch import update_representative

    root = tmp_path / "ws"
    for sub in ("reference", "features"):
        shutil.copytree(digits_ws / "data" / sub, root / "data" / sub)
    dim = dimmed(digits_ws / "data" / "incoming" / "nodrift", tmp_path / "dim")
    grown = update_representative.fn(root, root / "data" / "reference", dim, "dim")
    return root, dim, grown


def test_a_set_grown_by_a_dimmed_batch_fails_against_the_reference_bands_alone(digits_ws, ref, tmp_path):
    """What a grown set met before it recorded what it grew from (and what any folder without that record still
    meets): the reference's bands alone. A drifted batch is a tenth of the set, far above 1 - mostly."""
    from redistill.data.growth import merge_batch

    dim = dimmed(digits_ws / "data" / "incoming" / "nodrift", tmp_path / "dim")
    merge_batch(ref, dim, tmp_path / "grown", "dim")
    r = validate_folder(tmp_path / "grown", ref, ValidateParams(), tmp_path / "out")
    assert not r.success and "column=std" in r.message() and "dim__" in r.message(), r.message()
    assert r.bands_from.startswith(str(ref)) and "widened" not in r.bands_from


def test_a_grown_set_is_validated_against_the_reference_it_grew_from_widened_by_its_batches(
    digits_ws, grown_ws, tiny_pipeline, tmp_path
):
    from redistill.config import Params
    from redistill.cycle.runs import resolve_inputs
    from redistill.data.images import dir_md5
    from redistill.tasks.watch import update_representative

    root, dim, grown = grown_ws
    rep, ref = root / "data" / "representative", root / "data" / "reference"
    record = json.loads((rep / "grown_from.json").read_text())
    assert grown["grown_from"] == record and record["reference"] == {"path": "data/reference", "md5": dir_md5(ref)}
    assert [(b["name"], b["prefix"], b["images"], b["md5"]) for b in record["batches"]] == [
        ("dim", "dim__", 150, dir_md5(dim))
    ]
    assert grown["md5"] == dir_md5(rep)  # the record is part of the set's md5: the key and DVC cover it

    r = validate_data.fn(rep, ref, ValidateParams(), tmp_path / "out", dir_md5(ref))
    assert r.success, r.message()
    assert r.bands_from == f"data/reference {dir_md5(ref)} widened by the accepted batches dim (grown_from.json)"
    assert r.bands_from in r.message()
    profile = json.loads((tmp_path / "out" / "profile.json").read_text())
    own = reference_profile(image_table(ref), ValidateParams())
    assert profile["bands_from"] == r.bands_from and profile["bands"]["std_c0"][0] < own["bands"]["std_c0"][0]
    assert profile["bands"]["std_c0"][1] == own["bands"]["std_c0"][1] and profile["height"] == own["height"]
    assert json.loads((tmp_path / "out" / "basis.json").read_text())["batches"] == record["batches"]

    inputs = resolve_inputs(tiny_pipeline, rep, Params(), root)  # the key covers the reference the bands come from
    assert inputs["validation_reference_md5"] == dir_md5(ref) and inputs["validation_bands"] == r.bands_from

    # the structural checks still hold for the grown set: a duplicated image fails them
    shutil.copy2(rep / "dim__00000.png", rep / "dim__duplicate.png")
    r = validate_folder(rep, ref, ValidateParams(), tmp_path / "dup")
    assert not r.success and "pixel-for-pixel duplicates" in r.message()
    (rep / "dim__duplicate.png").unlink()

    # grown again: the same reference, one more accepted batch
    again = update_representative.fn(root, rep, digits_ws / "data" / "incoming" / "style", "style")
    assert again["grown_from"]["reference"] == record["reference"]
    assert [b["name"] for b in again["grown_from"]["batches"]] == ["dim", "style"]
    assert validate_folder(rep, ref, ValidateParams(), tmp_path / "again").success


def test_a_grown_set_is_refused_by_name_when_the_reference_is_not_the_one_it_grew_from(grown_ws, tmp_path):
    from redistill.data.base import DataError
    from redistill.data.images import dir_md5
    from redistill.tasks.watch import update_representative

    root, dim, _ = grown_ws
    rep, ref = root / "data" / "representative", root / "data" / "reference"
    was = dir_md5(ref)
    r = validate_folder(rep, ref, ValidateParams(), tmp_path / "key", reference_md5="0" * 32 + ".dir")
    assert not r.success and "changed since the cycle resolved its inputs" in r.message()  # not what the key covers

    (ref / sorted(p.name for p in ref.glob("*.png"))[0]).unlink()  # data/reference replaced under the grown set
    r = validate_folder(rep, ref, ValidateParams(), tmp_path / "out")
    assert not r.success and len(r.failed) == 1, r.message()
    assert f"grew from data/reference at {was}" in r.message() and f"is now {dir_md5(ref)}" in r.message()
    assert "dvc checkout data/reference" in r.message() and "start the representative set again" in r.message()
    assert json.loads((tmp_path / "out" / "basis.json").read_text())["problem"] == r.failed[0]

    (rep / "grown_from.json").write_text("{}")  # a damaged record is refused, never read as "no record"
    r = validate_folder(rep, ref, ValidateParams(), tmp_path / "damaged")
    assert not r.success and "grown_from.json is damaged" in r.message()

    (rep / "grown_from.json").unlink()  # a set an older redistill grew: what it grew from is unknown
    with pytest.raises(DataError, match="no grown_from.json"):
        update_representative.fn(root, rep, dim, "dim-2")
