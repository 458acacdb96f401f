"""Distillation methods, one file each, each reading like its paper; `distill` picks one by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from redistill.config import DistillParams


def distill(p: DistillParams, teacher, images, ckpt_dir: Path, log: Callable[[str], None] = print):
    """Run the method `p.method` with its settings from `p`; returns (student pipeline, summary)."""
    if p.method == "progressive":
        from redistill.methods.progressive import ProgressiveConfig
        from redistill.methods.progressive import distill as progressive

        cfg = ProgressiveConfig(**{f.name: getattr(p, f.name) for f in dataclasses.fields(ProgressiveConfig)})
        return progressive(teacher, images, cfg, ckpt_dir, log=log)
    raise ValueError(f"unknown distillation method {p.method!r}")  # DistillParams already refuses these
