"""Settings derived from settings: a command's overrides applied, and the latent demos' own settings."""

from __future__ import annotations

import dataclasses


def with_method(p, method: str | None, steps: int | None = None):
    """`p` with distill.method and distill.target_steps replaced where given (raises ConfigError for bad values)."""
    changes = {k: v for k, v in (("method", method), ("target_steps", steps)) if v is not None}
    if changes:
        p.distill = dataclasses.replace(p.distill, **changes)
    return p


def demo_settings(p, section: str = "t2i_demo") -> tuple[dict, object]:
    """The settings of a latent demo (`redistill demo --kind text-to-image|dit|sd3`): `p` with its demo section
    (`t2i_demo`, `dit_demo`, `sd3_demo`) applied (the registered model, the student's method, steps, learning rate,
    batch and LoRA rank); returns (raw mapping, Params). Raises ConfigError when the result is not valid."""
    from redistill.config.loader import parse_params

    d = getattr(p, section)
    raw = p.to_dict()
    raw["registry"]["student_name"] = d.student_name
    raw["distill"].update(method=d.method, target_steps=d.target_steps, lr=d.lr, batch_size=d.batch_size, init="cold")
    raw["distill"]["student"]["lora_rank"] = d.lora_rank
    raw["distill"][d.method]["steps"] = d.steps
    return raw, parse_params(raw)
