"""Tier 2: the clip: and dinov2: feature spaces on tiny random-weight stand-ins of the real architectures
(saved with save_pretrained in tmp folders, never downloaded), and the gate refusing to compare FIDs
measured in different spaces."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from redistill.config import ConfigError, EvaluateParams, GateParams
from redistill.evaluation import spaces as feature_spaces
from redistill.evaluation.gate import judge

CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
# the statistics the models were trained with (OpenAI CLIP; ImageNet for DINOv2), written out here on purpose
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO = dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)


def save(model_cls, config, folder, seed=0):
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """clip (with projection), clip-vision (no projection), a second clip with other weights, dinov2."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("spaces")
    return {
        "clip": save(CLIPVisionModelWithProjection, CLIPVisionConfig(**CLIP), root / "clip"),
        "clip_other": save(CLIPVisionModelWithProjection, CLIPVisionConfig(**CLIP), root / "clip_other", seed=1),
        "clip_vision": save(CLIPVisionModel, CLIPVisionConfig(**CLIP), root / "clip_vision"),
        "dinov2": save(Dinov2Model, Dinov2Config(**DINO), root / "dinov2"),
    }


def images(n, channels, size, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, channels, size, size), generator=g) * scale


@pytest.mark.parametrize("key,kind,dim", [("clip", "clip", 16), ("clip_vision", "clip", 32), ("dinov2", "dinov2", 32)])
def test_features_are_finite_with_the_right_shape_for_grey_and_rgb(folders, tmp_path, key, kind, dim):
    space = feature_spaces.load(f"{kind}:{folders[key]}", tmp_path)
    ext = space.extractor
    assert ext.num_features == dim
    for x in (images(3, 1, 8), images(5, 3, 16, seed=1)):
        f = ext(x)
        assert f.shape == (len(x), dim) and torch.isfinite(f).all()
        assert f.std(0).max() > 0  # different images, different features
    # what the model itself returns for the preprocessed images: image_embeds, pooled output, CLS token
    x = images(4, 3, 16, seed=2)
    out = ext.model(pixel_values=ext.preprocess(x))
    expected = {
        "clip": lambda o: o.image_embeds,
        "clip_vision": lambda o: o.pooler_output,
        "dinov2": lambda o: o.last_hidden_state[:, 0],
    }[key](out)
    torch.testing.assert_close(ext(x), expected)
    # grey is the same picture as its RGB repeat
    grey = images(2, 1, 8, seed=3)
    torch.testing.assert_close(ext(grey), ext(grey.repeat(1, 3, 1, 1)))


@pytest.mark.parametrize(
    "key,kind,mean,std", [("clip", "clip", CLIP_MEAN, CLIP_STD), ("dinov2", "dinov2", IMAGENET_MEAN, IMAGENET_STD)]
)
def test_preprocessing_resizes_to_the_models_size_and_normalises_with_its_statistics(
    folders, tmp_path, key, kind, mean, std
):
    ext = feature_spaces.load(f"{kind}:{folders[key]}", tmp_path).extractor
    px = ext.preprocess(torch.full((1, 1, 8, 8), 0.5))  # a flat grey image stays flat through any resize
    size = {"clip": 32, "dinov2": 28}[key]
    assert px.shape == (1, 3, size, size)
    for c in range(3):  # hand-computed: (0.5 − mean) / std
        torch.testing.assert_close(px[0, c], torch.full((size, size), (0.5 - mean[c]) / std[c]))
    with pytest.raises(ValueError, match="grey or RGB images, got 4 channels"):
        ext(torch.rand(1, 4, 8, 8))


def test_the_sha256_is_of_the_folders_weights_and_config(folders, tmp_path):
    name = f"clip:{folders['clip']}"
    sha = feature_spaces.sha256s([name], tmp_path)[name]
    assert feature_spaces.weights_file(name, tmp_path) == folders["clip"]
    assert feature_spaces.load(name, tmp_path).sha256 == sha
    # a byte-identical copy elsewhere is the same space; a README beside the weights does not change it
    copy = shutil.copytree(folders["clip"], tmp_path / "copy")
    (copy / "README.md").write_text("notes\n")
    assert feature_spaces.sha256s([f"clip:{copy}"], tmp_path)[f"clip:{copy}"] == sha
    # other weights, or another config (here: the input size), are another space
    other = f"clip:{folders['clip_other']}"
    assert feature_spaces.sha256s([other], tmp_path)[other] != sha
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "image_size": 16}))
    assert feature_spaces.sha256s([f"clip:{copy}"], tmp_path)[f"clip:{copy}"] != sha


def test_a_pickle_only_folder_is_refused_without_unpickling(folders, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(folders["clip"] / "config.json", folder)
    torch.save({"visual_projection.weight": torch.zeros(16, 32)}, folder / "pytorch_model.bin")
    for call in (
        lambda: feature_spaces.load(f"clip:{folder}", tmp_path),
        lambda: feature_spaces.sha256s([f"clip:{folder}"], tmp_path),
    ):
        with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\); redistill never unpick") as e:
            call()
        assert "save_pretrained(new_folder, safe_serialization=True)" in str(e.value)


def test_a_missing_folder_or_the_wrong_model_is_refused_with_the_fix(folders, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError,
        match=r"folder .*nowhere does not exist; pass a folder written by "
        r"transformers' CLIPVisionModelWithProjection.save_pretrained",
    ):
        feature_spaces.sha256s([f"clip:{missing}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="Dinov2Model.save_pretrained"):
        feature_spaces.load(f"dinov2:{missing}", tmp_path)
    # a DINOv2 folder given as clip: (from_pretrained would fill a CLIP with random weights and say nothing)
    with pytest.raises(
        ValueError,
        match=rf"holds a 'dinov2' model \(Dinov2Model\), not a CLIP vision model; "
        rf"pass it as dinov2:{folders['dinov2']}",
    ):
        feature_spaces.load(f"clip:{folders['dinov2']}", tmp_path)
    with pytest.raises(ValueError, match="pass it as clip:"):
        feature_spaces.sha256s([f"dinov2:{folders['clip']}"], tmp_path)
    # weights that do not fill the class the config names: refused, not randomly completed
    lying = shutil.copytree(folders["clip_vision"], tmp_path / "lying")
    cfg = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**cfg, "architectures": ["CLIPVisionModelWithProjection"]}))
    with pytest.raises(
        ValueError,
        match=r"do not fill a CLIPVisionModelWithProjection \(1 missing, e.g. "
        r"visual_projection.weight\)",
    ):
        feature_spaces.load(f"clip:{lying}", tmp_path)
    (lying / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json, so it is not a save_pretrained folder"):
        feature_spaces.load(f"clip:{lying}", tmp_path)


@pytest.mark.parametrize(
    "name,ok",
    [
        ("classifier", True),
        ("encoder", True),
        ("inception:/w/inception.safetensors", True),
        ("inception:", True),
        ("clip:/models/clip-vit-b32", True),
        ("dinov2:~/dinov2-base", True),
        ("clip:", False),
        ("dinov2:", False),
        ("clip", False),
        ("inception", False),
        ("dino:/x", False),
        ("CLIP:/x", False),
    ],
)
def test_names_are_checked_the_same_in_the_settings_and_the_loader(name, ok):
    if ok:
        feature_spaces.check_name(name)
        EvaluateParams(features=[name])
        return
    with pytest.raises(ValueError, match="clip:/path/to/clip-folder or dinov2:/path/to/dinov2-folder"):
        feature_spaces.check_name(name)
    with pytest.raises(ConfigError, match="clip:/path/to/clip-folder or dinov2:/path/to/dinov2-folder"):
        EvaluateParams(features=[name])


def test_transformers_is_imported_only_when_a_folder_space_is_loaded():
    import subprocess
    import sys

    code = (
        "import sys, redistill.evaluation.spaces, redistill.evaluation.gate, redistill.config;"
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_fid_through_the_metric_suite_in_a_clip_space(folders, tmp_path):
    from redistill.evaluation.suite import quality_in_space

    space = feature_spaces.load(f"clip:{folders['clip']}", tmp_path)
    p = EvaluateParams(num_samples=64, max_samples=64, bootstrap=10, kid_subset_size=32, floor_splits=2)
    real = images(96, 3, 16, seed=10).numpy().astype(np.float32)
    near = images(96, 3, 16, seed=11)  # the same distribution, other draws
    far = images(96, 3, 16, seed=12, scale=0.3)  # darker: far from the data in any space
    q = quality_in_space(space.extractor, real, far, near, False, p)
    assert q["num_features"] == 16 and q["dead_features"] == 0
    for k in ("fid", "reference_fid", "fid_floor", "kid"):
        assert math.isfinite(q[k]), k
    assert q["fid"] > q["reference_fid"] > 0  # the darker set is further from the data than a fresh draw
    assert q["fid_gap"] == pytest.approx(q["fid"] - q["reference_fid"])


def result_in(spaces: dict[str, str], fid=0.40, ci=(0.30, 0.55)):
    """A gate-ready evaluation result whose figures were measured in `spaces` (name → sha256), first primary."""
    per_space = {
        n: {
            "fid_gap_floors": 0.1,
            "fid_gap": 0.04,
            "fid_gap_ci95": [0.02, 0.06],
            "fid_floor": 0.4,
            "fid_gap_halfwidth_floors": 0.05,
        }
        for n in spaces
    }
    return {
        "feature_spaces": dict(spaces),
        "quality": {
            "fid": fid,
            "fid_ci95": list(ci),
            "kid": 0.01,
            "kid_ci95": [0.0, 0.03],
            "recognisable_share": 0.9,
            "feature_space": next(iter(spaces)),
            "spaces": per_space,
        },
        "fidelity": {"psnr_db": 25.0, "ssim": 0.95},
        "speed": {"speedup_throughput": 12.0},
    }


def test_the_gate_refuses_a_champion_measured_in_another_clip_space(folders, tmp_path):
    a, b = f"clip:{folders['clip']}", f"clip:{folders['clip_other']}"
    sha = feature_spaces.sha256s([a, b], tmp_path)
    student = result_in({a: sha[a]})
    champion = result_in({b: sha[b]}, fid=1.0, ci=(0.9, 1.1))  # a worse champion: passing would be easy
    d = judge(student, champion, GateParams(), "progressive")
    assert not d.passed
    assert [c.name for c in d.failed()] == ["feature_spaces_vs_champion"]
    assert not {"fid_vs_champion", "kid_vs_champion"} & {c.name for c in d.checks}  # never compared
    assert (
        f"the champion's figures are in feature space(s) {b} (sha256 {sha[b][:12]}…) and the student's in "
        f"feature space(s) {a} (sha256 {sha[a][:12]}…), so they are never compared; re-evaluate the champion "
        "in the student's feature spaces"
    ) in d.reasons()
    # measured in the same space, they are compared as before
    same = judge(student, result_in({a: sha[a]}, fid=1.0, ci=(0.9, 1.1)), GateParams(), "progressive")
    assert same.passed and [c.name for c in same.checks][-2:] == ["fid_vs_champion", "kid_vs_champion"]
    worse = judge(result_in({a: sha[a]}, fid=0.6, ci=(0.5, 0.75)), result_in({a: sha[a]}), GateParams(), "progressive")
    assert [c.name for c in worse.failed()] == ["fid_vs_champion"]


def test_the_decision_artifact_explains_the_refusal(monkeypatch):
    from redistill.tasks import gate as gate_task

    published = {}
    monkeypatch.setattr(gate_task, "create_markdown_artifact", lambda **kw: published.update(kw))
    student, champion = result_in({"clip:/a": "a" * 64}), result_in({"clip:/b": "b" * 64})
    for r in (student, champion):
        r["reference"], r["steps"] = {"steps": 50}, 2
        r["quality"].update(reference_fid=0.3, reference_kid=0.01)
        r["speed"].update(
            reference_latency_ms_p50=10.0, latency_ms_p50=1.0, reference_throughput_img_s=5.0, throughput_img_s=50.0
        )
    decision = gate_task.gate_student.fn(student, champion, GateParams(), "progressive")
    assert not decision["passed"] and "feature_spaces_vs_champion" in decision["reasons"]
    assert (
        "- **feature_spaces_vs_champion**: the champion's figures are in feature space(s) clip:/b (sha256 "
        "bbbbbbbbbbbb…) and the student's in feature space(s) clip:/a"
    ) in published["markdown"]
