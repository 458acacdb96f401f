"""Text-to-image latent teachers (Stable Diffusion layout, built from configs here) and LCM-LoRA students.

Everything is real: a CLIP tokenizer from vocabulary files written by redistill, a CLIP text encoder, an
AutoencoderKL and a UNet2DConditionModel, peft's LoRA, and stock diffusers loading the results in a fresh
process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redistill.lora import LORA_META, LORA_WEIGHTS, AdapterBaseMismatch, add_lora, check_base, fused_copy, load_adapter
from redistill.models import adapter_for
from redistill.models.text_to_image import SAMPLING_FILE, TextToImageLatent
from redistill.models.tiny_sd import tiny_sd_pipeline, write_clip_tokenizer
from redistill.teacher import PipelineError, load_pipeline, pipeline_sha256, save_pipeline, validate_teacher

WORDS = "a handwritten digit zero one two three four five six seven eight nine".split()
NUMBERS = WORDS[3:]


def make_tiny_sd(out: Path, seed: int = 0, **kw) -> Path:
    """A tiny SD-layout teacher folder (16×16 RGB pictures, 4×8×8 latents), saved with safetensors."""
    tok = write_clip_tokenizer(out.parent / f"{out.name}-tokenizer", WORDS)
    save_pipeline(tiny_sd_pipeline(tok, seed=seed, **kw), out)
    return out


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "teacher")


def prompts(n: int) -> list[str]:
    return [f"a handwritten digit {NUMBERS[i % 10]}" for i in range(n)]


def test_tokenizer_makes_each_word_one_token_and_still_reads_other_text(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok", WORDS)), local_files_only=True)
    ids = tok("a handwritten digit seven").input_ids
    assert len(ids) == 6  # start, four words, end
    assert len(tok("xylophone").input_ids) > 3  # an unknown word: letters, not an error
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a handwritten digit seven"


def test_the_kind_is_validated_with_a_prompt_probe_and_reports_its_facts(sd_teacher):
    pipe = load_pipeline(sd_teacher)
    model = adapter_for(pipe)
    assert isinstance(model, TextToImageLatent) and model.conditional and not model.clips
    facts = validate_teacher(sd_teacher, 3, (16, 16))
    assert facts["kind"] == "text-to-image-latent" and facts["image_size"] == [16, 16]
    assert facts["sample_size"] == [8, 8] and facts["latent_channels"] == 4 and facts["max_prompt_tokens"] == 16
    with pytest.raises(PipelineError, match="makes 16×16 images but"):
        validate_teacher(sd_teacher, 3, (8, 8))  # the data's pictures, not the latents, must fit


def test_a_pickled_text_encoder_is_refused(sd_teacher, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sd_teacher, bad)
    (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="pickle-based format"):
        load_pipeline(bad)


def test_guidance_is_folded_into_the_teacher_output_and_prompts_condition_it(sd_teacher):
    pipe = load_pipeline(sd_teacher)
    model = adapter_for(pipe).use_prompts(prompts(10), paired=True)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([100, 500, 900])
    c = model.conditions_at(torch.tensor([7, 2, 7]), 3, g)
    assert torch.equal(c[0], c[2]) and not torch.equal(c[0], c[1])  # each image gets its own caption
    cond = model.output(pipe.unet, z, t, c)
    uncond = model.output(pipe.unet, z, t, model.uncond(3, "cpu"))
    model.guidance_scale = 3.0
    guided = model.teacher_output(pipe.unet, z, t, c)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
    assert (cond - uncond).abs().max() > 0  # the prompt reaches the UNet
    model.guidance_scale = 1.0
    assert torch.allclose(model.teacher_output(pipe.unet, z, t, c), cond, atol=1e-5)


def test_latents_round_trip_and_samples_are_pictures(sd_teacher):
    pipe = load_pipeline(sd_teacher)
    model = adapter_for(pipe)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g)
    lat = model.to_model_space(images)
    assert lat.shape == (2, 4, 8, 8)
    assert model.decode(lat).shape == (2, 3, 16, 16)
    for cond in (None, ["a handwritten digit one", "two"], model.conditions(2, g)):
        out = model.sample(2, 2, g, cond=cond)
        assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_lora_fused_equals_unfused_and_adapter_refuses_another_base(sd_teacher, tmp_path):
    from redistill.lora import save_adapter

    pipe = load_pipeline(sd_teacher)
    unet = add_lora(fused_copy_safe(pipe.unet), 4)
    assert {n for n, w in unet.named_parameters() if w.requires_grad} == {n for n, _ in unet.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, w in unet.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.3)
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    t = torch.tensor([10, 600])
    lora_out = unet(z, t, encoder_hidden_states=c).sample
    assert torch.allclose(fused_copy(unet)(z, t, encoder_hidden_states=c).sample, lora_out, atol=1e-4)
    assert (lora_out - pipe.unet(z, t, encoder_hidden_states=c).sample).abs().max() > 1e-2
    save_adapter(unet, tmp_path / "adapter", pipeline_sha256(sd_teacher), 4)
    assert (tmp_path / "adapter" / LORA_WEIGHTS).stat().st_size < 200_000
    loaded = load_adapter(tmp_path / "adapter", sd_teacher)
    assert torch.allclose(loaded.unet(z, t, encoder_hidden_states=c).sample, lora_out, atol=1e-4)
    other = make_tiny_sd(tmp_path / "other", seed=1)
    with pytest.raises(AdapterBaseMismatch, match="was trained on the base pipeline with sha256"):
        check_base(tmp_path / "adapter", other)
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(tmp_path / "adapter", other)


def fused_copy_safe(unet):
    import copy

    return copy.deepcopy(unet)


def test_other_methods_refuse_the_kind_before_training(sd_teacher, tmp_path):
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    for method in ("progressive", "output", "adversarial", "dmd", "rectified"):
        p = parse_params({"distill": {"method": method}}).distill
        with pytest.raises(ValueError, match="does not serve text-to-image-latent teachers yet; use distill.method: consistency"):
            distill(p, pipe, torch.rand(4, 3, 16, 16), tmp_path / "ckpt", log=lambda m: None, teacher_path=sd_teacher)
        assert not (tmp_path / "ckpt").exists()


def test_lcm_lora_student_trains_only_the_adapter_and_loads_in_stock_diffusers(sd_teacher, tmp_path):
    """The whole LCM-LoRA path: guided consistency distillation of the adapter on captioned latents, the saved
    folder (fused pipeline + adapter + pointer + sampling), and a fresh process that loads both ways with
    stock diffusers: the fused folder, and the adapter on the base with load_lora_weights."""
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    model = adapter_for(pipe).use_prompts(prompts(32), paired=True)
    model.guidance_scale = 3.0
    data = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    p = parse_params({"distill": {"method": "consistency", "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4,
                                  "consistency": {"steps": 6, "solver_steps": 10, "lora_rank": 4}}}).distill
    student, summary = distill(p, pipe, data, tmp_path / "ckpt", log=lambda m: None, teacher_path=sd_teacher)
    assert summary["lora_rank"] == 4 and summary["base_sha256"] == pipeline_sha256(sd_teacher)
    assert 0 < summary["adapter_params"] < sum(w.numel() for w in pipe.unet.parameters()) / 20
    for name in ("vae", "text_encoder"):  # the base's other components are the teacher's own
        assert all(torch.equal(a, b) for a, b in zip(getattr(student, name).parameters(), getattr(pipe, name).parameters()))
    save_pipeline(student, tmp_path / "student")
    folder = tmp_path / "student"
    meta = json.loads((folder / LORA_META).read_text())
    assert meta["base_sha256"] == pipeline_sha256(sd_teacher) and meta["rank"] == 4
    assert json.loads((folder / SAMPLING_FILE).read_text()) == {"guidance_scale": 1.0, "distilled_guidance_scale": 3.0,
                                                                "num_inference_steps": 4}
    check_base(folder, sd_teacher)
    assert adapter_for(load_pipeline(folder)).sampling["guidance_scale"] == 1.0
    script = f"""
import torch
from diffusers import DiffusionPipeline, LCMScheduler
fused = DiffusionPipeline.from_pretrained({str(folder)!r}, use_safetensors=True, local_files_only=True)
base = DiffusionPipeline.from_pretrained({str(sd_teacher)!r}, use_safetensors=True, local_files_only=True)
assert isinstance(fused.scheduler, LCMScheduler), type(fused.scheduler)
z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
t = torch.tensor([500])
emb = base.encode_prompt(["a handwritten digit seven"], "cpu", 1, False)[0]
before = base.unet(z, t, encoder_hidden_states=emb).sample
base.load_lora_weights({str(folder)!r})
after = base.unet(z, t, encoder_hidden_states=emb).sample
ref = fused.unet(z, t, encoder_hidden_states=emb).sample
print("CHANGE", (after - before).abs().max().item(), "MATCH", (after - ref).abs().max().item())
base.scheduler = LCMScheduler.from_config(fused.scheduler.config)
img = base("a handwritten digit seven", num_inference_steps=4, guidance_scale=1.0, output_type="np").images
print("IMAGE", img.shape)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    change, match = float(words[words.index("CHANGE") + 1]), float(words[words.index("MATCH") + 1])
    assert change > 1e-5 and match < 1e-4  # the adapter changes the base's output, to exactly the fused student's
    assert "(1, 16, 16, 3)" in out.stdout


def test_lcm_lora_refuses_a_warm_start_or_a_smaller_student(sd_teacher, tmp_path):
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    p = parse_params({"distill": {"method": "consistency", "student": {"layers_per_block": 1},
                                  "consistency": {"steps": 2, "lora_rank": 4}}}).distill
    with pytest.raises(ValueError, match="LCM-LoRA student"):
        distill(p, pipe, torch.rand(8, 3, 16, 16), tmp_path / "ckpt", log=lambda m: None, teacher_path=sd_teacher)
