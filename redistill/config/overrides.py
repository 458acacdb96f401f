"""Settings derived from settings: a command's overrides applied, and the text-to-image demo's own settings."""

from __future__ import annotations

import dataclasses


def with_method(p, method: str | None, steps: int | None = None):
    """`p` with distill.method and distill.target_steps replaced where given (raises ConfigError for bad values)."""
    changes = {k: v for k, v in (("method", method), ("target_steps", steps)) if v is not None}
    if changes:
        p.distill = dataclasses.replace(p.distill, **changes)
    return p


def t2i_demo_settings(p) -> tuple[dict, object]:
    """The settings of `redistill demo --kind text-to-image`: `p` with its t2i_demo section applied (the registered
    model, an LCM-LoRA student's method, steps, learning rate, batch and rank); returns (raw mapping, Params).
    Raises ConfigError when the result is not valid."""
    from redistill.config.loader import parse_params

    d = p.t2i_demo
    raw = p.to_dict()
    raw["registry"]["student_name"] = d.student_name
    raw["distill"].update(method=d.method, target_steps=d.target_steps, lr=d.lr, batch_size=d.batch_size, init="cold")
    raw["distill"]["student"]["lora_rank"] = d.lora_rank
    raw["distill"][d.method]["steps"] = d.steps
    return raw, parse_params(raw)
