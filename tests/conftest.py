"""Shared fixtures: a real digits workspace and tiny diffusers pipelines built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]


def make_tiny_pipeline(out: Path, channels: int = 1, size: int = 8, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A ~40k-parameter DDPMPipeline saved with safetensors: untrained, but a real diffusers pipeline."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def digits_ws(tmp_path_factory) -> Path:
    """A workspace with the real embedded data (prepare) and a briefly trained feature classifier."""
    from redistill.config import FeaturesParams, Params
    from redistill.data import load_image_folder, prepare
    from redistill.features import save_classifier, train_classifier

    ws = tmp_path_factory.mktemp("ws")
    prepare(Params().prepare, ws / "data")
    fp = FeaturesParams(epochs=12)
    model, metrics = train_classifier(fp, load_image_folder(ws / "data/reference"), load_image_folder(ws / "data/holdout"), log=lambda m: None)
    save_classifier(model, ws / "data" / "features", {"metrics": metrics})
    (ws / "params.yaml").write_text(
        "features: {epochs: 12}\n"
        "evaluate: {num_samples: 120, bootstrap: 10, kid_subset_size: 50, sample_batch_size: 60,"
        " latency_repeats: 3, throughput_repeats: 1, throughput_batch: 8}\n"
    )
    return ws


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")
