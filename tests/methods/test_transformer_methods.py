"""Every method on the transformer layouts (issue 30): output, progressive and adversarial on the class-conditional DiT
and the text-to-image PixArt (ε) and SD3 and Flux (flow matching) teachers, rectified on the conditional flow-matching
ones; each student comes back as the teacher's stock pipeline, sampled at guidance 1 with the teacher's w folded in,
on its own few-step grid (flow: FlowMatchEulerDiscreteScheduler at shift 1; latents never clipped). Rectified on a
conditional diffusion teacher is refused before training, saying why and what to use."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from redistill.config import parse_params
from redistill.methods import distill
from redistill.models.pipelines import load_pipeline, save_pipeline

WORDS = "a digit seven the number one 3".split()
PROMPTS = ["a digit 3", "a seven", "the number one"]
SETTINGS = {
    "output": {"output": {"steps": 2, "pairs": 16, "pairs_steps": 4}},
    "progressive": {"progressive": {"steps_per_round": 2, "teacher_steps": 4}},
    "adversarial": {"adversarial": {"steps": 2}},
    "rectified": {
        "rectified": {
            "couplings": 16,
            "couplings_steps": 4,
            "reflow_steps": 2,
            "reflow_ode_steps": 4,
            "distill_steps": 2,
        }
    },
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """One tiny teacher of each transformer layout, saved as `save_pretrained` writes it (guidance w 3)."""
    from redistill.teachers.dit_parts import build_dit_pipeline, save_dit
    from redistill.teachers.flux_parts import build_flux_pipeline
    from redistill.teachers.pixart_parts import build_pixart_pipeline
    from redistill.teachers.sd3_parts import build_sd3_pipeline

    root = tmp_path_factory.mktemp("transformers")
    save_dit(build_dit_pipeline(), root / "dit", num_classes=10, guidance_scale=3.0)
    for name, pipe in (
        ("sd3", build_sd3_pipeline(root / "tok-sd3", words=WORDS)),
        ("pixart", build_pixart_pipeline(words=WORDS)),
        ("flux", build_flux_pipeline(root / "tok-flux", words=WORDS)),
    ):
        pipe.redistill_sampling = {"guidance_scale": 3.0, "max_sequence_length": 8}
        save_pipeline(pipe, root / name)
    return root


def _distil(teachers, tmp_path, layout: str, method: str):
    p = parse_params({"distill": {"method": method, "target_steps": 2, "batch_size": 8, **SETTINGS[method]}}).distill
    teacher = load_pipeline(teachers / layout)
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    captions = None if layout == "dit" else [PROMPTS[i % 3] for i in range(16)]
    student, summary = distill(
        p,
        teacher,
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=teachers / layout,
        captions=captions,
        workspace=tmp_path,
    )
    assert summary["method"] == method
    moved = max((student.transformer.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 0, "the student did not train"
    save_pipeline(student, tmp_path / "student")
    return student


# `make test` runs each method on a transformer once (and every layout once); the rest of the matrix is a trial
TRIAL = pytest.mark.trials


@pytest.mark.parametrize(
    "layout, method",
    [
        ("dit", "progressive"),
        ("sd3", "output"),
        ("sd3", "adversarial"),
        ("flux", "rectified"),
        ("pixart", "progressive"),
        pytest.param("dit", "output", marks=TRIAL),
        pytest.param("dit", "adversarial", marks=TRIAL),
        pytest.param("sd3", "progressive", marks=TRIAL),
        pytest.param("sd3", "rectified", marks=TRIAL),
    ],
)
def test_a_transformer_teachers_student_is_its_stock_pipeline_at_guidance_one(teachers, tmp_path, layout, method):
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    _distil(teachers, tmp_path, layout, method)
    sampling = json.loads((tmp_path / "student" / "redistill_sampling.json").read_text())
    assert sampling["distilled_guidance_scale"] == 3.0 and sampling["num_inference_steps"] == 2
    assert sampling["guidance_scale"] == (3.0 if layout == "flux" else 1.0)  # Flux takes w as an input, in one pass
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if layout == "sd3" else {}
    stock = DiffusionPipeline.from_pretrained(tmp_path / "student", use_safetensors=True, **no_t5)
    stock.set_progress_bar_config(disable=True)
    sched = stock.scheduler
    if layout in ("sd3", "flux"):  # a flow student: Euler (LCM for adversarial) at its own sigmas, shift 1
        assert isinstance(sched, FlowMatchLCMScheduler if method == "adversarial" else FlowMatchEulerDiscreteScheduler)
        assert sched.config.shift == 1.0
    elif method != "adversarial":
        assert isinstance(sched, DDIMScheduler) and not sched.config.clip_sample  # latents are not clipped
    if layout == "dit":
        img = stock(class_labels=[3], guidance_scale=1.0, num_inference_steps=2, output_type="pt").images
    else:
        kw = {"max_sequence_length": 8, **({"use_resolution_binning": False} if layout == "pixart" else {})}
        img = stock(
            prompt=["a seven"],
            guidance_scale=sampling["guidance_scale"],
            num_inference_steps=2,
            height=8,
            width=8,
            output_type="pt",
            **kw,
        ).images
    assert img.shape == (1, 1, 8, 8) and torch.isfinite(img).all()


@pytest.mark.parametrize("layout", ["dit", "pixart"])
def test_rectified_refuses_a_conditional_diffusion_teacher_saying_why_and_what_to_use(teachers, tmp_path, layout):
    p = parse_params({"distill": {"method": "rectified"}}).distill
    with pytest.raises(
        ValueError, match=r"consistency, dmd, output, progressive or adversarial \(rectified's student is a flow"
    ):
        distill(
            p, load_pipeline(teachers / layout), torch.rand(8, 1, 8, 8), tmp_path / "ckpt", captions=PROMPTS[:1] * 8
        )
    assert not (tmp_path / "ckpt").exists()


def test_the_pairs_of_a_text_to_image_teacher_are_keyed_by_the_prompts_drawn_from(teachers, tmp_path):
    """Output pairs drawn under one caption set are not reused for another: the cache key holds the draw key."""
    from redistill.methods.output import pairs_file
    from redistill.models import adapter_for

    files = []
    for prompts in (PROMPTS, PROMPTS[:1]):
        model = adapter_for(load_pipeline(teachers / "sd3"))
        model.use_prompts(prompts * 4, paired=True)
        cfg = SimpleNamespace(pairs=16, pairs_steps=4, seed=0)
        files.append(pairs_file(tmp_path, "sha", cfg, model.solver, model.draw_key()))
    assert files[0] != files[1]


@pytest.mark.parametrize("layout", ["dit", pytest.param("pixart", marks=TRIAL)])
def test_a_lora_student_of_a_pipeline_without_a_lora_loader_goes_through_peft_and_keeps_its_alpha(
    teachers, tmp_path, layout
):
    """DiTPipeline and PixArtSigmaPipeline have no `load_lora_weights`: the adapter is injected with peft, saved with
    `get_peft_model_state_dict` and its LoraConfig in the file's metadata (lora_alpha 16 at rank 4 survives), and the
    registered form (the adapter and a pointer to the base by sha256) rebuilds the fused student exactly; peft's
    `set_peft_model_state_dict` on the stock base's transformer computes the same."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    from redistill.models import adapter_for
    from redistill.models.adapter_files import CONFIG_KEY, LORA_WEIGHTS
    from redistill.models.lora import adapter_only

    p = parse_params(
        {
            "distill": {
                "method": "consistency",
                "target_steps": 2,
                "batch_size": 8,
                "consistency": {"steps": 2},
                "student": {"lora_rank": 4, "lora_alpha": 16, "lora_targets": "attention"},
            }
        }
    ).distill
    captions = None if layout == "dit" else [PROMPTS[i % 3] for i in range(16)]
    student, summary = distill(
        p,
        load_pipeline(teachers / layout),
        torch.rand(16, 1, 8, 8),
        tmp_path / "ckpt",
        log=lambda m: None,
        teacher_path=teachers / layout,
        captions=captions,
    )
    assert summary["lora_rank"] == 4 and 0 < summary["adapter_params"] < summary.get("student_params", 1e12)
    save_pipeline(student, tmp_path / "student")
    adapter_only(tmp_path / "student", tmp_path / "adapter")
    fused = adapter_for(load_pipeline(tmp_path / "student"))
    registered = adapter_for(load_pipeline(tmp_path / "adapter"))
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 500])
    cond = torch.tensor([3, 7]) if layout == "dit" else fused.encode_prompts(PROMPTS[:2])
    want = fused.output(fused.unet, z, t, cond)
    teacher = adapter_for(load_pipeline(teachers / layout))
    assert (want - teacher.output(teacher.unet, z, t, cond)).abs().max() > 0  # the adapter changed the model
    assert torch.allclose(registered.output(registered.unet, z, t, cond), want, atol=1e-5)
    with safe_open(str(tmp_path / "adapter" / LORA_WEIGHTS), framework="pt") as f:
        config = json.loads(f.metadata()[CONFIG_KEY])
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert (config["r"], config["lora_alpha"]) == (4, 16)
    base = adapter_for(load_pipeline(teachers / layout))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=16, target_modules=config["target_modules"]), base.unet)
    set_peft_model_state_dict(base.unet, state)
    assert torch.allclose(base.output(base.unet, z, t, cond), want, atol=1e-5)


def test_the_model_card_of_a_registered_dit_adapter_loads_it_with_peft_and_samples_labels():
    """A DiT LoRA student's registered form (the adapter and a pointer) has no `load_lora_weights` to call: its model
    card says how peft loads it, and samples class labels, not a prompt."""
    from redistill.registry.model_card import usage

    adapter = {"base_uri": "/teachers/digits-dit", "base_sha256": "abc", "denoiser": "DiTTransformer2DModel"}
    code = usage("/students/v2", 4, None, {"num_classes": 10, "guidance_scale": 1.0}, adapter)
    assert "set_peft_model_state_dict(pipe.transformer, state)" in code and "load_lora_weights" not in code
    assert "class_labels=[0, 1], num_inference_steps=4" in code
    compile(code, "card", "exec")  # valid Python
    sd3 = usage("/students/v2", 4, None, {"guidance_scale": 1.0}, {**adapter, "denoiser": "SD3Transformer2DModel"})
    assert "pipe.load_lora_weights(" in sd3 and '"a prompt"' in sd3
