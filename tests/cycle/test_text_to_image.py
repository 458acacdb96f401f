"""Text-to-image latent teachers (Stable Diffusion layout, built from configs here) and LCM-LoRA students.

Everything is real: a CLIP tokenizer from vocabulary files written by redistill, a CLIP text encoder, an
AutoencoderKL and a UNet2DConditionModel, peft's LoRA, and stock diffusers loading the results in a fresh
process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redistill.models import adapter_for
from redistill.models.adapter_files import LORA_META, LORA_WEIGHTS, AdapterBaseMismatch, check_base
from redistill.models.lora import add_lora, fused_copy, load_adapter
from redistill.models.pipelines import PipelineError, load_pipeline, pipeline_sha256, save_pipeline, validate_teacher
from redistill.models.text_to_image import SAMPLING_FILE, TextToImageLatent
from redistill.models.tiny_sd import tiny_sd_pipeline, write_clip_tokenizer

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
    from redistill.models.adapter_files import save_adapter

    pipe = load_pipeline(sd_teacher)
    unet = add_lora(fused_copy_safe(pipe.unet), 4)
    assert {n for n, w in unet.named_parameters() if w.requires_grad} == {
        n for n, _ in unet.named_parameters() if "lora_" in n
    }
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
    base_unet = sum(f.stat().st_size for f in (sd_teacher / "unet").glob("*.safetensors"))
    assert (tmp_path / "adapter" / LORA_WEIGHTS).stat().st_size < base_unet / 2  # the adapter, not a second UNet
    loaded = load_adapter(tmp_path / "adapter", sd_teacher)
    assert torch.allclose(loaded.unet(z, t, encoder_hidden_states=c).sample, lora_out, atol=1e-4)
    other = make_tiny_sd(tmp_path / "other", seed=1)
    with pytest.raises(AdapterBaseMismatch, match="was trained on the base pipeline with sha256"):
        check_base(tmp_path / "adapter", other)
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(tmp_path / "adapter", other)


def test_an_adapter_that_loads_only_in_part_is_refused(sd_teacher, tmp_path):
    """An adapter on convolutions and attention saved in the older diffusers naming (convert_state_dict_to_diffusers)
    loads back without its attention layers and no error from diffusers; the registered form refuses it instead of
    serving another model. The adapter as save_adapter writes it (peft's naming) loads whole."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from redistill.models.adapter_files import save_adapter
    from redistill.models.lora import lora_state
    from redistill.models.pipelines import load_adapter_only

    unet = add_lora(fused_copy_safe(load_pipeline(sd_teacher).unet), 4)  # the default targets: lcm
    assert {"to_q", "conv1", "time_emb_proj"} <= set(unet.peft_config["redistill"].target_modules)
    good = save_adapter(unet, tmp_path / "good", pipeline_sha256(sd_teacher), 4, base_uri=str(sd_teacher))
    shutil.copytree(sd_teacher / "scheduler", good / "scheduler")
    n_layers = sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A"))
    load_adapter_only(good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    StableDiffusionPipeline.save_lora_weights(
        str(bad),
        unet_lora_layers=convert_state_dict_to_diffusers(lora_state(unet)),
        weight_name=LORA_WEIGHTS,
        safe_serialization=True,
    )
    assert (bad / LORA_META).is_file()
    with pytest.raises(PipelineError, match=f"adapts {n_layers} layers but only"):
        load_adapter_only(bad)


def fused_copy_safe(unet):
    import copy

    return copy.deepcopy(unet)


@pytest.mark.parametrize("method", ["output", "progressive", "adversarial"])
def test_the_full_student_methods_serve_the_kind_and_export_unclipped_latent_samplers(sd_teacher, tmp_path, method):
    """Output, progressive and adversarial distil the SD-layout UNet on its captioned images (their own captions
    where the method trains on images) into a StableDiffusionPipeline sampled at guidance 1."""
    from redistill.config import parse_params
    from redistill.methods import distill

    section = {
        "output": {"output": {"steps": 2, "pairs": 8, "pairs_steps": 4}},
        "progressive": {"progressive": {"steps_per_round": 2, "teacher_steps": 4}},
        "adversarial": {"adversarial": {"steps": 2}},
    }[method]
    p = parse_params({"distill": {"method": method, "target_steps": 2, "batch_size": 4, **section}}).distill
    student, _ = distill(
        p,
        load_pipeline(sd_teacher),
        torch.rand(8, 3, 16, 16),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=sd_teacher,
        workspace=tmp_path,
        captions=prompts(8),
    )
    assert type(student).__name__ == "StableDiffusionPipeline" and not student.scheduler.config.clip_sample
    assert student.redistill_sampling["guidance_scale"] == 1.0


def test_rectified_refuses_the_kind_before_training(sd_teacher, tmp_path):
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    p = parse_params({"distill": {"method": "rectified"}}).distill
    with pytest.raises(
        ValueError,
        match="does not serve text-to-image-latent teachers; use distill.method: consistency, dmd, output, progressive",
    ):
        distill(p, pipe, torch.rand(4, 3, 16, 16), tmp_path / "ckpt", log=lambda m: None, teacher_path=sd_teacher)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.trials  # make test stays under its time budget; make trials-short (in .ci/run) runs it
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
    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "batch_size": 4,
                "lr": 1e-3,
                "checkpoint_every": 4,
                "consistency": {"steps": 6, "solver_steps": 10},
                "student": {"lora_rank": 4},
            }
        }
    ).distill
    student, summary = distill(
        p, pipe, data, tmp_path / "ckpt", log=lambda m: None, teacher_path=sd_teacher, captions=prompts(32)
    )
    assert summary["lora_rank"] == 4 and summary["base_sha256"] == pipeline_sha256(sd_teacher)
    # rank 4 on the LCM-LoRA layers (convolutions included) of this tiny UNet: about 9% of its weights
    assert 0 < summary["adapter_params"] < sum(w.numel() for w in pipe.unet.parameters()) / 5
    for name in ("vae", "text_encoder"):  # the base's other components are the teacher's own
        assert all(
            torch.equal(a, b) for a, b in zip(getattr(student, name).parameters(), getattr(pipe, name).parameters())
        )
    save_pipeline(student, tmp_path / "student")
    folder = tmp_path / "student"
    meta = json.loads((folder / LORA_META).read_text())
    assert meta["base_sha256"] == pipeline_sha256(sd_teacher) and meta["rank"] == 4
    assert json.loads((folder / SAMPLING_FILE).read_text()) == {
        "guidance_scale": 1.0,
        "distilled_guidance_scale": 3.0,
        "num_inference_steps": 4,
    }
    check_base(folder, sd_teacher)
    assert adapter_for(load_pipeline(folder)).sampling["guidance_scale"] == 1.0
    # a cycle that finds this student in its run folder while its teacher is another base refuses to go on
    import shutil

    from redistill.config import parse_params as _pp
    from redistill.tasks.distill import SUMMARY, distill_student

    run_dir = tmp_path / "run"
    shutil.copytree(folder, run_dir / "student")
    (run_dir / "student" / SUMMARY).write_text(json.dumps(summary))
    with pytest.raises(AdapterBaseMismatch):
        distill_student.fn(make_tiny_sd(tmp_path / "other-base", seed=2), tmp_path, _pp({}).distill, run_dir)
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
    from redistill.methods import distill, method_config

    pipe = load_pipeline(sd_teacher)
    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "student": {"layers_per_block": 1, "lora_rank": 4},
                "consistency": {"steps": 2},
            }
        }
    ).distill
    with pytest.raises(ValueError, match="a LoRA student is the teacher's own UNet plus an adapter"):
        distill(
            p,
            pipe,
            torch.rand(8, 3, 16, 16),
            tmp_path / "ckpt",
            log=lambda m: None,
            teacher_path=sd_teacher,
            captions=prompts(8),
        )
    with pytest.raises(ValueError, match="serves consistency and dmd, not output"):
        method_config(parse_params({"distill": {"method": "output", "student": {"lora_rank": 4}}}).distill)
    with pytest.raises(ValueError, match="trained on its base teacher from the start"):
        p = parse_params({"distill": {"method": "consistency", "student": {"lora_rank": 4}}}).distill
        distill(
            p,
            pipe,
            torch.rand(8, 3, 16, 16),
            tmp_path / "ckpt",
            log=lambda m: None,
            teacher_path=sd_teacher,
            captions=prompts(8),
            init={k: v.clone() for k, v in pipe.unet.state_dict().items()},
        )
    with pytest.raises(ValueError, match="this data has no captions"):
        distill(
            parse_params({"distill": {"method": "consistency"}}).distill,
            pipe,
            torch.rand(8, 3, 16, 16),
            tmp_path / "ckpt",
            log=lambda m: None,
            teacher_path=sd_teacher,
        )


# --- a whole cycle from an empty workspace, with an LCM-LoRA student -------------------------------------------

SHAPE_WORDS = "a picture of disc square triangle stripes ring".split()


@pytest.mark.trials
def test_a_text_to_image_teacher_runs_the_whole_cycle_with_an_lcm_lora_student(tmp_path, prefect_harness):
    """Captioned shapes + a tiny SD teacher, nothing else: the cycle validates the captions, distils an LCM-LoRA
    student under each image's caption, evaluates it on the data's prompts (adherence, the VAE decode, one UNet
    pass against the teacher's two), promotes and registers it; lineage shows the base teacher the adapter
    points at; the export is a complete pipeline with the adapter beside it; the served model takes a prompt."""
    import pandas as pd
    from typer.testing import CliRunner

    from helpers import LENIENT_GATE
    from helpers_cycle import TINY_METHODS, run_cycle
    from redistill.cli import app
    from redistill.data import shapes
    from redistill.data.caption_files import write_captions
    from redistill.data.images import load_image_folder
    from redistill.registry.client import client, tracking_uri
    from redistill.registry.serving import StudentModel

    tok = write_clip_tokenizer(tmp_path / "tok", SHAPE_WORDS)
    teacher = tmp_path / "teacher"
    save_pipeline(tiny_sd_pipeline(tok, image_size=16), teacher)
    data = shapes.write(tmp_path / "data", 80, size=16, channels=3, seed=1, labels=True)
    im = load_image_folder(data)
    write_captions(data, {f: f"a picture of a {shapes.CLASSES[int(y)]}" for f, y in zip(im.files, im.labels)})
    ws = tmp_path / "ws"
    ws.mkdir()
    clip = make_tiny_clip(tmp_path / "clip", SHAPE_WORDS)  # a user's clip:DIR (random weights here)
    (ws / "params.yaml").write_text(
        TINY_METHODS.replace(
            "consistency: {steps: 3}", "consistency: {steps: 3, solver_steps: 10}, student: {lora_rank: 4}"
        ).replace("evaluate: {", f"evaluate: {{features: [auto, 'clip:{clip}'], ")
        + LENIENT_GATE
    )
    result = run_cycle(ws, teacher, data, "consistency")
    assert result["decision"] == "promoted", result
    c = client(tracking_uri(ws))
    # the settings do not name the model: it is named after the teacher's folder
    mv = c.get_model_version("teacher-student", result["version"])
    assert mv.tags["redistill.teacher_sha256"] == pipeline_sha256(teacher)
    run = c.get_run(mv.run_id)
    assert (
        run.data.metrics["speed.unet_passes_per_step"] == 1
        and run.data.metrics["speed.reference_unet_passes_per_step"] == 2
    )
    assert "speed.vae_decode_ms_p50" in run.data.metrics
    assert 0 <= run.data.metrics["quality.clip_score"] <= 100 and "quality.reference_clip_score" in run.data.metrics
    runner = CliRunner()
    r = runner.invoke(app, ["lineage", "--workspace", str(ws), "--alias", "champion", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    assert pipeline_sha256(teacher) in r.stdout
    lineage = json.loads(r.stdout.strip().splitlines()[-1])
    assert lineage["adapter"] == {"rank": 4, "base_sha256": pipeline_sha256(teacher)}
    r = runner.invoke(app, ["lineage", "--workspace", str(ws), "--alias", "champion"])
    assert "a LoRA adapter (rank 4) on the base teacher below" in r.stdout and "MISMATCH" not in r.stdout
    out = tmp_path / "export"
    r = runner.invoke(app, ["export", "--workspace", str(ws), "--alias", "champion", "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    assert (out / LORA_WEIGHTS).is_file() and json.loads((out / LORA_META).read_text())[
        "base_sha256"
    ] == pipeline_sha256(teacher)
    check_base(out, teacher)
    assert "load_lora_weights" in r.stdout and "guidance_scale=1.0" in r.stdout
    # the registry keeps the adapter and its pointer, not a copy of the base
    kept = Path(c.download_artifacts(mv.run_id, "student", str(tmp_path / "kept")))
    assert not (kept / "model_index.json").exists() and not (kept / "vae").exists()
    assert (
        sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
        < sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 3
    )
    z = torch.randn(1, 4, 8, 8)
    emb = adapter_for(load_pipeline(teacher)).encode_prompts(["a picture of a ring"])
    exported, rebuilt = load_pipeline(out), load_pipeline(kept)
    assert torch.allclose(
        exported.unet(z, 500, encoder_hidden_states=emb).sample,
        rebuilt.unet(z, 500, encoder_hidden_states=emb).sample,
        atol=1e-5,
    )
    assert adapter_for(rebuilt).sampling["guidance_scale"] == 1.0
    answer = StudentModel(out).predict(pd.DataFrame([{"seed": 1, "num_images": 2, "prompt": "a picture of a ring"}]))
    assert answer["prompt"].tolist() == ["a picture of a ring"] * 2 and len(answer["image_png_base64"][0]) > 50
    with pytest.raises(ValueError, match="needs a non-empty `prompt`"):
        StudentModel(out).predict(pd.DataFrame([{"seed": 1, "num_images": 1}]))


def test_the_evaluation_draws_the_datas_prompts_and_scores_adherence_per_sample(sd_teacher):
    import numpy as np

    from redistill.data.images import ImageSet
    from redistill.evaluation.features import NOT_A_DIGIT, adherence
    from redistill.evaluation.sampling import _cache_file, use_data_prompts

    caps = prompts(10)
    data = ImageSet(
        images=np.zeros((10, 3, 16, 16), np.float32),
        labels=np.arange(10),
        files=[f"{i}.png" for i in range(10)],
        captions=caps,
    )
    pipe, other = load_pipeline(sd_teacher), load_pipeline(sd_teacher)
    key_before = _cache_file(Path("/c"), pipe, "sha", "DDIM", 4, 0, 4)[0]
    asked = use_data_prompts([pipe, other], data)
    assert _cache_file(Path("/c"), pipe, "sha", "DDIM", 4, 0, 4)[0] != key_before  # the prompt set is in the sample key
    labels = asked(pipe, 7, 3, 4)  # batches of 4 and 3 from generator seeds 3 and 4, as metrics.sample draws them
    assert torch.equal(labels, asked(other, 7, 3, 4))  # the same prompts for both pipelines
    drawn = adapter_for(other).draw_prompts(4, torch.Generator().manual_seed(3)) + adapter_for(other).draw_prompts(
        3, torch.Generator().manual_seed(4)
    )
    assert [caps[int(k)] for k in labels] == drawn

    class Says(torch.nn.Module):  # a classifier that calls every image the class in its first pixel
        def forward(self, x):
            logits = torch.full((len(x), NOT_A_DIGIT + 1), -10.0)
            logits[torch.arange(len(x)), x[:, 0, 0, 0].long()] = 10.0
            return logits

    images = torch.zeros(4, 3, 16, 16)
    images[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, float(NOT_A_DIGIT)])
    a = adherence(Says(), images, torch.tensor([1, 2, 5, 3]))
    assert a["prompt_adherence"] == 0.5 and a["prompt_adherence_per_class"] == {1: 1.0, 2: 1.0, 3: 0.0, 5: 0.0}


def test_dmd_trains_a_lora_generator_on_captioned_latents(sd_teacher, tmp_path):
    """DMD2 on the text-to-image kind: the generator and the fake score are LoRA adapters on the teacher, the
    export is the fused pipeline with the adapter and its base beside it, sampled at guidance 1."""
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    adapter_for(pipe).guidance_scale = 2.0
    p = parse_params(
        {
            "distill": {
                "method": "dmd",
                "batch_size": 4,
                "checkpoint_every": 4,
                "target_steps": 2,
                "dmd": {"steps": 2, "fake_updates": 1, "solver_steps": 10},
                "student": {"lora_rank": 4},
            }
        }
    ).distill
    student, summary = distill(
        p,
        pipe,
        torch.rand(16, 3, 16, 16),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=sd_teacher,
        captions=prompts(16),
    )
    assert (
        summary["method"] == "dmd"
        and summary["lora_rank"] == 4
        and summary["base_sha256"] == pipeline_sha256(sd_teacher)
    )
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.parameters(), pipe.unet.parameters()))
    assert moved > 0
    save_pipeline(student, tmp_path / "student")
    check_base(tmp_path / "student", sd_teacher)
    assert json.loads((tmp_path / "student" / SAMPLING_FILE).read_text())["distilled_guidance_scale"] == 2.0
    out = adapter_for(load_pipeline(tmp_path / "student")).sample(
        2, 2, torch.Generator().manual_seed(0), ["a digit one", "two"]
    )
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="start: teacher"):
        q = parse_params(
            {"distill": {"method": "dmd", "dmd": {"start": "output"}, "student": {"lora_rank": 4}}}
        ).distill
        distill(
            q,
            pipe,
            torch.rand(16, 3, 16, 16),
            tmp_path / "ckpt2",
            log=lambda m: None,
            teacher_path=sd_teacher,
            captions=prompts(16),
        )


def test_a_pixel_unet_without_attention_cannot_take_a_lora_student(tmp_path):
    from helpers import make_tiny_pipeline

    pipe = load_pipeline(make_tiny_pipeline(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="takes no LoRA adapter"):
        add_lora(pipe.unet, 4)


@pytest.mark.trials  # make test stays under its time budget; make trials-short (in .ci/run) runs it
def test_prompt_drift_can_use_the_teachers_own_text_encoder(sd_teacher, tmp_path):
    """drift.text_features: teacher embeds the captions with the text-to-image teacher's CLIP text encoder: a batch
    asking for other things is flagged on its prompts, one drawn like the reference is not."""
    import numpy as np

    from redistill.config import parse_params
    from redistill.data.images import write_image_folder
    from redistill.tasks.watch import drift_test

    rng = np.random.default_rng(0)
    pics = lambda n: (rng.random((n, 16, 16, 3)) * 255).astype(np.uint8)  # noqa: E731
    numbers = lambda n, words: [f"a handwritten digit {words[i % len(words)]}" for i in range(n)]  # noqa: E731
    ref = tmp_path / "ref"
    write_image_folder(ref, pics(120), None, captions=numbers(120, NUMBERS))
    same = tmp_path / "same"
    write_image_folder(same, pics(60), None, captions=numbers(60, NUMBERS[::-1]))
    other = tmp_path / "other"
    write_image_folder(other, pics(60), None, captions=["a handwritten eight"] * 30 + ["digit zero"] * 30)
    p = parse_params({"drift": {"features": "pixels", "text_features": "teacher", "permutations": 200}}).drift
    r_same = drift_test.fn(same, ref, tmp_path / "features", p, tmp_path / "d1", sd_teacher)
    r_other = drift_test.fn(other, ref, tmp_path / "features", p, tmp_path / "d2", sd_teacher)
    assert r_same["text_features"] == "teacher" and r_same["text_mmd_p"] > 0.05
    assert r_other["text_mmd_p"] < 0.01 and any("prompts drifted" in x for x in r_other["reasons"])
    with pytest.raises(ValueError, match="not a text-to-image model"):
        from redistill.tasks.watch import prompt_embedding

        prompt_embedding(None)


@pytest.mark.trials
def test_the_text_to_image_demo_runs_in_its_own_workspace_and_names_its_model(tmp_path, prefect_harness):
    """`redistill demo --kind text-to-image --json` from an empty workspace at toy budgets: the captioned digits, a
    text-to-image teacher trained by the recipe (none is committed here), and one cycle with an LCM-LoRA student,
    registered under t2i_demo.student_name in runs/demo-text-to-image; `export --model` reads it back."""
    from typer.testing import CliRunner

    from helpers import LENIENT_GATE
    from redistill.cli import app

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(
        """
features: {epochs: 2, encoder_epochs: 2}
t2i_teacher: {vae_steps: 5, train_steps: 5, batch_size: 16, vae_batch_size: 16, checkpoint_every: 5, guidance_sweep: [],
              eval_samples: 10, eval_steps: 2}
t2i_demo: {steps: 3, batch_size: 8, lora_rank: 4}
distill: {consistency: {solver_steps: 10}}
evaluate: {num_samples: 60, max_samples: 60, bootstrap: 5, kid_subset_size: 30, sample_batch_size: 60, latency_repeats: 1,
           throughput_repeats: 1, throughput_batch: 4, reference_steps: 4, floor_splits: 4}
"""
        + LENIENT_GATE
    )
    runner = CliRunner()
    r = runner.invoke(app, ["demo", "--kind", "text-to-image", "--json", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kind"] == "text-to-image" and out["model"] == "digits-t2i-student" and out["decision"] == "promoted"
    fig = out["figures"]
    assert fig["steps"] == 4 and fig["unet_passes_per_step"] == 1 and fig["reference_unet_passes_per_step"] == 2
    assert 0 <= fig["prompt_adherence"] <= 1 and "vae_decode_ms_p50" in fig
    sub = Path(out["workspace"])
    assert sub == ws / "runs" / "demo-text-to-image" and (sub / "data" / "reference" / "captions.csv").is_file()
    r = runner.invoke(
        app,
        [
            "export",
            "--workspace",
            str(sub),
            "--model",
            out["model"],
            "--alias",
            "champion",
            "--out",
            str(tmp_path / "student"),
        ],
    )
    assert r.exit_code == 0, r.output[-2000:]
    assert (tmp_path / "student" / LORA_WEIGHTS).is_file()
    r = runner.invoke(app, ["demo", "--kind", "pictures", "--workspace", str(ws)])
    assert r.exit_code == 2 and "--kind must be digits, text-to-image, dit, sd3" in r.output


def test_the_clip_score_needs_a_whole_clip_model_and_scores_each_image_against_its_prompt(tmp_path):
    """A CLIPModel built from configs (random weights: the figure means nothing, the plumbing is what is tested),
    saved with a tokenizer as a local folder, as a user's clip:DIR would be."""
    from redistill.evaluation.spaces import CLIPScore

    make_tiny_clip(tmp_path / "clip", WORDS)
    score = CLIPScore(tmp_path / "clip")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s1 = score(images, prompts(4))
    s2 = score(images, prompts(4)[::-1])
    assert s1.shape == (4,) and (s1 >= 0).all() and (s1 <= 100).all() and not torch.equal(s1, s2)
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"]}))
    with pytest.raises(ValueError, match="not a whole CLIPModel"):
        CLIPScore(tmp_path / "vision")


def make_tiny_clip(out: Path, words: list[str]) -> Path:
    """A whole CLIPModel from configs (random weights) with its tokenizer, saved as a local folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    tok = CLIPTokenizer.from_pretrained(
        str(write_clip_tokenizer(out.parent / f"{out.name}-tok", words)), local_files_only=True
    )
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=tok.model_max_length,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ).to_dict(),
        projection_dim=512,
    )  # as real CLIP checkpoints: the vision tower alone reads 512 too
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_a_full_unet_student_stays_possible(sd_teacher, tmp_path):
    from redistill.config import parse_params
    from redistill.methods import distill

    pipe = load_pipeline(sd_teacher)
    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "batch_size": 4,
                "checkpoint_every": 4,
                "consistency": {"steps": 2, "solver_steps": 10},
            }
        }
    ).distill
    student, summary = distill(
        p,
        pipe,
        torch.rand(8, 3, 16, 16),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=sd_teacher,
        captions=prompts(8),
    )
    assert "lora_rank" not in summary
    save_pipeline(student, tmp_path / "student")
    assert not (tmp_path / "student" / LORA_META).exists() and (tmp_path / "student" / SAMPLING_FILE).is_file()
    assert isinstance(adapter_for(load_pipeline(tmp_path / "student")), TextToImageLatent)
