"""LoRA students (Hu et al. 2021; LCM-LoRA, Luo et al. 2023, arXiv:2311.05556): the student is the teacher's UNet
with low-rank adapters on its layers, trained while the teacher's own weights stay frozen. Which layers:
`distill.student.lora_targets`; the default `lcm` is the list diffusers' LCM-LoRA script adapts (attention and
feed-forward projections, the ResNet convolutions and time projections, the down/upsamplers), `attention` only
the attention projections.

What a LoRA student's folder holds, beside the complete pipeline (the adapter fused into the UNet, so
`DiffusionPipeline.from_pretrained(folder)` samples it as it is):
- `pytorch_lora_weights.safetensors`: the adapter alone, in diffusers' format, for users who already have the
  base: `pipe.load_lora_weights(folder)` on the base pipeline, then the student's scheduler;
- `redistill_lora.json`: the base teacher's sha256 (every file of its folder, `teacher.pipeline_sha256`), the
  rank, alpha and target modules. `load_adapter` refuses a base whose sha256 differs: an adapter trained on
  another teacher gives a different model, silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from redistill.config import ATTENTION, LCM, PRESETS, resolve_targets

if TYPE_CHECKING:
    import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(folder) finds it
LORA_META = "redistill_lora.json"
TARGETS = LCM
ADAPTER = "redistill"


class AdapterBaseMismatch(ValueError):
    """A LoRA adapter offered to a base pipeline other than the one it was trained on."""


def _matched(unet: torch.nn.Module, targets) -> set[str]:
    """The entries of `targets` that name at least one module of `unet` (peft's suffix rule)."""
    names = [n for n, _ in unet.named_modules()]
    return {t for t in targets if any(n == t or n.endswith("." + t) for n in names)}


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None, targets=TARGETS,
             init: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Add a LoRA adapter of `rank` (scale `alpha`/`rank`, alpha defaulting to the rank) to `unet` in place and
    freeze everything else: only the adapter's weights train. `init`: adapter weights to start from (in peft's
    naming, as `lora_state` returns them)."""
    from peft import LoraConfig, set_peft_model_state_dict

    if rank < 1:
        raise ValueError(f"a LoRA rank must be at least 1, got {rank}")
    targets = resolve_targets(targets)
    if not hasattr(unet, "add_adapter") or not _matched(unet, ATTENTION):  # UNet2DModel: no diffusers LoRA support
        raise ValueError(f"this UNet ({type(unet).__name__}) takes no LoRA adapter: it has no attention projections "
                         f"({', '.join(ATTENTION)}) or no diffusers LoRA support; a LoRA student needs a UNet2DConditionModel. "
                         "Set distill.student.lora_rank: 0 for a full-UNet student")
    matched = _matched(unet, targets)
    if not matched:
        raise ValueError(f"distill.student.lora_targets ({', '.join(targets)}) names no module of this UNet; use a "
                         f"preset ({', '.join(PRESETS)}) or names of its modules")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=sorted(matched)), adapter_name=ADAPTER)
    if init is not None:
        set_peft_model_state_dict(unet, init, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return unet


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's naming), detached on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def fused_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain UNet (no adapter layers) whose weights are the base's plus the adapter's low-rank update."""
    import copy

    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(unet)
    for module in out.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
    for module in list(out.modules()):  # each LoRA wrapper replaced by its base layer, now merged
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())
    out._hf_peft_config_loaded = False  # a plain model again: save_pretrained writes its whole weights
    if hasattr(out, "peft_config"):
        del out.peft_config
    out.requires_grad_(False)
    return out


def save_adapter(unet: torch.nn.Module, folder: Path, base_sha256: str | None, rank: int, alpha: float | None = None,
                 extra: dict | None = None, base_uri: str | None = None) -> Path:
    """Write the adapter of `unet` into `folder` in diffusers' LoRA format, with its pointer to the base."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft's naming, as diffusers' LCM-LoRA script saves it: converted to the older diffusers naming
    # (convert_state_dict_to_diffusers), an adapter on convolutions and attention loads back without its attention layers
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                              safe_serialization=True)
    meta = {"base_sha256": base_sha256, "base_uri": base_uri, "rank": rank, "alpha": alpha or rank,
            "target_modules": sorted(unet.peft_config[ADAPTER].target_modules),
            "weights": LORA_WEIGHTS, **(extra or {})}
    (folder / LORA_META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def adapter_meta(folder: Path) -> dict | None:
    """The adapter's pointer file of a student folder, or None for a folder without an adapter."""
    f = Path(folder) / LORA_META
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the student folder is damaged") from e


def check_base(adapter_folder: Path, base_folder: Path) -> dict:
    """The adapter's pointer, after checking that `base_folder` is the pipeline it was trained on."""
    from redistill.models.pipelines import pipeline_sha256

    meta = adapter_meta(adapter_folder)
    if meta is None:
        raise ValueError(f"{adapter_folder} holds no LoRA adapter ({LORA_META} is missing)")
    want, have = meta.get("base_sha256"), pipeline_sha256(base_folder)
    if want != have:
        raise AdapterBaseMismatch(
            f"the LoRA adapter in {adapter_folder} was trained on the base pipeline with sha256 {want}, but "
            f"{base_folder} has sha256 {have}. Load it on its own base teacher (redistill lineage shows which), or "
            "re-distil a student from this teacher")
    return meta


def _check_loaded(unet, folder: Path) -> None:
    """Refuse an adapter that `load_lora_weights` took only in part: every adapted layer in the file must have
    become a LoRA layer of the UNet (a partial load samples another model without any error)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / LORA_WEIGHTS), framework="pt") as f:
        layers = {k.split(".lora")[0] for k in f.keys() if ".lora" in k}
    loaded = sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A"))
    if loaded < len(layers):
        from redistill.models.pipelines import PipelineError

        raise PipelineError(f"the LoRA adapter in {folder} adapts {len(layers)} layers but only {loaded} loaded into the "
                            "base's UNet; the adapter file is damaged or in a naming this diffusers does not map")


def load_adapter(adapter_folder: Path, base_folder: Path, device: str = "cpu"):
    """The base pipeline at `base_folder` with the adapter of `adapter_folder` loaded (stock diffusers
    `load_lora_weights`) and the student's scheduler; AdapterBaseMismatch when the base is not its own."""
    from redistill.models.pipelines import load_pipeline

    check_base(adapter_folder, base_folder)
    pipe = load_pipeline(base_folder, device)
    pipe.load_lora_weights(str(adapter_folder), weight_name=LORA_WEIGHTS)
    _check_loaded(pipe.unet, adapter_folder)
    pipe.scheduler = student_scheduler(Path(adapter_folder)) or pipe.scheduler
    return pipe


def student_scheduler(folder: Path):
    """The student's scheduler saved in `folder/scheduler` (a stock diffusers class), or None without one."""
    import diffusers

    f = Path(folder) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return None
    cls = getattr(diffusers, json.loads(f.read_text()).get("_class_name", ""), None)
    return cls.from_pretrained(str(f.parent)) if cls is not None else None


# ---------------------------------------------------------------------------------------------------
# The registered form: the adapter and a pointer to its base, not a copy of the base
# ---------------------------------------------------------------------------------------------------

ADAPTER_ONLY = (LORA_WEIGHTS, LORA_META, "redistill_sampling.json", "redistill_distill.json")  # + scheduler/


def is_adapter_only(folder: Path) -> bool:
    """A LoRA student's registered form: the adapter, its scheduler and pointer, without the base's components."""
    folder = Path(folder)
    return (folder / LORA_META).is_file() and not (folder / "model_index.json").is_file()


def adapter_only(student: Path, out: Path) -> Path:
    """The registered form of a saved LoRA student folder: its adapter (a few MB), its pointer to the base (sha256
    and where it was), its scheduler and sampling settings; the base's components stay with the base."""
    import shutil

    student, out = Path(student), Path(out)
    if adapter_meta(student) is None:
        raise ValueError(f"{student} is not a LoRA student (no {LORA_META})")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ADAPTER_ONLY:
        if (student / name).is_file():
            shutil.copyfile(student / name, out / name)
    shutil.copytree(student / "scheduler", out / "scheduler")
    return out


def load_adapter_only(folder: Path, device: str = "cpu"):
    """A LoRA student's registered form as a pipeline: its base teacher (found where the pointer says, checked by
    sha256) with the adapter fused into the UNet, the student's scheduler and sampling settings."""
    from redistill.models.pipelines import PipelineError, load_pipeline

    folder = Path(folder)
    meta = adapter_meta(folder)
    base = meta.get("base_uri")
    if not base or not Path(base).is_dir():
        raise PipelineError(f"{folder} is a LoRA adapter whose base teacher (sha256 {meta.get('base_sha256')}) is not at "
                            f"{base!r}; put the base teacher folder there, or load the adapter yourself with "
                            "pipe.load_lora_weights on that base")
    check_base(folder, Path(base))
    pipe = load_pipeline(Path(base), device)
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER)
    _check_loaded(pipe.unet, folder)
    pipe.fuse_lora(adapter_names=[ADAPTER])
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    sched = student_scheduler(folder)
    if sched is None:
        raise PipelineError(f"{folder} is a LoRA adapter without its student's scheduler (scheduler/ with a stock "
                            "diffusers scheduler_config.json); the registered student is damaged")
    pipe.scheduler = sched
    sampling = folder / "redistill_sampling.json"
    if sampling.is_file():
        pipe.redistill_sampling = json.loads(sampling.read_text())
    pipe.redistill_adapter_folder = str(folder)
    pipe._redistill_adapter = None  # the base's adapter read the base's sampling settings: the student's hold now
    return pipe


def write_complete(folder: Path, out: Path) -> Path:
    """A complete pipeline folder from a LoRA student's registered form: the base's components with the adapter fused
    into the UNet, the student's scheduler, and the adapter itself beside them (`pytorch_lora_weights.safetensors`,
    for users who already have the base)."""
    import shutil

    from redistill.models.pipelines import save_pipeline

    pipe = load_adapter_only(folder)
    save_pipeline(pipe, out)
    for name in ADAPTER_ONLY:
        if (Path(folder) / name).is_file():
            shutil.copyfile(Path(folder) / name, Path(out) / name)
    return Path(out)
