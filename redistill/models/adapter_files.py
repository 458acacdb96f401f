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
# transformers whose pipeline has no LoRA loader (DiTPipeline, PixArtSigmaPipeline): peft injects the adapter and its
# state-dict functions save and load it, the LoraConfig kept in the file's metadata (so lora_alpha survives)
PEFT_ONLY = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
CONFIG_KEY = "lora_adapter_metadata"  # diffusers' metadata key for the adapter's config


def inject_peft(model: torch.nn.Module, config) -> None:
    """Add the LoRA adapter `config` to `model` with peft's `inject_adapter_in_model` (a model without diffusers'
    LoRA mixin), recording the config where peft's state-dict functions look for it."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.peft_config = {ADAPTER: config}


def load_peft_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Inject and fill the adapter a PEFT_ONLY student saved in `folder` (`set_peft_model_state_dict`)."""
    import dataclasses

    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(Path(folder) / LORA_WEIGHTS), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in meta:
        raise PipelineError(f"{Path(folder) / LORA_WEIGHTS} has no LoRA config in its metadata; save the adapter again")
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in json.loads(meta[CONFIG_KEY]).items() if k in fields})
    inject_peft(model, config)
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


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
    elif type(unet).__name__ in PEFT_ONLY:  # peft's naming as is, the config in the file's metadata
        from safetensors.torch import save_file

        config = json.dumps(unet.peft_config[ADAPTER].to_dict(), default=sorted)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in layers.items()},
            str(folder / LORA_WEIGHTS),
            metadata={"format": "pt", CONFIG_KEY: config},
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
        "denoiser": type(unet).__name__,  # DiT and PixArt (PEFT_ONLY): loaded with peft, not load_lora_weights
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


def has_lora_loader(folder: Path) -> bool:
    """Whether the pipeline class of the folder's model_index.json loads LoRA itself (`load_lora_weights`); DiT and
    PixArt do not (their adapters load with peft)."""
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    return hasattr(getattr(diffusers, str(name), None), "load_lora_weights")
