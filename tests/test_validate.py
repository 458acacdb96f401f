"""Data validation with a real great_expectations 1.x suite over the per-image table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from redistill.tasks.validate import validate_data, validate_folder, validate_table

from redistill.config import ValidateParams
from redistill.validation import image_table, reference_profile


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
    assert {"expect_column_values_to_be_unique", "expect_table_row_count_to_be_between",
            "expect_column_kl_divergence_to_be_less_than"} <= types
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
