"""The fixed tables the settings check against: teacher objectives, methods and their families, feature spaces, the
calibrated FID-gap bounds and the LoRA target presets."""

from __future__ import annotations

TEACHER_OBJECTIVES = ("ddpm", "flow_matching")

# built-in FID/KID feature spaces (redistill/feature_spaces.py); `auto`: the classifier where the workspace has one
# (labelled data, `redistill features`), then the label-free encoder
FEATURE_SPACES = ("auto", "classifier", "encoder")
# images per generation batch of the evaluation, seeded `evaluate.seed + i`; a pixel teacher's pairs are drawn in
# batches of the same size, from seeds of their own, into the same store (methods/output.py)
GENERATION_BATCH = 500
FEATURE_SPACE_KINDS = ("inception", "clip", "dinov2")  # spaces read from a local path: "<kind>:<path>"

# one file each in redistill/methods/
METHODS = ("progressive", "consistency", "output", "adversarial", "dmd", "rectified")

# the survey's three families (Fan et al. 2025): what each method promises decides which fidelity bound applies
METHOD_FAMILY = {
    "output": "fidelity",
    "progressive": "trajectory",
    "consistency": "trajectory",
    "adversarial": "distribution",
    "dmd": "distribution",
    "rectified": "trajectory",
}

# the FID-gap bounds in floors, per feature space, from the calibration on controls (metrics/calibration.json,
# docs/cycle.md): each sits between the positive controls' highest gap and the negative controls' lowest
FID_GAP_MAX = {"classifier": 1.15, "encoder": 0.30, "default": 0.30}


# The layers a LoRA student adapts (distill.student.lora_targets; redistill/lora.py). Here, not in lora.py, so that
# checking the setting imports nothing.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers' train_lcm_distill_lora_sd_wds.py default: every linear and convolution of the UNet's blocks
LCM = ATTENTION + (
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
PRESETS = {"lcm": LCM, "attention": ATTENTION}


def resolve_targets(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The module names of `distill.student.lora_targets`: a preset (`lcm`, `attention`) or the names themselves
    (a list, or one comma-separated string), matched as peft matches them: a module whose name is the entry or
    ends in "." + the entry."""
    if isinstance(value, str):
        if value in PRESETS:
            return PRESETS[value]
        value = [v for v in value.split(",")]
    names = tuple(v.strip() for v in value if v.strip())
    if not names:
        raise ValueError(
            f"distill.student.lora_targets names no module; use {' or '.join(PRESETS)}, or module names "
            "such as to_q, to_k, to_v, to_out.0"
        )
    return names
