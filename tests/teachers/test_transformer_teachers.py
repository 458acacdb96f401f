"""The embedded transformer teachers (redistill/teachers/transformer.py): the recipe at a toy budget for the DiT and
the SD3 layouts (a real trained-VAE folder, DiTTransformer2DModel, SD3Transformer2DModel and two CLIP text encoders,
saved and reloaded as stock pipeline folders), the resume of a killed run, the differentiable prompt encoding against
the pipeline's own, and the committed teachers against the bar of the embedded text-to-image teacher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from redistill.config import Params
from redistill.data.captions import prepare_t2i
from redistill.data.images import load_image_folder
from redistill.teachers.transformer import sd3_prompt_embeds, train_transformer_teacher

REPO = Path(__file__).resolve().parents[2]
COMMITTED = {"dit": REPO / "data" / "dit-teachers" / "digits-dit", "sd3": REPO / "data" / "sd3-teachers" / "digits-sd3"}
TOY = dict(width=32, head_dim=16, layers=1, train_steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)
TOY_TEXT = dict(text_width=16, text_layers=1)


def toy(layout: str, **kw):
    p = getattr(Params(), f"{layout}_teacher")
    return dataclasses.replace(p, **{**TOY, **(TOY_TEXT if layout == "sd3" else {}), "guidance_sweep": [], **kw})


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    """64 captioned, labelled 16×16 reference images and a small untrained VAE folder of their size."""
    from redistill.teachers.latent_parts import small_vae

    root = tmp_path_factory.mktemp("tt")
    prepare_t2i(Params().prepare, root / "data")
    d = load_image_folder(root / "data" / "reference")
    torch.manual_seed(0)
    small_vae(1, 16, 4).save_pretrained(root / "vae", safe_serialization=True)
    return d.images[:64], d.labels[:64], d.captions[:64], root / "vae"


@pytest.mark.parametrize("layout", ["dit", "sd3"])
def test_the_toy_recipe_saves_a_stock_pipeline_of_its_layout_and_resumes_when_killed(layout, toy_set, tmp_path):
    from diffusers import DiffusionPipeline

    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline

    images, labels, captions, vae = toy_set
    out, ckpt = tmp_path / "teacher", tmp_path / "ckpt"

    def killed_at_the_last_step(message: str) -> None:
        if f"step {TOY['train_steps']}/" in message:
            raise KeyboardInterrupt  # as a kill after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_transformer_teacher(
            layout, toy(layout), images, labels, captions, vae, out, ckpt, log=killed_at_the_last_step
        )
    assert not out.exists() and (ckpt / "checkpoint-2").is_dir()
    said = []
    summary = train_transformer_teacher(layout, toy(layout), images, labels, captions, vae, out, ckpt, log=said.append)
    assert any("resumed from" in m and "(step 2)" in m for m in said), said
    assert summary["train_steps"] == 4 and summary["guidance_scale"] == 3.0 and not ckpt.exists()

    no_t5 = (
        {"text_encoder_3": None, "tokenizer_3": None} if layout == "sd3" else {}
    )  # SD3 without T5, as diffusers asks
    stock = DiffusionPipeline.from_pretrained(str(out), use_safetensors=True, **no_t5)  # no redistill needed to load it
    assert type(stock).__name__ == {"dit": "DiTPipeline", "sd3": "StableDiffusion3Pipeline"}[layout]
    model = adapter_for(load_pipeline(out))
    assert model.kind == f"{layout}-latent" and model.image_size == (16, 16) and model.guidance_scale == 3.0
    # the latents the transformer learnt are unit-variance (SD3: also centred), as the VAE config now says
    z = model.encode(torch.from_numpy(images).float())
    assert abs(float(z.std()) - 1.0) < 0.05
    if layout == "sd3":
        assert abs(float(z.mean())) < 0.05 and summary["vae_shift_factor"] is not None
    with pytest.raises(Exception, match="never overwritten"):
        train_transformer_teacher(layout, toy(layout), images, labels, captions, vae, out, ckpt, log=said.append)


def test_the_sd3_recipe_encodes_prompts_as_the_pipeline_does(toy_set, tmp_path):
    """The training's differentiable prompt encoding is StableDiffusion3Pipeline.encode_prompt's (no T5)."""
    from redistill.teachers.t2i_parts import tokenize
    from redistill.teachers.transformer import build, load_vae

    *_, captions, vae = toy_set
    p = toy("sd3")
    trained_vae = load_vae(vae)
    trained_vae.register_to_config(shift_factor=0.1)
    pipe = build("sd3", p, trained_vae, tmp_path / "tok")
    prompts = [captions[0], captions[5], ""]
    ours, ours_pooled = sd3_prompt_embeds(pipe, tokenize(pipe.tokenizer, prompts), p.max_sequence_length)
    with torch.no_grad():
        theirs, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=p.max_sequence_length,
        )
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours_pooled, pooled, atol=1e-6)


def test_a_missing_vae_is_refused_with_where_to_get_one(toy_set, tmp_path):
    from redistill.models.pipelines import PipelineError

    images, labels, captions, _ = toy_set
    with pytest.raises(PipelineError, match="no trained VAE .*git checkout -- data/t2i-teachers"):
        train_transformer_teacher(
            "dit", toy("dit"), images, labels, captions, tmp_path / "no-vae", tmp_path / "o", tmp_path / "c"
        )


@pytest.mark.parametrize("layout", ["dit", "sd3"])
def test_the_committed_transformer_teacher_follows_its_condition_as_the_text_to_image_teacher_does(layout):
    """The committed teacher's own measurement (redistill_teacher.json, 500 samples per w at 50 steps) reaches the
    bar of the embedded text-to-image teacher, and a fresh draw of 60 at 10 steps at its w agrees with it."""
    from redistill.evaluation.features import load_classifier
    from redistill.models.pipelines import load_pipeline
    from redistill.teachers.t2i_judge import prompt_adherence

    folder = COMMITTED[layout]
    summary = json.loads((folder / "redistill_teacher.json").read_text())
    bar = json.loads((REPO / "data" / "t2i-teachers" / "digits-t2i" / "redistill_teacher.json").read_text())
    best = summary["guidance_sweep"][str(summary["guidance_scale"])]
    t2i_best = bar["guidance_sweep"][str(bar["guidance_scale"])]
    assert best["adherence"] >= 0.9 and best["recognisable"] >= 0.9, best
    assert best["adherent_recognisable"] >= t2i_best["adherent_recognisable"] - 0.05, (best, t2i_best)
    draw = prompt_adherence(
        load_pipeline(folder), load_classifier(REPO / "data" / "features"), summary["guidance_scale"], 10, 60, seed=1
    )
    assert draw["adherent_recognisable"] >= best["adherent_recognisable"] - 0.15, draw
