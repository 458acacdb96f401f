"""The DiT layout (DiTPipeline): detected from its folder, its conventions owned by its adapter (latents, the ε half
of a learned-variance output, guidance with the null class 1000), and a transformer layout no kind serves refused
before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from redistill.models import adapter_for
from redistill.models.pipelines import PipelineError, load_pipeline, validate_teacher
from redistill.teachers.dit_parts import build_dit_pipeline, save_dit


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    return save_dit(
        build_dit_pipeline(), tmp_path_factory.mktemp("dit") / "teacher", num_classes=10, guidance_scale=3.0
    )


def test_a_dit_folder_is_served_by_its_adapter_with_the_folders_classes_and_guidance(dit_folder):
    assert json.loads((dit_folder / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    facts = validate_teacher(dit_folder, 1, (8, 8))
    assert facts["kind"] == "dit-latent" and facts["denoiser"] == "DiTTransformer2DModel"
    assert (facts["channels"], facts["sample_size"], facts["image_size"]) == (4, [4, 4], [8, 8])
    assert (facts["num_classes"], facts["null_class"], facts["guidance_scale"]) == (10, 1000, 3.0)
    assert facts["learned_sigma"] is True


def test_the_adapters_guided_ddim_loop_is_what_dit_pipeline_samples(dit_folder):
    """The teacher output every method distils (guided ε, the Σ half dropped, latents decoded with the VAE's
    scaling) reproduces the stock pipeline's images from the same generator."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(dit_folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    model = adapter_for(pipe)
    images = model.sample(4, 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    labels = model.conditions(4, g)  # the draw `sample` makes first
    assert labels.max() < 10
    x = torch.randn((4, model.channels, *model.sample_size), generator=g)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(5)
    for t in sched.timesteps:
        eps = model.teacher_output(model.unet, x, t.expand(4), labels)
        assert eps.shape == x.shape  # the ε half of the 8-channel output
        x = sched.step(eps, t, x).prev_sample
    assert (model.decode(x) - images).abs().max().item() < 1e-4
    # guidance changes the output: the null class is the pipeline's 1000
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([500, 500])
    guided = model.teacher_output(model.unet, z, t, torch.tensor([1, 2]))
    assert (guided - model.output(model.unet, z, t, torch.tensor([1, 2]))).abs().max() > 0


def test_a_transformer_layout_no_kind_serves_is_refused_before_loading_with_the_served_list(tmp_path):
    folder = tmp_path / "sana"
    index = {
        "_class_name": "SanaPipeline",
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    for comp, cfg in (("transformer", "config.json"), ("scheduler", "scheduler_config.json")):
        (folder / comp).mkdir()
        (folder / comp / cfg).write_text("{}")  # no weights: anything that tried to load it would fail otherwise
    with pytest.raises(PipelineError) as e:
        load_pipeline(folder)
    msg = str(e.value)
    assert "SanaPipeline" in msg and "transformer layout" in msg
    assert (
        "DiTPipeline (dit-latent)" in msg
        and "StableDiffusion3Pipeline (sd3-latent)" in msg
        and "FluxPipeline (flux-latent)" in msg
    )
