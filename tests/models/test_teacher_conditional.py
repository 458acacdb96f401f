"""Tier 2: the teacher recipe's class-conditional mode (classifier-free guidance training) on tiny labelled data."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from redistill.config import ConfigError, TeacherParams, load_params
from redistill.core import checkpoint
from redistill.data import shapes
from redistill.data.base import DataError
from redistill.data.images import load_image_folder


def tiny_recipe(**kw) -> TeacherParams:
    base = dict(
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=8,
        train_steps=30,
        batch_size=8,
        warmup_steps=5,
        checkpoint_every=10,
        class_conditional=True,
        label_dropout=0.5,
        guidance_scale=2.5,
    )
    base.update(kw)
    return TeacherParams(**base)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return shapes.write(tmp_path_factory.mktemp("shapes") / "labelled", 40, size=8, channels=3, seed=0, labels=True)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_conditional_teacher_saves_a_guided_class_conditional_pipeline(labelled, tmp_path):
    from redistill.models import adapter_for
    from redistill.models.class_pipeline import ClassConditionalPipeline
    from redistill.models.pipelines import load_pipeline
    from redistill.teachers.train import train_teacher

    data = load_image_folder(labelled)
    num_classes = int(data.labels.max()) + 1
    assert num_classes == len(shapes.CLASSES)  # every shape is drawn, so the null class is 5
    out = tmp_path / "teachers" / "cond"
    summary = train_teacher(tiny_recipe(), data, out, tmp_path / "ckpt", log=lambda m: None)
    assert summary["num_classes"] == num_classes and summary["recipe"]["class_conditional"] is True
    assert json.loads((out / "redistill_teacher.json").read_text())["num_classes"] == num_classes
    assert (out / "pipeline_redistill.py").is_file()  # loadable without redistill, as exported students are

    pipe = load_pipeline(out)
    assert isinstance(pipe, ClassConditionalPipeline)
    assert pipe.unet.config.num_class_embeds == num_classes + 1
    adapter = adapter_for(pipe)
    assert adapter.conditional and adapter.kind == "class-conditional-pixel"
    assert adapter.num_classes == num_classes and adapter.null_class == num_classes
    assert adapter.guidance_scale == 2.5  # the recipe's, not the pipeline's default of 1
    img = adapter.sample(3, 2, torch.Generator().manual_seed(0), cond=torch.tensor([0, 2, 4]))
    assert img.shape == (3, 3, 8, 8) and torch.isfinite(img).all()


def test_the_null_class_is_trained_at_the_dropout_rate(labelled, tmp_path):
    # with label_dropout 0 the null class's embedding never gets a gradient; with 0.5 it does
    from redistill.models.pipelines import load_pipeline
    from redistill.teachers.train import build_unet, cfg_labels, train_teacher

    y = torch.arange(5).repeat(2000)
    dropped = cfg_labels(y, 5, 0.1, torch.Generator().manual_seed(0)) == 5
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (cfg_labels(y, 5, 0.0, torch.Generator().manual_seed(0)) == y).all()

    data = load_image_folder(labelled)
    torch.manual_seed(0)
    init = build_unet(tiny_recipe(), 3, 8, 5).class_embedding.weight[5].detach().clone()
    for dropout, moved in ((0.0, False), (0.5, True)):
        out = tmp_path / f"d{dropout}"
        train_teacher(
            tiny_recipe(label_dropout=dropout, guidance_scale=1.0, train_steps=10),
            data,
            out,
            tmp_path / "ckpt",
            log=lambda m: None,
        )
        null = load_pipeline(out).unet.class_embedding.weight[5]
        assert (not torch.equal(null, init)) == moved, f"label_dropout {dropout}"


def test_unlabelled_data_is_refused_naming_labels_csv(tmp_path):
    from redistill.cli import app
    from redistill.teachers.train import train_teacher

    bare = shapes.write(tmp_path / "bare", 12, size=8, channels=3, seed=0, labels=False)
    out = tmp_path / "teachers" / "cond"
    with pytest.raises(DataError, match="labels.csv"):
        train_teacher(tiny_recipe(), load_image_folder(bare), out, tmp_path / "ckpt", log=lambda m: None)
    assert not out.exists()
    # the CLI says the same for any folder given with --data
    params = tmp_path / "params.yaml"
    params.write_text(
        "teacher: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, train_steps: 2, "
        "batch_size: 4, warmup_steps: 1, class_conditional: true}\n"
    )
    r = CliRunner().invoke(
        app,
        [
            "teacher",
            "train",
            "--data",
            str(bare),
            "--out",
            str(out),
            "--workspace",
            str(tmp_path),
            "--params",
            str(params),
        ],
    )
    assert r.exit_code != 0 and "labels.csv" in r.output, r.output
    assert not out.exists()


def test_cli_trains_a_conditional_teacher_on_any_labelled_folder(labelled, tmp_path):
    from redistill.cli import app
    from redistill.models.pipelines import load_pipeline

    params = tmp_path / "params.yaml"
    params.write_text(
        "teacher: {block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 8, train_steps: 2, "
        "batch_size: 4, warmup_steps: 1, class_conditional: true, guidance_scale: 3.0}\n"
    )
    out = tmp_path / "teachers" / "cond"
    r = CliRunner().invoke(
        app,
        [
            "teacher",
            "train",
            "--data",
            str(labelled),
            "--out",
            str(out),
            "--workspace",
            str(tmp_path),
            "--params",
            str(params),
        ],
    )
    assert r.exit_code == 0, r.output
    pipe = load_pipeline(out)
    assert pipe.config.null_class == 5 and pipe.config.guidance_scale == 3.0


def test_killed_conditional_training_resumes_to_the_same_weights(labelled, tmp_path, monkeypatch):
    """Stopped between checkpoints (as a kill would), then run again: it resumes and ends where an unbroken run
    ends, label dropout included (its draws come from the checkpointed generator)."""
    from redistill.teachers.train import train_teacher

    data = load_image_folder(labelled)
    recipe = tiny_recipe()

    class Killed(Exception):
        pass

    save, calls = checkpoint.save, []

    def save_then_die(path, *args):
        calls.append(path.name)
        if len(calls) == 2:  # step 20: the steps since checkpoint-10 are lost, as in a kill
            raise Killed
        save(path, *args)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    out, ckpt = tmp_path / "teachers" / "resumed", tmp_path / "ckpt"
    with pytest.raises(Killed):
        train_teacher(recipe, data, out, ckpt, log=lambda m: None)
    monkeypatch.setattr(checkpoint, "save", save)
    assert [p.name for p in checkpoint.complete(ckpt)] == ["checkpoint-10"] and not out.exists()

    logs: list[str] = []
    train_teacher(recipe, data, out, ckpt, log=logs.append)
    assert any("resumed from" in m and "step 10" in m for m in logs), logs
    ref = tmp_path / "teachers" / "unbroken"
    train_teacher(recipe, data, ref, tmp_path / "ckpt-ref", log=lambda m: None)
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed run differs from the unbroken one by {worst}"


def test_unconditional_recipe_ignores_the_conditional_settings(labelled, tmp_path):
    # the default path is the recipe of before: a labelled folder still gives a plain DDPMPipeline, and the
    # conditional keys change neither its weights nor its checkpoint fingerprint
    from diffusers import DDPMPipeline

    from redistill.models.pipelines import load_pipeline
    from redistill.teachers.train import _recipe_hash, train_teacher

    data = load_image_folder(labelled)
    plain = tiny_recipe(class_conditional=False, train_steps=5)
    other = tiny_recipe(class_conditional=False, train_steps=5, label_dropout=0.3, guidance_scale=7.0)
    assert _recipe_hash(plain, data) == _recipe_hash(other, data)
    assert _recipe_hash(plain, data) != _recipe_hash(tiny_recipe(train_steps=5), data)
    for name, recipe in (("a", plain), ("b", other)):
        train_teacher(recipe, data, tmp_path / name, tmp_path / f"ckpt-{name}", log=lambda m: None)
    pipe = load_pipeline(tmp_path / "a")
    assert type(pipe) is DDPMPipeline and pipe.unet.config.num_class_embeds is None
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_keeps_a_conditional_teacher_conditional(labelled, tmp_path):
    from redistill.models.class_pipeline import ClassConditionalPipeline
    from redistill.models.pipelines import PipelineError, load_pipeline
    from redistill.teachers.train import train_teacher

    data = load_image_folder(labelled)
    train_teacher(tiny_recipe(train_steps=3), data, tmp_path / "cond", tmp_path / "k1", log=lambda m: None)
    train_teacher(
        tiny_recipe(train_steps=3, class_conditional=False),
        data,
        tmp_path / "plain",
        tmp_path / "k2",
        log=lambda m: None,
    )
    train_teacher(
        tiny_recipe(train_steps=3, seed=1),
        data,
        tmp_path / "ft",
        tmp_path / "k3",
        log=lambda m: None,
        init=tmp_path / "cond",
    )
    ft = load_pipeline(tmp_path / "ft")
    assert isinstance(ft, ClassConditionalPipeline) and ft.config.null_class == 5
    with pytest.raises(PipelineError, match="no class embeddings"):
        train_teacher(
            tiny_recipe(train_steps=3),
            data,
            tmp_path / "x",
            tmp_path / "k4",
            log=lambda m: None,
            init=tmp_path / "plain",
        )
    with pytest.raises(PipelineError, match="set teacher.class_conditional to true"):
        train_teacher(
            tiny_recipe(train_steps=3, class_conditional=False),
            data,
            tmp_path / "y",
            tmp_path / "k5",
            log=lambda m: None,
            init=tmp_path / "cond",
        )


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(label_dropout=1.0), "teacher.label_dropout"),
        (dict(label_dropout=-0.1), "teacher.label_dropout"),
        (dict(guidance_scale=-1.0), "teacher.guidance_scale"),
        (dict(guidance_scale=float("nan")), "teacher.guidance_scale"),
        (dict(guidance_scale=float("inf")), "teacher.guidance_scale"),
        (dict(class_conditional=True, label_dropout=0.0, guidance_scale=2.0), "teacher.label_dropout is 0"),
    ],
)
def test_bad_conditional_settings_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TeacherParams(**bad)


def test_conditional_settings_read_from_params_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teacher: {class_conditional: true, label_dropout: 0.2, guidance_scale: 1.5}\n")
    t = load_params(params).teacher
    assert (t.class_conditional, t.label_dropout, t.guidance_scale) == (True, 0.2, 1.5)
    TeacherParams(class_conditional=True, label_dropout=0.0, guidance_scale=1.0)  # unguided: no null class needed
    params.write_text('teacher: {class_conditional: "yes"}\n')
    with pytest.raises(ConfigError, match="teacher.class_conditional must be true or false"):
        load_params(params)
    params.write_text("teacher: {label_dropout: 1.5}\n")
    with pytest.raises(ConfigError, match=r"teacher\.label_dropout must be in \[0, 1\)"):
        load_params(params)
    # the repository's own settings keep the committed unconditional teacher's recipe
    from pathlib import Path

    assert load_params(Path(__file__).resolve().parents[2] / "params.yaml").teacher.class_conditional is False
