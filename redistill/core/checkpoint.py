"""Resumable training state and the update step, shared by the teacher recipe and every distillation method.

A checkpoint is a folder under the run's checkpoint directory:
- `state.pt`: optimiser, LR-schedule, EMA and RNG state (tensors and plain containers only, read back
  with `torch.load(..., weights_only=True)`);
- `<model>.safetensors`: each model's weights, written after the state;
- `meta.json`: the step counters and the recipe fingerprint, written last, so a folder that has it is
  complete, and a run killed while writing leaves a folder that `latest` ignores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def save(path: Path, weights: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict) -> None:
    """Write one checkpoint folder; `meta` must hold an integer `order` (later checkpoints are larger)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "state.pt")
    for name, sd in weights.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, path / f"{name}.safetensors")
    (path / "meta.json").write_text(json.dumps(meta))


def complete(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in `ckpt_dir`, oldest first."""
    found = [p.parent for p in Path(ckpt_dir).glob("*/meta.json")]
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text())["order"])


def latest(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its meta, or None."""
    ckpts = complete(ckpt_dir)
    return (ckpts[-1], json.loads((ckpts[-1] / "meta.json").read_text())) if ckpts else None


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep only the newest `keep` complete checkpoints."""
    for old in complete(ckpt_dir)[:-keep]:
        shutil.rmtree(old)


def load_state(path: Path) -> dict:
    """The optimiser/EMA/RNG state of a checkpoint this project wrote (no arbitrary unpickling)."""
    return torch.load(Path(path) / "state.pt", weights_only=True)


def load_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / f"{name}.safetensors")


def update(
    loss: torch.Tensor, model: torch.nn.Module, optimizer, ema=None, lr_scheduler=None, max_grad_norm: float = 1.0
) -> None:
    """One optimiser step: backward, clip the gradient norm, step, advance the LR schedule and the EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    if ema is not None:
        ema.step(model.parameters())
