"""Pipeline folders on disk: the one error type, the checks a folder passes before anything loads it, and its hash.

The bottom of pipeline I/O: `adapter_files.py` (a LoRA adapter's files) and `pipelines.py` (loading and saving)
build on it, and it imports neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PipelineError(ValueError):
    """A pipeline folder that cannot be used; the message says what is wrong and what to do."""


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
    check_files(path)
    for comp, spec in model_index.items():
        if comp.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        sub = path / comp
        if not sub.is_dir():
            raise PipelineError(
                f"{sub} is missing: model_index.json lists the component {comp!r}. Copy the whole "
                "folder that `pipeline.save_pretrained(...)` wrote"
            )
        if not any((sub / c).is_file() for c in ("config.json", "scheduler_config.json", "tokenizer_config.json")):
            raise PipelineError(
                f"{sub} has no config.json, scheduler_config.json or tokenizer_config.json; copy the "
                "whole pipeline folder"
            )
        pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
        tensors = [p.name for p in sub.iterdir() if p.suffix == ".safetensors"]
        if pickles and not tensors:
            raise PipelineError(
                f"{sub} holds weights as {pickles[0]}, a pickle-based format that redistill never loads "
                "(unpickling runs code). Re-save the pipeline with `save_pretrained(..., "
                "safe_serialization=True)` to get .safetensors weights"
            )
    return model_index


def check_files(path: Path) -> None:
    """Every file of the folder: inside it (no symlink out), complete (no partial download), and every
    .safetensors file as long as its header says. Raises PipelineError naming the file."""
    from redistill.core.files import PARTIAL_SUFFIXES, safetensors_problem  # shared with the watch's readiness check

    path = Path(path)
    root = path.resolve()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_symlink():
            target = f.resolve()
            if root not in target.parents:
                raise PipelineError(
                    f"{path}/{rel} is a symlink to {target}, outside the pipeline folder; "
                    "copy the file into the folder instead of linking to it"
                )
        if f.name.endswith(PARTIAL_SUFFIXES) or f.name.startswith(".~"):
            raise PipelineError(
                f"{path}/{rel} looks like a file still being written (a partial download); "
                "wait until the copy has finished, then run again"
            )
        if f.suffix == ".safetensors" and f.is_file():
            problem = safetensors_problem(f)
            if problem:
                raise PipelineError(f"{path}/{rel}: {problem}. Copy or save the weights again")


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
    """The bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
