"""The Stable Diffusion 3 layout (StableDiffusion3Pipeline without T5): detected from its folder, its conventions
owned by its adapter (flow matching at σ·1000, latents shifted then scaled, both CLIPs' prompts packed into one
tensor, guidance under the empty prompt), and students of it that stock diffusers loads back."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.models import adapter_for
from redistill.models.pipelines import load_pipeline, save_pipeline, validate_teacher
from redistill.teachers.sd3_parts import build_sd3_pipeline

PROMPTS = ["a digit 3", "a seven", "the number one"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    save_pipeline(build_sd3_pipeline(root / "tokenizer"), root / "teacher")
    return root / "teacher"


def test_an_sd3_folder_without_t5_is_served_by_its_adapter(sd3_folder):
    index = json.loads((sd3_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    facts = validate_teacher(sd3_folder, 1, (8, 8))
    assert (facts["kind"], facts["family"], facts["prediction_type"]) == ("sd3-latent", "flow", "flow")
    assert (facts["channels"], facts["image_size"], facts["t5"], facts["shift"]) == (16, [8, 8], False, 3.0)
    assert facts["guidance_scale"] == 7.0 and facts["vae_shift_factor"] == pytest.approx(0.0609)


def test_the_adapters_guided_euler_loop_is_what_the_sd3_pipeline_samples(sd3_folder):
    model = adapter_for(load_pipeline(sd3_folder))
    images = model.sample(3, 4, torch.Generator().manual_seed(1), cond=PROMPTS)
    x = torch.randn((3, 16, 4, 4), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompts(PROMPTS)
    embeds, pooled = model.unpack(cond)
    assert embeds.shape == (3, 16 + 8, 32) and pooled.shape == (3, 32)  # CLIP tokens + T5's zero tokens
    assert torch.equal(model.pack(embeds, pooled), cond)
    assert (model.decode(model.ode_sample(model.unet, x, 4, cond)) - images).abs().max().item() < 1e-4
    # the straight path at σ = t/1000, as the scheduler noises
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    assert torch.allclose(model.add_noise(x0, eps, torch.tensor([250.0, 250.0])), 0.75 * x0 + 0.25 * eps)
    # latents round trip through the VAE's shift and scale as the pipeline decodes them
    pics = torch.rand(2, 1, 8, 8)
    vae = model.pipe.vae
    raw = vae.encode(pics * 2 - 1).latent_dist.mean
    assert torch.allclose(model.encode(pics), (raw - vae.config.shift_factor) * vae.config.scaling_factor, atol=1e-5)


def test_a_few_step_flow_student_samples_at_any_step_count_and_the_same_seed_draws_the_same_images(sd3_folder):
    """A consistency student's FlowMatchLCMScheduler, saved for 4 steps (σ = 1, ¾, ½, ¼), is re-gridded to the
    count asked (stock diffusers fails at 1 step with the 4-step grid); its re-noise between steps (drawn by the SD3
    pipeline from torch's global RNG) follows the generator's seed and leaves the global RNG as it was."""
    from redistill.models.flow import lcm_flow_scheduler

    pipe = load_pipeline(sd3_folder)
    pipe.scheduler = lcm_flow_scheduler(1000, 4)
    model = adapter_for(pipe)
    grids = {}
    for steps in (1, 2, 8, 4):
        images = model.sample(2, steps, torch.Generator().manual_seed(3), cond=PROMPTS[:2], guidance_scale=1.0)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all(), steps
        grids[steps] = [round(s, 4) for s in pipe.scheduler.sigmas.tolist()]
    assert grids[1] == [1.0, 0.0] and grids[2] == [1.0, 0.5, 0.0] and grids[4] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert grids[8][-2] == 0.125
    state = torch.random.get_rng_state()
    again = [model.sample(2, 4, torch.Generator().manual_seed(3), cond=PROMPTS[:2], guidance_scale=1.0) for _ in "ab"]
    assert torch.equal(again[0], again[1]) and torch.equal(again[0], images)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = model.sample(2, 4, torch.Generator().manual_seed(4), cond=PROMPTS[:2], guidance_scale=1.0)
    assert not torch.equal(other, images)


@pytest.mark.parametrize("method", ["consistency", "dmd"])
def test_an_sd3_student_is_a_stock_sd3_pipeline_sampled_at_guidance_one(sd3_folder, tmp_path, method):
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    from redistill.config import parse_params
    from redistill.methods import distill

    section = {"consistency": {"steps": 3, "solver_steps": 48}} if method == "consistency" else {"dmd": {"steps": 3}}
    p = parse_params({"distill": {"method": method, "target_steps": 2, "batch_size": 8, **section}}).distill
    teacher = load_pipeline(sd3_folder)
    student, summary = distill(
        p,
        teacher,
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        captions=[PROMPTS[i % 3] for i in range(16)],
    )
    save_pipeline(student, tmp_path / "student")
    sampling = json.loads((tmp_path / "student" / "redistill_sampling.json").read_text())
    assert sampling["guidance_scale"] == 1.0 and sampling["distilled_guidance_scale"] == 7.0
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(stock.scheduler, FlowMatchLCMScheduler)
    stock.set_progress_bar_config(disable=True)
    img = stock(
        prompt=["a seven"],
        guidance_scale=1.0,
        num_inference_steps=2,
        height=8,
        width=8,
        max_sequence_length=8,
        output_type="pt",
    ).images
    assert img.shape == (1, 1, 8, 8) and torch.isfinite(img).all()


def test_an_sd3_lora_student_keeps_its_alpha_and_loads_on_the_stock_base(sd3_folder, tmp_path):
    """An LCM-LoRA student of an SD3 teacher: the adapter covers the context stream, is saved in the SD3 pipeline's
    LoRA format with peft's config (so lora_alpha 16 at rank 4 survives), and the stock base plus
    `load_lora_weights` computes what the fused student does."""
    from diffusers import StableDiffusion3Pipeline

    from redistill.config import parse_params
    from redistill.methods import distill
    from redistill.models.adapter_files import LORA_WEIGHTS
    from redistill.models.lora import adapter_only

    student_settings = {"lora_rank": 4, "lora_alpha": 16}
    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "target_steps": 2,
                "batch_size": 8,
                "consistency": {"steps": 3},
                "student": student_settings,
            }
        }
    ).distill
    teacher = load_pipeline(sd3_folder)
    student, summary = distill(
        p,
        teacher,
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        captions=[PROMPTS[i % 3] for i in range(16)],
        teacher_path=sd3_folder,
    )
    assert summary["lora_rank"] == 4 and summary["adapter_params"] > 0
    save_pipeline(student, tmp_path / "student")
    adapter_only(tmp_path / "student", tmp_path / "adapter")
    fused = adapter_for(load_pipeline(tmp_path / "student"))
    registered = adapter_for(load_pipeline(tmp_path / "adapter"))  # the base by its pointer, the adapter fused in
    z, t = torch.randn(2, 16, 4, 4), torch.tensor([500.0, 500.0])
    cond = fused.encode_prompts(PROMPTS[:2])
    want = fused.output(fused.unet, z, t, cond)
    assert torch.allclose(registered.output(registered.unet, z, t, cond), want, atol=1e-5)
    base = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    base.load_lora_weights(str(tmp_path / "adapter"), weight_name=LORA_WEIGHTS)
    config = next(iter(base.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 16)
    assert {"to_q", "add_q_proj", "to_add_out"} <= set(config.target_modules)
    embeds, pooled = fused.unpack(cond)
    stock = base.transformer(hidden_states=z, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t)
    assert torch.allclose(stock.sample, want, atol=1e-5)
