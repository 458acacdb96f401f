"""The embedded text-to-image teacher: its captioned data, its tokenizer, and its recipe at a toy budget (a real
CLIP tokenizer and text encoder, AutoencoderKL and UNet2DConditionModel, saved and reloaded as a stock
StableDiffusionPipeline folder), including the resume of a killed run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from redistill.config import Params, T2ITeacherParams
from redistill.core import checkpoint
from redistill.data.captions import TEMPLATES, class_prompt, class_prompts, prepare_t2i, vocabulary
from redistill.data.digits import build_digits
from redistill.data.images import load_image_folder
from redistill.teachers.t2i_parts import build_tokenizer
from redistill.teachers.text_to_image import train_t2i_teacher

TOY = dict(
    text_width=16,
    text_layers=1,
    vae_block_out_channels=[8, 16],
    vae_steps=4,
    vae_batch_size=8,
    block_out_channels=[16, 32],
    norm_num_groups=8,
    attention_heads=2,
    train_steps=6,
    batch_size=8,
    warmup_steps=1,
    checkpoint_every=2,
    guidance_scale=2.5,
    guidance_sweep=[],
)


def toy(**kw) -> T2ITeacherParams:
    return dataclasses.replace(Params().t2i_teacher, **{**TOY, **kw})


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i") / "data"
    prepare_t2i(Params().prepare, root)
    return root


@pytest.fixture(scope="module")
def toy_set(t2i_data):
    """64 captioned reference images: enough for a toy budget, seconds to train on."""
    d = load_image_folder(t2i_data / "reference")
    return d.images[:64], d.captions[:64]


@pytest.fixture(scope="module")
def toy_teacher(toy_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "digits-t2i"
    train_t2i_teacher(toy(), *toy_set, out, out.parent / "ckpt", log=lambda m: None)
    return out


def _captions(folder: Path) -> dict[str, str]:
    with open(folder / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "caption"]
    return dict(rows[1:])


def test_every_image_has_one_class_caption_and_the_split_is_prepares(t2i_data):
    prompts = [set(class_prompts(c)) for c in range(10)]
    for name in ("reference", "holdout", "incoming/nodrift", "incoming/class_mix", "incoming/style"):
        d = load_image_folder(t2i_data / name)
        caps = _captions(t2i_data / name)
        assert sorted(caps) == d.files and d.size == (16, 16) and d.channels == 1
        assert all(caps[f] in prompts[y] for f, y in zip(d.files, d.labels)), name
    # the templates are dealt out evenly within a folder, the word and the numeral forms both used
    template_of = {class_prompt(t, c): k for k, t in enumerate(TEMPLATES) for c in range(10)}
    used = np.bincount([template_of[c] for c in _captions(t2i_data / "reference").values()], minlength=len(TEMPLATES))
    assert used.max() - used.min() <= 1 and len(TEMPLATES) >= 4
    assert "a handwritten digit seven" in template_of and "a hand-drawn 7" in template_of
    # the same split as `prepare`: the 16×16 holdout is the classifier's 8×8 holdout, upsampled
    split8 = build_digits(Params().prepare)
    for name in ("reference", "holdout"):
        d = load_image_folder(t2i_data / name)
        assert np.array_equal(np.rint(d.images[:, 0, ::2, ::2] * 255), split8[name][0]), name
        assert np.array_equal(d.labels, split8[name][1])


def test_captions_are_deterministic_in_the_seed(t2i_data, tmp_path):
    prepare_t2i(Params().prepare, tmp_path / "same", seed=0)
    prepare_t2i(Params().prepare, tmp_path / "other", seed=1)
    ref = _captions(t2i_data / "reference")
    assert _captions(tmp_path / "same" / "reference") == ref
    assert _captions(tmp_path / "other" / "reference") != ref


def test_the_tokenizer_makes_each_prompt_word_one_token(tmp_path):
    tok = build_tokenizer(toy(), tmp_path / "tok")
    assert tok.model_max_length == 16
    for c in range(10):
        for prompt in class_prompts(c):
            ids = tok(prompt).input_ids
            pieces = prompt.replace("-", " - ").split()
            assert len(ids) == len(pieces) + 2 <= 16, prompt  # start, one token per word, end
            assert tok.decode(ids, skip_special_tokens=True).replace(" - ", "-").strip() == prompt
    assert {"seven", "7", "handwritten", "-"} <= set(vocabulary())


def test_the_toy_recipe_saves_a_text_to_image_teacher(toy_teacher, toy_set):
    from diffusers import StableDiffusionPipeline

    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline, validate_teacher
    from redistill.models.text_to_image import SAMPLING_FILE

    pipe = load_pipeline(toy_teacher)
    model = adapter_for(pipe)
    assert isinstance(pipe, StableDiffusionPipeline) and model.kind == "text-to-image-latent"
    assert json.loads((toy_teacher / SAMPLING_FILE).read_text()) == {"guidance_scale": 2.5}
    assert model.guidance_scale == 2.5 and model.sample_size == (8, 8) and model.channels == 4
    summary = json.loads((toy_teacher / "redistill_teacher.json").read_text())
    assert summary["train_steps"] == 6 and summary["text_encoder"] == "trained jointly" and summary["final_loss"] > 0
    assert not [f for f in toy_teacher.rglob("*") if f.suffix in (".bin", ".pt", ".pth")]
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # the scaling factor gives the UNet unit-variance latents of the training images
    latents = model.encode(torch.from_numpy(toy_set[0]))
    assert abs(float(latents.std()) - 1.0) < 1e-3
    assert validate_teacher(toy_teacher, 1, (16, 16))["kind"] == "text-to-image-latent"
    images = model.sample(
        2, 2, torch.Generator().manual_seed(0), cond=["a handwritten 7", "the number two written by hand"]
    )
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_the_guidance_sweep_writes_the_best_measured_w(toy_set, tmp_path):
    from redistill.evaluation.features import DigitClassifier
    from redistill.models.text_to_image import SAMPLING_FILE

    torch.manual_seed(0)
    # the other text-encoder choice too: random and frozen
    p = toy(
        vae_steps=2, train_steps=2, guidance_sweep=[1.0, 2.0], eval_samples=20, eval_steps=2, train_text_encoder=False
    )
    s = train_t2i_teacher(
        p, *toy_set, tmp_path / "t", tmp_path / "ck", classifier=DigitClassifier().eval(), log=lambda m: None
    )
    assert s["text_encoder"] == "random, frozen"
    assert set(s["guidance_sweep"]) == {"1.0", "2.0"} and s["guidance_scale"] in (1.0, 2.0)
    best = max((1.0, 2.0), key=lambda w: (s["guidance_sweep"][str(w)]["adherent_recognisable"], -w))
    assert json.loads((tmp_path / "t" / SAMPLING_FILE).read_text()) == {"guidance_scale": best}
    for r in s["guidance_sweep"].values():
        assert r["num_samples"] == 20 and 0 <= r["adherent_recognisable"] <= min(r["adherence"], r["recognisable"])


@pytest.mark.parametrize("die_at, phase", [(2, "vae step 2"), (4, "unet step 2")])
def test_a_killed_run_resumes_to_the_unbroken_weights(toy_set, toy_teacher, tmp_path, monkeypatch, die_at, phase):
    """Stopped at a checkpoint write (as a kill would: the steps since the last one are lost), then run again: it
    resumes where it stopped, in the VAE phase or the UNet phase, and ends with the unbroken run's weights."""
    from safetensors.torch import load_file

    class Killed(Exception):
        pass

    save, calls = checkpoint.save, []

    def save_then_die(path, *args):
        calls.append(path.name)
        if len(calls) == die_at:
            raise Killed
        save(path, *args)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    out, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    with pytest.raises(Killed):
        train_t2i_teacher(toy(), *toy_set, out, ckpt, log=lambda m: None)
    monkeypatch.setattr(checkpoint, "save", save)
    assert not out.exists()
    logs: list[str] = []
    train_t2i_teacher(toy(), *toy_set, out, ckpt, log=logs.append)
    assert any("resumed from" in m and f"({phase})" in m for m in logs), logs
    assert not ckpt.exists()  # a finished run leaves no checkpoints behind
    for part in ("vae/diffusion_pytorch_model", "unet/diffusion_pytorch_model", "text_encoder/model"):
        a, b = load_file(out / f"{part}.safetensors"), load_file(toy_teacher / f"{part}.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, part


@pytest.mark.trials  # ~15 s (all the captioned digits written, a toy teacher trained): make trials runs it
def test_the_cli_trains_the_embedded_teacher_where_the_dvc_stage_says_and_refuses_to_overwrite(tmp_path):
    """`redistill teacher text-to-image` (the DVC stage teacher_t2i) writes the captioned digits to data/t2i/ and
    the teacher to data/t2i-teachers/<name>; without the digits classifier w stays the recipe's, said as such."""
    import yaml
    from typer.testing import CliRunner

    from redistill.cli import app

    raw = Params().to_dict()
    raw["t2i_teacher"].update(TOY, name="toy-t2i")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    args = ["teacher", "text-to-image", "--workspace", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "data" / "t2i-teachers" / "toy-t2i"
    assert (out / "model_index.json").is_file() and (tmp_path / "data" / "t2i" / "reference" / "captions.csv").is_file()
    assert "unmeasured" in r.output and "text-to-image teacher saved to" in r.output
    assert json.loads((out / "redistill_teacher.json").read_text())["train_steps"] == 6
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already holds a teacher" in again.output
