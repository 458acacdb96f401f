"""Pipeline I/O for teachers and students: check, load (safetensors only), hash and save atomically.

Pipelines are only ever loaded from safetensors, so no pickle from outside is ever run. The folder checks and the
hash are `folders.py`, a LoRA adapter's files `adapter_files.py`; this module is the API callers import, and loads
a LoRA student's registered form (its adapter) onto its base.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from redistill.models.adapter_files import (
    ADAPTER,
    LORA_WEIGHTS,
    adapter_meta,
    check_base,
    check_loaded,
    is_adapter_only,
    load_peft_adapter,
    save_adapter,
    student_scheduler,
)
from redistill.models.folders import (
    PipelineError,
    check_files,
    check_pipeline_folder,
    folder_size_bytes,
    pipeline_sha256,
)

# the pipeline I/O API callers import from here, the folder checks and the hash included
__all__ = [
    "PipelineError",
    "check_fits",
    "check_pipeline_folder",
    "folder_size_bytes",
    "load_adapter_only",
    "load_pipeline",
    "pipeline_sha256",
    "save_pipeline",
    "validate_teacher",
]

OWN_PIPELINES = ("ClassConditionalPipeline",)  # pipeline classes redistill defines (redistill/models/class_pipeline.py)
OWN_PIPELINE_FILE = "pipeline_redistill.py"  # their code, copied into an exported folder for loading without redistill


def load_pipeline(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a diffusers pipeline folder from safetensors weights only, with its progress bar off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    if Path(path).is_dir() and is_adapter_only(Path(path)):  # a LoRA student as registered: its base + the adapter
        check_files(Path(path))
        pipe = load_adapter_only(Path(path), device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    model_index = check_pipeline_folder(path)
    from redistill.models import UnsupportedPipeline, adapter_for, check_layout

    try:
        check_layout(model_index, path)  # a layout no kind serves is refused before anything loads
    except UnsupportedPipeline as e:
        raise PipelineError(str(e)) from e
    diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
    name = model_index.get("_class_name")
    own = (name[-1] if isinstance(name, list) else name) in OWN_PIPELINES
    if isinstance(name, list) and not own:
        raise PipelineError(
            f"{path} names custom pipeline code ({name[0]}.py); redistill never runs code from a "
            "model folder. Save the teacher as a stock diffusers pipeline (e.g. DDPMPipeline)"
        )
    try:
        # a pipeline class of redistill's own (an exported class-conditional student) is assembled from its stock
        # components; the copy of its code inside the folder (for users without redistill) is never run here
        pipe = (
            _load_own(Path(path), model_index)
            if own
            else DiffusionPipeline.from_pretrained(
                str(path), use_safetensors=True, local_files_only=True, **_absent_components(model_index)
            )
        )
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors
        raise PipelineError(
            f"could not load the pipeline at {path} (check that each component's config.json, "
            f"e.g. unet/config.json, matches its weights): {e}"
        ) from e
    try:
        model = adapter_for(pipe)  # every later step goes through the pipeline's adapter: refuse a kind none serves
    except UnsupportedPipeline as e:
        raise PipelineError(f"{path}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype is not None:
        model.unet.to(dtype)
    return pipe


def load_adapter_only(folder: Path, device: str | torch.device = "cpu"):
    """A LoRA student's registered form as a pipeline: its base teacher (found where the pointer says, checked by
    sha256) with the adapter fused into the UNet, the student's scheduler and sampling settings."""
    from redistill.models import adapter_for

    folder = Path(folder)
    meta = adapter_meta(folder)
    base = meta.get("base_uri")
    if not base or not Path(base).is_dir():
        raise PipelineError(
            f"{folder} is a LoRA adapter whose base teacher (sha256 {meta.get('base_sha256')}) is not at "
            f"{base!r}; put the base teacher folder there, or load the adapter yourself with "
            "pipe.load_lora_weights on that base"
        )
    check_base(folder, Path(base))
    pipe = load_pipeline(Path(base), device)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER)
        check_loaded(adapter_for(pipe).unet, folder)
        pipe.fuse_lora(adapter_names=[ADAPTER])
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    else:  # DiT, PixArt: injected by peft, then fused into a plain transformer
        from redistill.models.lora import fused_copy

        load_peft_adapter(pipe.transformer, folder)
        check_loaded(pipe.transformer, folder)
        pipe.transformer = fused_copy(pipe.transformer)
    sched = student_scheduler(folder)
    if sched is None:
        raise PipelineError(
            f"{folder} is a LoRA adapter without its student's scheduler (scheduler/ with a stock "
            "diffusers scheduler_config.json); the registered student is damaged"
        )
    pipe.scheduler = sched
    sampling = folder / "redistill_sampling.json"
    if sampling.is_file():
        pipe.redistill_sampling = json.loads(sampling.read_text())
    pipe.redistill_adapter_folder = str(folder)
    pipe._redistill_adapter = None  # the base's adapter read the base's sampling settings: the student's hold now
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
def validate_teacher(
    path: Path, channels: int, size: tuple[int, int], probe: int = 4, data_path: Path | None = None
) -> dict:
    """Check a teacher before anything uses it: it loads from safetensors, fits the data, has finite
    weights and gives finite outputs on a probe batch. Returns its sha256 and the facts checked."""
    from redistill.models import adapter_for

    pipe = load_pipeline(path)
    check_fits(pipe, path, channels, size, data_path)
    model = adapter_for(pipe)
    bad = [name for name, w in model.unet.named_parameters() if not torch.isfinite(w).all()]
    if bad:
        raise PipelineError(
            f"teacher at {path} has non-finite weights in {bad[0]} (and {len(bad) - 1} more); "
            "the checkpoint is corrupt, re-export it"
        )
    g = torch.Generator().manual_seed(0)
    x = torch.randn((probe, model.channels, *model.sample_size), generator=g)  # the model's own space (latents)
    cond = model.conditions(probe, g)
    T = model.num_train_timesteps
    for t in (T - 1, T // 2, 0):
        out = model.teacher_output(model.unet, x, torch.full((probe,), t), cond)
        if out.shape != x.shape or not torch.isfinite(out).all():
            raise PipelineError(
                f"teacher at {path} gives {'non-finite' if out.shape == x.shape else 'mis-shaped'} "
                f"outputs on a probe batch at timestep {t}; it cannot be distilled"
            )
    return {
        "sha256": pipeline_sha256(path),
        **model.facts(),  # kind, prediction type, schedule length, channels, size, conditioning
        "params": sum(w.numel() for w in model.unet.parameters()),
    }


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
    redistill_sampling.json) and a LoRA student's adapter with its base's sha256 (adapter_files.py)."""
    sampling = getattr(pipe, "redistill_sampling", None)
    if sampling:
        from redistill.models.text_to_image import SAMPLING_FILE

        (folder / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2) + "\n")
    lora = getattr(pipe, "redistill_lora", None)
    if lora:
        save_adapter(
            lora["unet"],
            folder,
            lora.get("base_sha256"),
            lora["rank"],
            lora.get("alpha"),
            base_uri=lora.get("base_uri"),
        )


def _absent_components(model_index: dict) -> dict:
    """The components model_index.json lists as absent ([null, null]), passed as None: a Stable Diffusion 3 folder
    saved without T5 loads only so."""
    return {k: None for k, v in model_index.items() if not k.startswith("_") and v == [None, None]}


def _load_own(path: Path, model_index: dict):
    """A folder of one of redistill's own pipeline classes, from its stock diffusers components and its config."""
    import diffusers

    from redistill.models.class_pipeline import ClassConditionalPipeline

    parts = {}
    for comp in ("unet", "scheduler"):
        library, cls_name = model_index[comp]
        if library != "diffusers" or not hasattr(diffusers, cls_name):
            raise PipelineError(
                f"{path}/{comp} is a {library}.{cls_name}; redistill's own pipelines hold diffusers components"
            )
        cls = getattr(diffusers, cls_name)
        parts[comp] = (
            cls.from_pretrained(path / comp, use_safetensors=True, local_files_only=True)
            if comp == "unet"
            else cls.from_pretrained(path / comp)
        )
    extras = {
        k: model_index[k]
        for k in ("num_classes", "null_class", "guidance_scale", "distilled_guidance_scale")
        if k in model_index
    }
    return ClassConditionalPipeline(parts["unet"], parts["scheduler"], **extras)


def _with_own_code(folder: Path, class_name: str) -> None:
    """Copy the pipeline class's code into `folder` and point model_index.json at it (diffusers' custom-pipeline
    layout), so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it anywhere."""
    from redistill.models import class_pipeline

    shutil.copyfile(class_pipeline.__file__, folder / OWN_PIPELINE_FILE)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [OWN_PIPELINE_FILE.removesuffix(".py"), class_name]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
