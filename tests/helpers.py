"""Helpers the tests import (`from helpers import …`; tests/ is on pytest's pythonpath): tiny diffusers
pipelines built from configs, the trial workspace and environment, shared settings snippets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]

# Settings of the end-to-end tests: a cycle of seconds on a tiny teacher, and a gate every student passes.
TINY_CYCLE = """
distill: {method: progressive, target_steps: 2, batch_size: 8, checkpoint_every: 2, progressive: {teacher_steps: 4, steps_per_round: 3}}
evaluate: {num_samples: 120, max_samples: 240, bootstrap: 10, kid_subset_size: 50, sample_batch_size: 60, latency_repeats: 2,
           throughput_repeats: 1, throughput_batch: 8, curve_samples: 60}
features: {epochs: 12, encoder_epochs: 8}
"""
ENCODER_EPOCHS = 8  # the label-free encoder of the test workspaces: seconds, not the stage's 150 epochs
LENIENT_GATE = """gate: {fid_gap_max: 1000000000.0, speedup_min: 0.0, recognisable_min: 0.0,
       psnr_min: {fidelity: 0.0, trajectory: 0.0, distribution: 0.0},
       fid_change_max: 1000000000.0, kid_change_max: 1000000000.0}
"""
UNMEETABLE_GAP = "fid_gap_max: -1000000000.0"  # replaces LENIENT_GATE's gap bound: no student can pass


def make_tiny_pipeline(
    out: Path, channels: int = 1, size: int = 8, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """A ~40k-parameter DDPMPipeline saved with safetensors: untrained, but a real diffusers pipeline."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_flow_pipeline(out: Path, channels: int = 1, size: int = 8, seed: int = 0, shift: float = 1.0) -> Path:
    """A tiny flow-matching teacher: the same UNet2DModel as `make_tiny_pipeline`, read as a velocity, with a
    FlowMatchEulerDiscreteScheduler (`shift`) in a stock DDPMPipeline folder."""
    import torch
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_class_pipeline(
    out: Path, channels: int = 3, size: int = 16, num_classes: int = 5, seed: int = 0, guidance_scale: float = 2.0
) -> Path:
    """A tiny class-conditional teacher: a UNet2DModel with num_classes + 1 class embeddings (the last is the
    null class of classifier-free guidance) in a ClassConditionalPipeline guided at `guidance_scale`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from redistill.models.class_pipeline import ClassConditionalPipeline
    from redistill.models.pipelines import save_pipeline

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    save_pipeline(ClassConditionalPipeline(unet, sched, null_class=num_classes, guidance_scale=guidance_scale), out)
    return out


def crash_when(distill, teacher, data, cfg, ckpt: Path, marker: str) -> None:
    """Run a method's `distill` until a log line contains `marker`, and stop it there, as a kill would."""

    class Stop(Exception):
        pass

    def log(msg: str) -> None:
        if marker in msg:
            raise Stop

    with pytest.raises(Stop):
        distill(teacher, data, cfg, ckpt, log=log)


def resume_matches_unbroken(distill, teacher, data, cfg, ckpt: Path, fresh: Path) -> list[str]:
    """Resume the stopped run in `ckpt`; assert it ends with the weights of an unbroken run in `fresh`.
    Returns the resumed run's log lines."""
    import torch

    logs: list[str] = []
    resumed, _ = distill(teacher, data, cfg, ckpt, log=logs.append)
    unbroken, _ = distill(teacher, data, cfg, fresh, log=lambda m: None)
    for a, b in zip(resumed.unet.parameters(), unbroken.unet.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    return logs


def tiny_trial_workspace(digits_ws: Path, root: Path) -> Path:
    """A workspace for trials that run `redistill` as processes: the embedded reference data and feature
    spaces, and a tiny teacher at data/teachers/tiny."""
    import shutil

    for sub in ("reference", "features"):
        shutil.copytree(digits_ws / "data" / sub, root / "data" / sub)
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    return root


def trial_env(**extra: str) -> dict:
    """The environment for a `redistill` process a trial starts: none of the caller's servers, failpoints or
    MLflow settings leak in; one thread each, so that many processes share 2 cores fairly."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_", "REDISTILL_KILL", "REDISTILL_PAUSE"))
    }
    env.update(OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


SUMMARY_LINES: list[str] = []  # lines a test module wants at the end of the run ("faults: N/N handled")
