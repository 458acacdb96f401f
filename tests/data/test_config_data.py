"""Settings and the embedded data: unknown keys fail clearly; `prepare` is deterministic and drifts as designed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from redistill.config import ConfigError, Params, load_params, parse_params
from redistill.data.base import DataError
from redistill.data.digits import build_digits
from redistill.data.images import dir_md5, load_image_folder, write_image_folder


def test_repository_params_yaml_loads_and_covers_every_field(tmp_path):
    import yaml

    from helpers import REPO

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


METHOD_CONFIGS = {
    "progressive": "ProgressiveConfig",
    "consistency": "ConsistencyConfig",
    "output": "OutputConfig",
    "adversarial": "AdversarialConfig",
    "dmd": "DMDConfig",
}


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_method_configs_have_the_params_yaml_defaults(method):
    """One settings model: a method config built from the repository's params.yaml, one built from default
    Params and the config's own defaults are the same, field by field (no second set of defaults)."""
    import dataclasses
    import importlib

    from helpers import REPO
    from redistill.methods import method_config

    cls = getattr(importlib.import_module(f"redistill.methods.{method}"), METHOD_CONFIGS[method])
    from_file = load_params(REPO / "params.yaml").distill
    from_file, _ = method_config(dataclasses.replace(from_file, method=method))
    from_defaults, _ = method_config(dataclasses.replace(Params().distill, method=method))
    assert type(from_file) is cls and from_file == from_defaults == cls()
    d, section = Params().distill, dataclasses.asdict(getattr(Params().distill, method))
    own = dataclasses.asdict(cls())
    for name, value in section.items():  # the method's own subsection, e.g. distill.progressive.teacher_steps
        assert own[name] == value, name
    for name in ("target_steps", "batch_size", "lr", "ema_decay", "seed", "checkpoint_every", "mixed_precision"):
        assert own[name] == getattr(d, name), name
    assert own["student_channels"] == tuple(d.student.block_out_channels)
    assert own["student_layers"] == d.student.layers_per_block and own["feature_loss"] == d.student.feature_loss
    assert (own["lora_rank"], own["lora_alpha"], own["lora_targets"]) == (
        d.student.lora_rank,
        d.student.lora_alpha,
        d.student.lora_targets,
    )
    assert set(own) == set(section) | {
        "target_steps",
        "batch_size",
        "lr",
        "ema_decay",
        "seed",
        "checkpoint_every",
        "mixed_precision",
        "student_channels",
        "student_layers",
        "feature_loss",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "init_from",
    }


def test_progressive_config_default_teacher_steps_is_params_yaml_s():
    """The two trees once disagreed here (ProgressiveConfig said 64, params.yaml 16)."""
    from redistill.methods.progressive import ProgressiveConfig

    assert ProgressiveConfig().teacher_steps == Params().distill.progressive.teacher_steps == 16


def test_every_setting_has_a_description():
    import dataclasses

    from redistill.methods.dmd import DMDConfig
    from redistill.methods.training import TrainingConfig

    def walk(cls):
        for name, info in cls.__pydantic_fields__.items():
            assert info.description, f"{cls.__name__}.{name} has no description"
            if dataclasses.is_dataclass(info.annotation):
                walk(info.annotation)

    walk(Params)
    walk(TrainingConfig)
    walk(DMDConfig)


def test_bad_key_names_its_path_the_valid_keys_and_the_closest():
    with pytest.raises(ConfigError) as e:
        parse_params({"distill": {"progressive": {"teacher_step": 8}}})
    msg = str(e.value)
    assert "distill.progressive.teacher_step " in msg and "did you mean distill.progressive.teacher_steps?" in msg
    assert "valid keys of distill.progressive are: teacher_steps, steps_per_round, first_timestep" in msg


def test_bad_value_names_the_key_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"distill.progressive.teacher_steps must be a whole number, got 'many'"):
        parse_params({"distill": {"progressive": {"teacher_steps": "many"}}})
    with pytest.raises(ConfigError, match=r"validate.band_quantiles\[1\] must be a number, got 'x'"):
        parse_params({"validate": {"band_quantiles": [0.005, "x"]}})
    with pytest.raises(ConfigError, match=r"distill.dmd.backward_simulation must be true or false, got 1"):
        parse_params({"distill": {"dmd": {"backward_simulation": 1}}})
    with pytest.raises(ConfigError, match=r"distill.consistency.export must be ema or target, got 'best'"):
        parse_params({"distill": {"consistency": {"export": "best"}}})
    with pytest.raises(ConfigError, match=r"distill.dmd.start must be one of teacher, output, progressive, got 'x'"):
        parse_params({"distill": {"dmd": {"start": "x"}}})
    with pytest.raises(ConfigError, match="did you mean 'distill'"):
        parse_params({"distil": {}})


def test_settings_stay_dataclasses_and_revalidate_on_replace_and_assignment():
    import dataclasses

    from redistill.config import DistillParams
    from redistill.methods.progressive import ProgressiveConfig

    p = Params()
    assert dataclasses.is_dataclass(p) and dataclasses.asdict(p) == p.to_dict()
    assert vars(p.gate.psnr_min) == {"fidelity": 20.0, "trajectory": 20.0, "distribution": 0.0}
    assert dataclasses.replace(p.distill, lr=1).lr == 1.0  # a whole number is a valid float
    with pytest.raises(ConfigError, match="valid methods are"):
        dataclasses.replace(p.distill, method="magic")
    with pytest.raises(ConfigError, match="distill.lr must be a number, got 'fast'"):
        dataclasses.replace(p.distill, lr="fast")
    with pytest.raises(ConfigError, match="unknown key distill.lrr"):
        DistillParams(lrr=1.0)
    d = DistillParams()
    with pytest.raises(ConfigError, match="distill.target_steps must be at least 1"):
        d.target_steps = 0
    assert d.target_steps == 4  # a refused assignment leaves the old value
    with pytest.raises(ConfigError, match="unknown key ProgressiveConfig.teacher_step .*teacher_steps"):
        ProgressiveConfig(teacher_step=4)
    with pytest.raises(ConfigError, match="teacher_steps must be a whole number, got '4'"):
        ProgressiveConfig(teacher_steps="4")
    assert ProgressiveConfig(student_channels=[16, 32]).student_channels == (16, 32)


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
    assert (
        sum(im.tobytes() + bytes([y]) in ref_set for im, y in zip(*s["holdout"])) < 5
    )  # digits has a few exact duplicates
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
