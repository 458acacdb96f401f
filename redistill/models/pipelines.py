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
OWN_PIPELINES = ("ClassConditionalPipeline",)  # pipeline classes redistill defines (redistill/models/class_pipeline.py)
OWN_PIPELINE_FILE = "pipeline_redistill.py"  # their code, copied into an exported folder for loading without redistill


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
    _check_files(path)
    for comp, spec in model_index.items():
        if comp.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        sub = path / comp
        if not sub.is_dir():
            raise PipelineError(f"{sub} is missing: model_index.json lists the component {comp!r}. Copy the whole "
                                "folder that `pipeline.save_pretrained(...)` wrote")
        if not any((sub / c).is_file() for c in ("config.json", "scheduler_config.json", "tokenizer_config.json")):
            raise PipelineError(f"{sub} has no config.json, scheduler_config.json or tokenizer_config.json; copy the "
                                "whole pipeline folder")
        pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
        tensors = [p.name for p in sub.iterdir() if p.suffix == ".safetensors"]
        if pickles and not tensors:
            raise PipelineError(
                f"{sub} holds weights as {pickles[0]}, a pickle-based format that redistill never loads "
                "(unpickling runs code). Re-save the pipeline with `save_pretrained(..., "
                "safe_serialization=True)` to get .safetensors weights"
            )
    return model_index


def _check_files(path: Path) -> None:
    """Every file of the folder: inside it (no symlink out), complete (no partial download), and every
    .safetensors file as long as its header says. Raises PipelineError naming the file."""
    from redistill.core.files import PARTIAL_SUFFIXES, safetensors_problem  # shared with the watch's readiness check

    root = path.resolve()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_symlink():
            target = f.resolve()
            if root not in target.parents:
                raise PipelineError(f"{path}/{rel} is a symlink to {target}, outside the pipeline folder; "
                                    "copy the file into the folder instead of linking to it")
        if f.name.endswith(PARTIAL_SUFFIXES) or f.name.startswith(".~"):
            raise PipelineError(f"{path}/{rel} looks like a file still being written (a partial download); "
                                "wait until the copy has finished, then run again")
        if f.suffix == ".safetensors" and f.is_file():
            problem = safetensors_problem(f)
            if problem:
                raise PipelineError(f"{path}/{rel}: {problem}. Copy or save the weights again")


def load_pipeline(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a diffusers pipeline folder from safetensors weights only, with its progress bar off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from redistill.models.lora import is_adapter_only, load_adapter_only

    if Path(path).is_dir() and is_adapter_only(Path(path)):  # a LoRA student as registered: its base + the adapter
        _check_files(Path(path))
        pipe = load_adapter_only(Path(path), device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    model_index = check_pipeline_folder(path)
    diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
    name = model_index.get("_class_name")
    own = (name[-1] if isinstance(name, list) else name) in OWN_PIPELINES
    if isinstance(name, list) and not own:
        raise PipelineError(f"{path} names custom pipeline code ({name[0]}.py); redistill never runs code from a "
                            "model folder. Save the teacher as a stock diffusers pipeline (e.g. DDPMPipeline)")
    try:
        # a pipeline class of redistill's own (an exported class-conditional student) is assembled from its stock
        # components; the copy of its code inside the folder (for users without redistill) is never run here
        pipe = (_load_own(Path(path), model_index) if own else
                DiffusionPipeline.from_pretrained(str(path), use_safetensors=True, local_files_only=True))
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise PipelineError(f"could not load the pipeline at {path} (check that each component's config.json, "
                            f"e.g. unet/config.json, matches its weights): {e}") from e
    from redistill.models import UnsupportedPipeline, adapter_for

    try:
        adapter_for(pipe)  # every later step goes through the pipeline's adapter: refuse a kind none serves now
    except UnsupportedPipeline as e:
        raise PipelineError(f"{path}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype is not None:
        pipe.unet.to(dtype)
    return pipe


def check_fits(pipe, path: Path, channels: int, size: tuple[int, int], data_path: Path | None = None) -> None:
    """The pipeline's channels and sample size must match the data, else a message saying what to do."""
    from redistill.models import adapter_for

    model = adapter_for(pipe)
    own, in_channels = model.image_size, model.image_channels  # a latent model's pictures, not its latents
    where = data_path or "the reference data"
    if in_channels != channels:
        raise PipelineError(
            f"pipeline at {path} has {in_channels} input channels but {where} has {channels}; "
            f"pass --data with {'RGB' if in_channels == 3 else 'grayscale'} images or pick a pipeline "
            f"with {channels} channel(s)"
        )
    if own != tuple(size):
        raise PipelineError(
            f"pipeline at {path} makes {own[0]}×{own[1]} images but {where} is {size[0]}×{size[1]}; "
            "pass --data with images of the pipeline's size or pick a pipeline of the data's size"
        )


@torch.no_grad()
def validate_teacher(path: Path, channels: int, size: tuple[int, int], probe: int = 4,
                     data_path: Path | None = None) -> dict:
    """Check a teacher before anything uses it: it loads from safetensors, fits the data, has finite
    weights and gives finite outputs on a probe batch. Returns its sha256 and the facts checked."""
    from redistill.models import adapter_for

    pipe = load_pipeline(path)
    check_fits(pipe, path, channels, size, data_path)
    model = adapter_for(pipe)
    bad = [name for name, w in pipe.unet.named_parameters() if not torch.isfinite(w).all()]
    if bad:
        raise PipelineError(f"teacher at {path} has non-finite weights in {bad[0]} (and {len(bad) - 1} more); "
                            "the checkpoint is corrupt, re-export it")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((probe, model.channels, *model.sample_size), generator=g)  # the model's own space (latents)
    cond = model.conditions(probe, g)
    T = model.num_train_timesteps
    for t in (T - 1, T // 2, 0):
        out = model.teacher_output(pipe.unet, x, torch.full((probe,), t), cond)
        if out.shape != x.shape or not torch.isfinite(out).all():
            raise PipelineError(f"teacher at {path} gives {'non-finite' if out.shape == x.shape else 'mis-shaped'} "
                                f"outputs on a probe batch at timestep {t}; it cannot be distilled")
    return {
        "sha256": pipeline_sha256(path),
        **model.facts(),  # kind, prediction type, schedule length, channels, size, conditioning
        "params": sum(w.numel() for w in pipe.unet.parameters()),
    }


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
        if type(pipe).__name__ in OWN_PIPELINES:  # loadable without redistill: DiffusionPipeline.from_pretrained(
            _with_own_code(tmp, type(pipe).__name__)  # folder, trust_remote_code=True)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        _write_attachments(pipe, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a pipeline folder is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def _write_attachments(pipe, folder: Path) -> None:
    """What a student pipeline carries beside its components: how it is sampled (a text-to-image student:
    redistill_sampling.json) and a LoRA student's adapter with its base's sha256 (redistill/lora.py)."""
    sampling = getattr(pipe, "redistill_sampling", None)
    if sampling:
        from redistill.models.text_to_image import SAMPLING_FILE

        (folder / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2) + "\n")
    lora = getattr(pipe, "redistill_lora", None)
    if lora:
        from redistill.models.lora import save_adapter

        save_adapter(lora["unet"], folder, lora.get("base_sha256"), lora["rank"], lora.get("alpha"),
                     base_uri=lora.get("base_uri"))


def _load_own(path: Path, model_index: dict):
    """A folder of one of redistill's own pipeline classes, from its stock diffusers components and its config."""
    import diffusers

    from redistill.models.class_pipeline import ClassConditionalPipeline

    parts = {}
    for comp in ("unet", "scheduler"):
        library, cls_name = model_index[comp]
        if library != "diffusers" or not hasattr(diffusers, cls_name):
            raise PipelineError(f"{path}/{comp} is a {library}.{cls_name}; redistill's own pipelines hold diffusers components")
        cls = getattr(diffusers, cls_name)
        parts[comp] = (cls.from_pretrained(path / comp, use_safetensors=True, local_files_only=True) if comp == "unet"
                       else cls.from_pretrained(path / comp))
    extras = {k: model_index[k] for k in ("num_classes", "null_class", "guidance_scale", "distilled_guidance_scale")
              if k in model_index}
    return ClassConditionalPipeline(parts["unet"], parts["scheduler"], **extras)


def _with_own_code(folder: Path, class_name: str) -> None:
    """Copy the pipeline class's code into `folder` and point model_index.json at it (diffusers' custom-pipeline
    layout), so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it anywhere."""
    from redistill.models import class_pipeline

    shutil.copyfile(class_pipeline.__file__, folder / OWN_PIPELINE_FILE)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [OWN_PIPELINE_FILE.removesuffix(".py"), class_name]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
