"""A LoRA student's files: what its folder holds beside (or instead of) the complete pipeline.

- `pytorch_lora_weights.safetensors`: the adapter alone, in diffusers' format, for users who already have the
  base: `pipe.load_lora_weights(folder)` on the base pipeline, then the student's scheduler;
- `redistill_lora.json`: the base teacher's sha256 (every file of its folder, `folders.pipeline_sha256`), the
  rank, alpha and target modules. `check_base` refuses a base whose sha256 differs: an adapter trained on
  another teacher gives a different model, silently.

The registered form of a LoRA student (`is_adapter_only`) is these files, its scheduler and its sampling settings,
without the base's components; `pipelines.load_pipeline` rebuilds it on its base. Training-time LoRA (adding an
adapter, fusing it) is `lora.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from redistill.models.folders import PipelineError, pipeline_sha256

if TYPE_CHECKING:
    import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(folder) finds it
LORA_META = "redistill_lora.json"
ADAPTER = "redistill"
ADAPTER_ONLY = (LORA_WEIGHTS, LORA_META, "redistill_sampling.json", "redistill_distill.json")  # + scheduler/


class AdapterBaseMismatch(ValueError):
    """A LoRA adapter offered to a base pipeline other than the one it was trained on."""


# transformers whose pipeline saves and loads LoRA (`save_lora_weights(transformer_lora_layers=...)`)
TRANSFORMER_LORA_PIPELINES = {
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxTransformer2DModel": "FluxPipeline",
}


def save_adapter(
    unet: torch.nn.Module,
    folder: Path,
    base_sha256: str | None,
    rank: int,
    alpha: float | None = None,
    extra: dict | None = None,
    base_uri: str | None = None,
) -> Path:
    """Write the adapter of `unet` into `folder` in diffusers' LoRA format, with its pointer to the base."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft's naming, as diffusers' LCM-LoRA script saves it: converted to the older diffusers naming
    # (convert_state_dict_to_diffusers), an adapter on convolutions and attention loads back without its attention layers
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    transformer_pipeline = TRANSFORMER_LORA_PIPELINES.get(type(unet).__name__)
    if transformer_pipeline:  # the transformer pipeline's format, with peft's config beside it, so `lora_alpha`
        import diffusers  # survives `load_lora_weights`

        getattr(diffusers, transformer_pipeline).save_lora_weights(
            str(folder),
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
            weight_name=LORA_WEIGHTS,
            safe_serialization=True,
        )
    else:
        StableDiffusionPipeline.save_lora_weights(
            str(folder), unet_lora_layers=layers, weight_name=LORA_WEIGHTS, safe_serialization=True
        )
    meta = {
        "base_sha256": base_sha256,
        "base_uri": base_uri,
        "rank": rank,
        "alpha": alpha or rank,
        "target_modules": sorted(unet.peft_config[ADAPTER].target_modules),
        "weights": LORA_WEIGHTS,
        **(extra or {}),
    }
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


def is_adapter_only(folder: Path) -> bool:
    """A LoRA student's registered form: the adapter, its scheduler and pointer, without the base's components."""
    folder = Path(folder)
    return (folder / LORA_META).is_file() and not (folder / "model_index.json").is_file()


def check_base(adapter_folder: Path, base_folder: Path) -> dict:
    """The adapter's pointer, after checking that `base_folder` is the pipeline it was trained on."""
    meta = adapter_meta(adapter_folder)
    if meta is None:
        raise ValueError(f"{adapter_folder} holds no LoRA adapter ({LORA_META} is missing)")
    want, have = meta.get("base_sha256"), pipeline_sha256(base_folder)
    if want != have:
        raise AdapterBaseMismatch(
            f"the LoRA adapter in {adapter_folder} was trained on the base pipeline with sha256 {want}, but "
            f"{base_folder} has sha256 {have}. Load it on its own base teacher (redistill lineage shows which), or "
            "re-distil a student from this teacher"
        )
    return meta


def check_loaded(unet, folder: Path) -> None:
    """Refuse an adapter that `load_lora_weights` took only in part: every adapted layer in the file must have
    become a LoRA layer of the UNet (a partial load samples another model without any error)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / LORA_WEIGHTS), framework="pt") as f:
        layers = {k.split(".lora")[0] for k in f.keys() if ".lora" in k}
    loaded = sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A"))
    if loaded < len(layers):
        raise PipelineError(
            f"the LoRA adapter in {folder} adapts {len(layers)} layers but only {loaded} loaded into the "
            "base's UNet; the adapter file is damaged or in a naming this diffusers does not map"
        )


def student_scheduler(folder: Path):
    """The student's scheduler saved in `folder/scheduler` (a stock diffusers class), or None without one."""
    import diffusers

    f = Path(folder) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return None
    cls = getattr(diffusers, json.loads(f.read_text()).get("_class_name", ""), None)
    return cls.from_pretrained(str(f.parent)) if cls is not None else None
