"""Pipeline I/O for teachers and students: check, load (safetensors only), hash and save atomically.

Pipelines are only ever loaded from safetensors, so no pickle from outside is ever run. The teacher's
training recipe lives in `teacher_train.py` (the DVC `teacher` stage depends on that file alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PipelineError(ValueError):
    """A pipeline folder that cannot be used; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------
# Loading, checking and hashing pipeline folders
# ---------------------------------------------------------------------------------------------------


def check_pipeline_folder(path: Path) -> dict:
    """Check that `path` is a diffusers pipeline folder with safetensors weights; returns model_index."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path} is not a folder; pass a diffusers pipeline folder (save_pretrained layout)")
    index = path / "model_index.json"
    if not index.is_file():
        raise PipelineError(
            f"{path} is not a diffusers pipeline folder: it has no model_index.json. Pass the folder that "
            "`pipeline.save_pretrained(...)` wrote, e.g. data/teachers/digits-ddpm"
        )
    try:
        model_index = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{index} is not valid JSON ({e}); the pipeline folder is damaged") from e
    for comp in model_index:
        if comp.startswith("_"):
            continue
        sub = path / comp
        if not sub.is_dir():
            continue
        pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
        tensors = [p.name for p in sub.iterdir() if p.suffix == ".safetensors"]
        if pickles and not tensors:
            raise PipelineError(
                f"{sub} holds weights as {pickles[0]}, a pickle-based format that redistill never loads "
                "(unpickling runs code). Re-save the pipeline with `save_pretrained(..., "
                "safe_serialization=True)` to get .safetensors weights"
            )
    return model_index


def load_pipeline(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a diffusers pipeline folder from safetensors weights only, with its progress bar off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    check_pipeline_folder(path)
    diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise PipelineError(f"could not load the pipeline at {path}: {e}") from e
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise PipelineError(
            f"{path} holds a {type(pipe).__name__} without a `unet` and a `scheduler`; redistill works on "
            "unconditional image pipelines such as DDPMPipeline"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype is not None:
        pipe.unet.to(dtype)
    return pipe


def pipeline_sha256(path: Path) -> str:
    """sha256 over every file of a pipeline folder (weights and configs), with its relative path."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def folder_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def save_pipeline(pipe, out: Path, extra: dict[str, dict] | None = None) -> None:
    """Save a pipeline with safetensors weights atomically: written beside `out`, then renamed.

    A watcher therefore never sees a half-written folder under the final name.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a pipeline folder is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

