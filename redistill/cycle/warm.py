"""Warm starts: re-distil from the current champion instead of from the teacher.

A new teacher is usually a fine-tune of the old one, and new data a small shift of the old data, so the
champion is already close to what the next cycle must produce. Starting the student from it, and training
a share of the method's budget (`distill.warm_fraction`), is what keeps nightly re-distillation cheap.

The champion fits only when its network can be loaded, as it is, as this method's student for this
teacher: the same method and step count (the parametrisation and the trained timesteps depend on both),
the same UNet configuration as the student the method would build, and the same prediction type.
`distill.init` decides what happens otherwise: `warm` refuses the cycle, `auto` falls back to a cold start
and says why, `cold` never looks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

INIT_CHOICES = ("cold", "warm", "auto")

# config keys that do not change the network's shape or meaning
_IGNORED_CONFIG = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class WarmStartRefused(ValueError):
    """distill.init is `warm` but the champion cannot start this cycle; the message says why and what to do."""


@dataclass
class WarmStart:
    """The champion a cycle starts from."""

    version: str
    student: Path  # its pipeline folder
    sha256: str  # of that folder: part of the run's checkpoint fingerprint

    @property
    def tag(self) -> str:
        return f"warm:{self.version}"


def denoiser_folder(folder: Path) -> Path:
    """The pipeline folder's denoiser: `unet/`, or a transformer layout's `transformer/`."""
    unet = Path(folder) / "unet"
    return unet if unet.is_dir() or not (Path(folder) / "transformer").is_dir() else Path(folder) / "transformer"


def unet_config(folder: Path) -> dict:
    cfg = json.loads((denoiser_folder(folder) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG}


def expected_student_config(teacher: Path, student_channels: list[int], student_layers: int) -> dict:
    """The UNet configuration a method builds from this teacher (methods/student_shape.py's rules)."""
    cfg = unet_config(teacher)
    if student_channels:
        cfg["block_out_channels"] = list(student_channels)
    if student_layers:
        cfg["layers_per_block"] = student_layers
    return cfg


def why_not(champion_tags: dict, champion_student: Path, teacher: Path, p) -> str | None:
    """None when the champion's student can start a cycle of `p.distill` on `teacher`; else the reason."""
    from redistill.methods import WARM_METHODS
    from redistill.registry.client import PREFIX

    d = p.distill
    if d.method not in WARM_METHODS:
        why = {"rectified": "reflows the teacher's couplings, then distils the reflowed flow"}.get(
            d.method, "has no warm start"
        )
        return f"{d.method} distillation {why}, so it always starts cold; warm starts serve {', '.join(WARM_METHODS)}"
    if d.student.lora_rank:
        return (
            "a LoRA student (distill.student.lora_rank > 0) is an adapter trained on its base teacher from the "
            "start, so it always starts cold"
        )
    method, steps = champion_tags.get(PREFIX + "method"), champion_tags.get(PREFIX + "num_inference_steps")
    if method != d.method:
        return f"the champion was distilled with {method}, this cycle uses {d.method}"
    if str(steps) != str(d.target_steps):
        return f"the champion samples in {steps} steps, this cycle distils for {d.target_steps}"
    have = unet_config(champion_student)
    want = expected_student_config(teacher, d.student.block_out_channels, d.student.layers_per_block)
    diff = sorted(k for k in set(have) | set(want) if _norm(have.get(k)) != _norm(want.get(k)))
    if diff:
        k = diff[0]
        return (
            f"the champion's UNet has {k}={have.get(k)!r} where this teacher's student has {want.get(k)!r} "
            f"({len(diff)} setting(s) differ)"
        )
    ptype = json.loads((Path(champion_student) / "scheduler" / "scheduler_config.json").read_text()).get(
        "prediction_type"
    )
    teacher_ptype = json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text()).get(
        "prediction_type"
    )
    want_ptype = "sample" if d.method == "output" else teacher_ptype
    if d.method == "progressive":  # v from pure noise (a trailing grid), else the teacher's own
        from redistill.methods.progressive import student_prediction

        want_ptype = student_prediction(
            teacher_ptype,
            d.progressive.first_timestep,
            int(
                json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text()).get(
                    "num_train_timesteps", 1000
                )
            ),
        )
    if ptype != want_ptype:
        return f"the champion predicts {ptype}, a {d.method} student of this teacher predicts {want_ptype}"
    return None


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def load_init(student: Path) -> dict:
    """The champion's UNet weights (safetensors only)."""
    from safetensors.torch import load_file

    files = sorted(denoiser_folder(student).glob("*.safetensors"))
    if not files:
        raise WarmStartRefused(f"the champion's student at {student} has no safetensors UNet weights")
    return load_file(files[0])
