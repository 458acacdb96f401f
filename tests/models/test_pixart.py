"""The PixArt-Σ layout (PixArtSigmaPipeline, T5): detected from its folder, its conventions owned by its adapter
(ε with a learned variance, T5's states and mask packed into one tensor, no resolution binning, guidance under the
empty prompt), and a consistency student that stock diffusers loads back."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.models import adapter_for
from redistill.models.pipelines import load_pipeline, save_pipeline, validate_teacher
from redistill.teachers.pixart_parts import build_pixart_pipeline

PROMPTS = ["a digit 3", "a seven"]


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart") / "teacher"
    save_pipeline(build_pixart_pipeline(), folder)
    return folder


def test_the_adapters_guided_loop_is_what_the_pixart_pipeline_samples(pixart_folder):
    from diffusers import DDIMScheduler

    facts = validate_teacher(pixart_folder, 1, (8, 8))
    assert (facts["kind"], facts["family"], facts["learned_sigma"], facts["guidance_scale"]) == (
        "pixart-latent",
        "diffusion",
        True,
        4.5,
    )
    pipe = load_pipeline(pixart_folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    model = adapter_for(pipe)
    images = model.sample(2, 4, torch.Generator().manual_seed(1), cond=PROMPTS)
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompts(PROMPTS)
    embeds, mask = model.unpack(cond)
    assert embeds.shape == (2, 8, 16) and mask.tolist()[1][:3] == [1, 1, 1] and mask.tolist()[1][-1] == 0
    assert torch.equal(model.pack(embeds, mask), cond)
    assert (model.decode(model.ode_sample(model.unet, x, 4, cond)) - images).abs().max().item() < 1e-4


def test_a_pixart_student_is_a_stock_pixart_pipeline_sampled_at_guidance_one(pixart_folder, tmp_path):
    from diffusers import DiffusionPipeline, PixArtSigmaPipeline

    from redistill.config import parse_params
    from redistill.methods import distill

    p = parse_params(
        {"distill": {"method": "consistency", "target_steps": 2, "batch_size": 8, "consistency": {"steps": 3}}}
    ).distill
    student, _ = distill(
        p,
        load_pipeline(pixart_folder),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        captions=PROMPTS * 8,
    )
    save_pipeline(student, tmp_path / "student")
    sampling = json.loads((tmp_path / "student" / "redistill_sampling.json").read_text())
    assert sampling["guidance_scale"] == 1.0 and sampling["distilled_guidance_scale"] == 4.5
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(stock, PixArtSigmaPipeline)
    stock.set_progress_bar_config(disable=True)
    img = stock(
        prompt=["a seven"],
        guidance_scale=1.0,
        num_inference_steps=2,
        height=8,
        width=8,
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=8,
        output_type="pt",
    ).images
    assert img.shape == (1, 1, 8, 8) and torch.isfinite(img).all()
