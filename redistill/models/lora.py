"""LoRA students (Hu et al. 2021; LCM-LoRA, Luo et al. 2023, arXiv:2311.05556): the student is the teacher's UNet
with low-rank adapters on its layers, trained while the teacher's own weights stay frozen. Which layers:
`distill.student.lora_targets`; the default `lcm` is the list diffusers' LCM-LoRA script adapts (attention and
feed-forward projections, the ResNet convolutions and time projections, the down/upsamplers), `attention` only
the attention projections.

A LoRA student's folder holds the complete pipeline (the adapter fused into the UNet, so
`DiffusionPipeline.from_pretrained(folder)` samples it as it is) and, beside it, the adapter's own files
(`adapter_files.py`); its registered form is those files alone (`adapter_only`, `write_complete`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from redistill.config import ATTENTION, LCM, PRESETS, resolve_targets
from redistill.models.adapter_files import (
    ADAPTER,
    ADAPTER_ONLY,
    LORA_META,
    LORA_WEIGHTS,
    PEFT_ONLY,
    adapter_meta,
    check_base,
    check_loaded,
    inject_peft,
    load_peft_adapter,
    student_scheduler,
)
from redistill.models.pipelines import load_adapter_only, load_pipeline, save_pipeline

if TYPE_CHECKING:
    import torch

TARGETS = LCM
CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # an MMDiT's text-stream attention projections


def _matched(unet: torch.nn.Module, targets) -> set[str]:
    """The entries of `targets` that name at least one module of `unet` (peft's suffix rule)."""
    names = [n for n, _ in unet.named_modules()]
    return {t for t in targets if any(n == t or n.endswith("." + t) for n in names)}


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    targets=TARGETS,
    init: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Add a LoRA adapter of `rank` (scale `alpha`/`rank`, alpha defaulting to the rank) to `unet` in place and
    freeze everything else: only the adapter's weights train. `init`: adapter weights to start from (in peft's
    naming, as `lora_state` returns them)."""
    from peft import LoraConfig, set_peft_model_state_dict

    if rank < 1:
        raise ValueError(f"a LoRA rank must be at least 1, got {rank}")
    targets = resolve_targets(targets)
    injected = not hasattr(unet, "add_adapter") and type(unet).__name__ in PEFT_ONLY
    if not (hasattr(unet, "add_adapter") or injected) or not _matched(unet, ATTENTION):  # UNet2DModel: none
        raise ValueError(
            f"this UNet ({type(unet).__name__}) takes no LoRA adapter: it has no attention projections "
            f"({', '.join(ATTENTION)}) or no diffusers LoRA support; a LoRA student needs a UNet2DConditionModel "
            "or a transformer. Set distill.student.lora_rank: 0 for a full-UNet student"
        )
    matched = _matched(unet, targets)
    if set(ATTENTION) <= set(targets):  # an MMDiT's context stream: adapted with its attention (SD3, Flux)
        matched |= _matched(unet, CONTEXT)
    if not matched:
        raise ValueError(
            f"distill.student.lora_targets ({', '.join(targets)}) names no module of this UNet; use a "
            f"preset ({', '.join(PRESETS)}) or names of its modules"
        )
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=sorted(matched))
    if injected:
        inject_peft(unet, config)
    else:
        unet.add_adapter(config, adapter_name=ADAPTER)
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


def load_adapter(adapter_folder: Path, base_folder: Path, device: str = "cpu"):
    """The base pipeline at `base_folder` with the adapter of `adapter_folder` loaded (stock diffusers
    `load_lora_weights`) and the student's scheduler; AdapterBaseMismatch when the base is not its own."""
    check_base(adapter_folder, base_folder)
    pipe = load_pipeline(base_folder, device)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(adapter_folder), weight_name=LORA_WEIGHTS)
    else:  # DiT, PixArt: peft's own state-dict functions
        load_peft_adapter(_denoiser(pipe), adapter_folder)
    check_loaded(_denoiser(pipe), adapter_folder)
    pipe.scheduler = student_scheduler(Path(adapter_folder)) or pipe.scheduler
    return pipe


def _denoiser(pipe):
    from redistill.models import adapter_for

    return adapter_for(pipe).unet


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


def write_complete(folder: Path, out: Path) -> Path:
    """A complete pipeline folder from a LoRA student's registered form: the base's components with the adapter fused
    into the UNet, the student's scheduler, and the adapter itself beside them (`pytorch_lora_weights.safetensors`,
    for users who already have the base)."""
    import shutil

    pipe = load_adapter_only(folder)
    save_pipeline(pipe, out)
    for name in ADAPTER_ONLY:
        if (Path(folder) / name).is_file():
            shutil.copyfile(Path(folder) / name, Path(out) / name)
    return Path(out)
