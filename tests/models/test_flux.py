"""The Flux layout (FluxPipeline): detected from its folder, its conventions owned by its adapter (latents packed 2×2
into tokens with their ids, σ = t/1000, the guidance as an input, Euler shifted by μ from the token count, CLIP's
pooled vector and T5's sequence packed into one tensor), and students that stock diffusers loads back."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.models import adapter_for
from redistill.models.pipelines import load_pipeline, save_pipeline, validate_teacher
from redistill.teachers.flux_parts import build_flux_pipeline

PROMPTS = ["a digit 3", "a seven"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    save_pipeline(build_flux_pipeline(root / "tokenizer"), root / "teacher")
    return root / "teacher"


def test_the_adapters_loop_is_what_the_flux_pipeline_samples(flux_folder):
    facts = validate_teacher(flux_folder, 1, (8, 8))
    assert (facts["kind"], facts["family"], facts["guidance_embeds"], facts["use_dynamic_shifting"]) == (
        "flux-latent",
        "flow",
        True,
        True,
    )
    assert (facts["channels"], facts["sample_size"], facts["guidance_scale"]) == (4, [4, 4], 3.5)
    model = adapter_for(load_pipeline(flux_folder))
    images = model.sample(2, 4, torch.Generator().manual_seed(1), cond=PROMPTS)
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompts(PROMPTS)
    assert (model.decode(model.ode_sample(model.unet, x, 4, cond)) - images).abs().max().item() < 1e-4
    z = torch.randn(2, 4, 4, 4)
    assert torch.equal(model._unpack_latents(model._pack_latents(z), 4, 4), z)
    # the guidance is an input: another w gives another output from the same single pass
    t = torch.tensor([500.0, 500.0])
    a = model.output(model.unet, z, t, cond)
    model.guidance_scale = 1.0
    assert (model.output(model.unet, z, t, cond) - a).abs().max() > 0


@pytest.mark.parametrize("method", ["consistency", "dmd"])
def test_a_flux_student_is_a_stock_flux_pipeline_on_its_own_unshifted_grid(flux_folder, tmp_path, method):
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler, FluxPipeline

    from redistill.config import parse_params
    from redistill.methods import distill

    section = {"consistency": {"steps": 3}} if method == "consistency" else {"dmd": {"steps": 3}}
    p = parse_params({"distill": {"method": method, "target_steps": 2, "batch_size": 8, **section}}).distill
    student, _ = distill(
        p,
        load_pipeline(flux_folder),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        captions=PROMPTS * 8,
    )
    save_pipeline(student, tmp_path / "student")
    sampling = json.loads((tmp_path / "student" / "redistill_sampling.json").read_text())
    assert sampling["guidance_scale"] == 3.5  # the w it was trained at, still one pass a step
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert isinstance(stock, FluxPipeline) and isinstance(stock.scheduler, FlowMatchLCMScheduler)
    stock.set_progress_bar_config(disable=True)
    img = stock(
        prompt=["a seven"],
        guidance_scale=3.5,
        num_inference_steps=2,
        height=8,
        width=8,
        max_sequence_length=8,
        output_type="pt",
    ).images
    assert img.shape == (1, 1, 8, 8) and torch.isfinite(img).all()
    assert stock.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.5, 0.0])  # μ leaves the student's σ alone


def test_a_flux_lora_student_keeps_its_alpha_and_loads_on_the_stock_base(flux_folder, tmp_path):
    """An LCM-LoRA student of a Flux teacher: saved in FluxPipeline's LoRA format with peft's config (lora_alpha 16
    at rank 4 survives), registered as the adapter alone, and the stock base plus `load_lora_weights` computes what
    the fused student does."""
    from diffusers import FluxPipeline

    from redistill.config import parse_params
    from redistill.methods import distill
    from redistill.models.adapter_files import LORA_WEIGHTS
    from redistill.models.lora import adapter_only

    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "target_steps": 2,
                "batch_size": 8,
                "consistency": {"steps": 3},
                "student": {"lora_rank": 4, "lora_alpha": 16},
            }
        }
    ).distill
    student, summary = distill(
        p,
        load_pipeline(flux_folder),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        captions=PROMPTS * 8,
        teacher_path=flux_folder,
    )
    assert summary["lora_rank"] == 4
    save_pipeline(student, tmp_path / "student")
    adapter_only(tmp_path / "student", tmp_path / "adapter")
    fused = adapter_for(load_pipeline(tmp_path / "student"))
    registered = adapter_for(load_pipeline(tmp_path / "adapter"))
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([500.0, 500.0])
    cond = fused.encode_prompts(PROMPTS)
    want = fused.output(fused.unet, z, t, cond)
    assert torch.allclose(registered.output(registered.unet, z, t, cond), want, atol=1e-5)
    base = FluxPipeline.from_pretrained(flux_folder)
    base.load_lora_weights(str(tmp_path / "adapter"), weight_name=LORA_WEIGHTS)
    config = next(iter(base.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 16)
    stock = adapter_for(base)
    assert torch.allclose(stock.output(base.transformer, z, t, cond), want, atol=1e-5)
