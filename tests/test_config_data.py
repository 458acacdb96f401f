"""Settings and the embedded data: unknown keys fail clearly; `prepare` is deterministic and drifts as designed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from redistill.config import ConfigError, Params, load_params, parse_params
from redistill.data import (
    DataError,
    build_digits,
    dir_md5,
    load_image_folder,
    write_image_folder,
)


def test_repository_params_yaml_loads_and_covers_every_field(tmp_path):
    import yaml
    from conftest import REPO

    p = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every setting is written out in params.yaml: it is the single, complete source
    def keys(d):  # nested key sets: method subsections must be complete too
        return {k: keys(v) if isinstance(v, dict) else None for k, v in d.items()}

    assert keys(raw) == keys(Params().to_dict())
    assert p.teacher.num_train_timesteps == 1000


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_params({"teacher": {"train_stpes": 10}})
    msg = str(e.value)
    assert "teacher.train_stpes" in msg and "train_steps" in msg and "batch_size" in msg


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown section 'teachr'.*prepare, features, teacher"):
        parse_params({"teachr": {}})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"teacher.lr must be a number"):
        parse_params({"teacher": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"evaluate.num_samples must be a whole number"):
        parse_params({"evaluate": {"num_samples": 2.5}})


def test_load_params_reports_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("evaluate:\n  bootstrp: 3\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_params(f)


def test_prepare_is_seeded_and_deterministic():
    a, b = build_digits(Params().prepare), build_digits(Params().prepare)
    for name in a:
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1])
    other = build_digits(Params(prepare=Params().prepare.__class__(seed=1)).prepare)
    assert not np.array_equal(a["nodrift"][0], other["nodrift"][0])


def test_prepare_splits_and_drifts():
    p = Params().prepare
    s = build_digits(p)
    ref_imgs, ref_y = s["reference"]
    assert ref_imgs.shape[1:] == (8, 8) and ref_imgs.dtype == np.uint8
    assert len(ref_y) + len(s["holdout"][1]) == 1797
    # holdout images never appear in the reference (the classifier's test split is really held out)
    ref_set = {im.tobytes() + bytes([y]) for im, y in zip(ref_imgs, ref_y)}
    assert sum(im.tobytes() + bytes([y]) in ref_set for im, y in zip(*s["holdout"])) < 5  # digits has a few exact duplicates
    share = lambda y: np.isin(y, p.class_mix_classes).mean()  # noqa: E731
    assert abs(share(s["nodrift"][1]) - share(ref_y)) < 0.1
    assert share(s["class_mix"][1]) == pytest.approx(p.class_mix_share, abs=0.01)
    assert share(ref_y) < 0.4
    # style drift: thicker strokes, so more ink per image than the reference
    assert s["style"][0].mean() > 1.15 * ref_imgs.mean()
    assert abs(s["nodrift"][0].mean() - ref_imgs.mean()) < 0.1 * ref_imgs.mean()


def test_image_folder_round_trip_and_md5(tmp_path):
    imgs = (np.arange(3 * 64).reshape(3, 8, 8) % 256).astype(np.uint8)
    write_image_folder(tmp_path / "a", imgs, np.array([1, 2, 3]))
    write_image_folder(tmp_path / "b", imgs, np.array([1, 2, 3]))
    s = load_image_folder(tmp_path / "a")
    assert s.images.shape == (3, 1, 8, 8) and s.labels.tolist() == [1, 2, 3]
    assert np.allclose(s.images[:, 0] * 255, imgs)
    assert dir_md5(tmp_path / "a") == dir_md5(tmp_path / "b")
    assert dir_md5(tmp_path / "a").endswith(".dir")


def test_image_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds 0 PNG images"):
        load_image_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_image_folder(mixed, np.zeros((2, 8, 8), np.uint8), None)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "odd.png")
    with pytest.raises(DataError, match="one size"):
        load_image_folder(mixed)
    bad = tmp_path / "badlabels"
    write_image_folder(bad, np.zeros((1, 8, 8), np.uint8), None)
    (bad / "labels.csv").write_text("file,label\n../../etc/passwd,1\n")
    with pytest.raises(DataError, match="not a plain file name"):
        load_image_folder(bad)


def test_params_yaml_reads_yaml_1_2_booleans_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml and drops the quotes of "no"; it must still read as the string."""
    f = tmp_path / "params.yaml"
    f.write_text("distill:\n  mixed_precision: no\n")
    assert load_params(f).distill.mixed_precision == "no"
    f.write_text("distill:\n  method: 7\n")
    with pytest.raises(ConfigError):
        load_params(f)
