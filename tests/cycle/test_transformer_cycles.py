"""Transformer teachers through whole cycles (trials): a tiny DiT on labelled shapes from an empty workspace, distilled,
judged, registered and loaded back in stock diffusers."""

from __future__ import annotations

import pytest

from helpers_cycle import check_cycle_from_empty_workspace

pytestmark = pytest.mark.trials
SHAPE_WORDS = "a picture of disc square triangle stripes ring".split()


@pytest.mark.parametrize("method", ["consistency"])
def test_a_dit_teacher_runs_the_whole_cycle_in_an_empty_workspace(tmp_path, method, prefect_harness):
    from redistill.data import shapes
    from redistill.teachers.dit_parts import build_dit_pipeline, save_dit

    teacher = save_dit(
        build_dit_pipeline(image_channels=3, image_size=16), tmp_path / "teacher-dit", len(shapes.CLASSES), 2.0
    )
    data = shapes.write(tmp_path / "data", 80, size=16, channels=3, seed=1, labels=True)
    check_cycle_from_empty_workspace(tmp_path / "ws", teacher, data, method, True, tmp_path, own_code=False)


def test_an_sd3_teacher_runs_the_whole_cycle_and_its_student_loads_in_stock_diffusers(tmp_path, prefect_harness):
    """Captioned shapes + a tiny SD3-layout teacher (no T5): the cycle distils a consistency student under each
    image's caption, evaluates it on the data's prompts (one transformer pass per step against the teacher's two),
    promotes and registers it; the export loads as a stock StableDiffusion3Pipeline and the served model takes a
    prompt."""
    import pandas as pd
    import torch
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline
    from typer.testing import CliRunner

    from helpers import LENIENT_GATE
    from helpers_cycle import TINY_METHODS, run_cycle
    from redistill.cli import app
    from redistill.data import shapes
    from redistill.data.caption_files import write_captions
    from redistill.data.images import load_image_folder
    from redistill.models.pipelines import save_pipeline
    from redistill.registry.client import client, tracking_uri
    from redistill.registry.serving import StudentModel
    from redistill.teachers.sd3_parts import build_sd3_pipeline

    teacher = tmp_path / "teacher-sd3"
    save_pipeline(build_sd3_pipeline(tmp_path / "tok", image_channels=3, image_size=16, words=SHAPE_WORDS), teacher)
    data = shapes.write(tmp_path / "data", 80, size=16, channels=3, seed=1, labels=True)
    im = load_image_folder(data)
    write_captions(data, {f: f"a picture of a {shapes.CLASSES[int(y)]}" for f, y in zip(im.files, im.labels)})
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(
        TINY_METHODS.replace("consistency: {steps: 3}", "consistency: {steps: 3, solver_steps: 12}") + LENIENT_GATE
    )
    result = run_cycle(ws, teacher, data, "consistency")
    assert result["decision"] == "promoted", result
    c = client(tracking_uri(ws))
    mv = c.get_model_version("teacher-sd3-student", result["version"])
    metrics = c.get_run(mv.run_id).data.metrics
    assert metrics["speed.unet_passes_per_step"] == 1 and metrics["speed.reference_unet_passes_per_step"] == 2
    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", "--workspace", str(ws), "--alias", "champion", "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    stock = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(stock.scheduler, FlowMatchLCMScheduler)
    stock.set_progress_bar_config(disable=True)
    img = stock(
        prompt=["a picture of a ring"],
        guidance_scale=1.0,
        num_inference_steps=4,
        height=16,
        width=16,
        max_sequence_length=8,
        output_type="pt",
    ).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    answer = StudentModel(out).predict(pd.DataFrame([{"seed": 1, "num_images": 2, "prompt": "a picture of a ring"}]))
    assert answer["prompt"].tolist() == ["a picture of a ring"] * 2


@pytest.mark.parametrize("kind", ["dit", "sd3"])
def test_the_transformer_demos_train_their_teacher_and_promote_in_their_own_workspace(kind, tmp_path, prefect_harness):
    """`redistill demo --kind dit|sd3 --json` from an empty workspace at toy budgets: the captioned digits, the
    transformer teacher trained by its recipe on the committed VAE (no teacher is copied in), and one cycle whose
    LCM-LoRA student (DiT: injected by peft) is promoted under the demo's model in runs/demo-<kind>."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from helpers import LENIENT_GATE
    from redistill.cli import app

    vae = Path(__file__).resolve().parents[2] / "data" / "t2i-teachers" / "digits-t2i" / "vae"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(
        f"""
features: {{epochs: 2, encoder_epochs: 2}}
{kind}_teacher: {{vae: {vae}, width: 32, head_dim: 16, layers: 1, train_steps: 4, batch_size: 8, warmup_steps: 1,
              checkpoint_every: 4, guidance_sweep: []}}
{kind}_demo: {{steps: 3, batch_size: 8, lora_rank: 4}}
distill: {{consistency: {{solver_steps: 10}}}}
evaluate: {{num_samples: 60, max_samples: 60, bootstrap: 5, kid_subset_size: 30, sample_batch_size: 60, latency_repeats: 1,
           throughput_repeats: 1, throughput_batch: 4, reference_steps: 4, floor_splits: 4}}
"""
        + LENIENT_GATE
    )
    r = CliRunner().invoke(app, ["demo", "--kind", kind, "--json", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kind"] == kind and out["model"] == f"digits-{kind}-student" and out["decision"] == "promoted", out
    assert out["figures"]["steps"] == 4 and out["figures"]["reference_unet_passes_per_step"] == 2
    assert Path(out["workspace"]) == ws / "runs" / f"demo-{kind}"
    assert (ws / "data" / f"{kind}-teachers" / f"digits-{kind}" / "model_index.json").is_file()


@pytest.mark.parametrize("layout, method, lora_rank", [("pixart", "output", 0), ("flux", "consistency", 4)])
def test_pixart_and_flux_teachers_run_the_whole_cycle_and_load_back_in_stock_diffusers(
    tmp_path, prefect_harness, layout, method, lora_rank
):
    """Captioned shapes + a tiny PixArt-Σ (ε, T5) or Flux (flow, guidance input, packed latents) teacher: one cycle
    distils (PixArt: a full output student; Flux: an LCM-LoRA student), judges and promotes it; the export loads as
    the stock pipeline and samples a prompt at its folder's settings, and a LoRA student's adapter loads on the stock
    base with `load_lora_weights`, its rank and alpha intact."""
    import json

    import torch
    from diffusers import DiffusionPipeline
    from typer.testing import CliRunner

    from helpers import LENIENT_GATE
    from helpers_cycle import TINY_METHODS, run_cycle
    from redistill.cli import app
    from redistill.data import shapes
    from redistill.data.caption_files import write_captions
    from redistill.data.images import load_image_folder
    from redistill.models.adapter_files import LORA_WEIGHTS
    from redistill.models.pipelines import save_pipeline
    from redistill.teachers.flux_parts import build_flux_pipeline
    from redistill.teachers.pixart_parts import build_pixart_pipeline

    teacher = tmp_path / f"teacher-{layout}"
    pipe = (
        build_pixart_pipeline(image_channels=3, image_size=16, words=SHAPE_WORDS)
        if layout == "pixart"
        else build_flux_pipeline(tmp_path / "tok", image_channels=3, image_size=16, words=SHAPE_WORDS)
    )
    pipe.redistill_sampling = {"guidance_scale": 2.0 if layout == "pixart" else 3.5, "max_sequence_length": 8}
    save_pipeline(pipe, teacher)
    data = shapes.write(tmp_path / "data", 80, size=16, channels=3, seed=1, labels=True)
    im = load_image_folder(data)
    write_captions(data, {f: f"a picture of a {shapes.CLASSES[int(y)]}" for f, y in zip(im.files, im.labels)})
    ws = tmp_path / "ws"
    ws.mkdir()
    settings = TINY_METHODS.replace("consistency: {steps: 3}", "consistency: {steps: 3, solver_steps: 12}")
    settings = settings.replace("batch_size: 8,", f"batch_size: 8, student: {{lora_rank: {lora_rank}}},")
    (ws / "params.yaml").write_text(settings + LENIENT_GATE)
    result = run_cycle(ws, teacher, data, method)
    assert result["decision"] == "promoted", result
    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", "--workspace", str(ws), "--alias", "champion", "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    sampling = json.loads((out / "redistill_sampling.json").read_text())
    stock = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert type(stock).__name__ == {"pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline"}[layout]
    stock.set_progress_bar_config(disable=True)
    img = stock(
        prompt=["a picture of a ring"],
        guidance_scale=sampling["guidance_scale"],
        num_inference_steps=sampling["num_inference_steps"],
        height=16,
        width=16,
        max_sequence_length=8,
        output_type="pt",
        **({"use_resolution_binning": False} if layout == "pixart" else {}),
    ).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    if lora_rank:
        base = DiffusionPipeline.from_pretrained(teacher, use_safetensors=True)
        base.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)
        config = next(iter(base.transformer.peft_config.values()))
        assert config.r == lora_rank and {"to_q", "add_q_proj"} <= set(config.target_modules)
