"""Distillation methods, one file each, each reading like its paper; `distill` picks one by name.

`method_config` turns the `distill` settings into the chosen method's config and refuses, before any
training, a step count or shape that the method cannot serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from redistill.config import DistillParams

# the kinds of model (the adapter's `family`) each method can distil; the rest serve diffusion teachers only
FAMILIES_SERVED = {
    m: ("flow", "diffusion") for m in ("rectified", "consistency", "dmd", "output", "adversarial", "progressive")
}


WARM_METHODS = (
    "progressive",
    "consistency",
    "output",
    "adversarial",
    "dmd",
)  # rectified reflows the teacher's couplings
LORA_METHODS = ("consistency", "dmd")  # the methods whose student may be a LoRA adapter (distill.student.lora_rank)

# kinds of teacher only some methods serve (the rest: every method of the kind's family): rectified's student is a
# flow, so it reflows a conditional teacher only where the teacher's own pipeline samples flows (SD3, Flux)
NOT_RECTIFIED = ("consistency", "dmd", "output", "progressive", "adversarial")
KIND_METHODS = {
    kind: NOT_RECTIFIED for kind in ("class-conditional-pixel", "text-to-image-latent", "dit-latent", "pixart-latent")
}
NO_LORA_KINDS: tuple[str, ...] = ()  # kinds whose denoiser takes no LoRA adapter (none now: DiT and PixArt via peft)
KIND_HINTS = {
    kind: (
        f" (rectified's student is a flow, and a {kind} teacher's pipeline samples diffusion only; "
        "it reflows conditional flow-matching teachers: SD3, Flux)"
    )
    for kind in KIND_METHODS
}


def refuses(method: str, family: str, kind: str) -> str | None:
    """Why `method` cannot distil a teacher of adapter family `family` (kind `kind`), or None when it can."""
    if kind in KIND_METHODS and method not in KIND_METHODS[kind]:
        return (
            f"distill.method {method} does not serve {kind} teachers; use distill.method: "
            f"{', '.join(KIND_METHODS[kind][:-1])} or {KIND_METHODS[kind][-1]}{KIND_HINTS.get(kind, '')}"
        )
    if family in FAMILIES_SERVED.get(method, ("diffusion",)):
        return None
    return (
        f"distill.method {method} distils diffusion (ε/v/x₀) teachers; this teacher is a {kind} model. "
        f"Use distill.method: {', '.join(m for m, fams in FAMILIES_SERVED.items() if family in fams)}, which serve "
        "flow-matching teachers"
    )


def _fill(cls, p: DistillParams, section):
    """The method's config from the shared `distill` keys, `distill.student` and the method's own subsection.

    Every field of the config comes from the settings (only `init_from` is set later, by a warm start), so a
    config built from params.yaml cannot keep a default of its own."""
    values = {
        **{name: getattr(p, name) for name in p.__pydantic_fields__ if not dataclasses.is_dataclass(getattr(p, name))},
        **dataclasses.asdict(section),
        "student_channels": tuple(p.student.block_out_channels),
        "student_layers": p.student.layers_per_block,
        "feature_loss": p.student.feature_loss,
        "lora_rank": p.student.lora_rank,
        "lora_alpha": p.student.lora_alpha,
        "lora_targets": p.student.lora_targets,
    }
    names = [f.name for f in dataclasses.fields(cls)]
    missing = sorted(set(names) - set(values) - {"init_from"})
    if missing:
        raise TypeError(f"{cls.__name__} fields {', '.join(missing)} have no params.yaml key to come from")
    return cls(**{name: values[name] for name in names if name in values})


def method_config(p: DistillParams):
    """(config, distill function) of method `p.method`; ValueError when the settings cannot work."""
    for name in ("batch_size", "target_steps", "checkpoint_every"):
        if getattr(p, name) < 1:
            raise ValueError(f"distill.{name} must be ≥ 1, got {getattr(p, name)}")
    if not p.lr > 0:
        raise ValueError(f"distill.lr must be > 0, got {p.lr}")
    if p.student.feature_loss < 0:
        raise ValueError(f"distill.student.feature_loss must be ≥ 0, got {p.student.feature_loss}")
    if p.student.lora_rank:
        if p.method not in LORA_METHODS:
            raise ValueError(
                f"distill.student.lora_rank > 0 (a LoRA student) serves {' and '.join(LORA_METHODS)}, "
                f"not {p.method}; set lora_rank: 0 for a full-UNet student"
            )
        if p.student.block_out_channels or p.student.layers_per_block:
            raise ValueError(
                "a LoRA student is the teacher's own UNet plus an adapter: it keeps the teacher's shape. "
                "Leave distill.student.block_out_channels and layers_per_block empty, or set lora_rank: 0"
            )
    if p.method == "progressive":
        from redistill.methods.progressive import ProgressiveConfig, distill, halving_schedule

        cfg = _fill(ProgressiveConfig, p, p.progressive)
        halving_schedule(cfg.teacher_steps, cfg.target_steps)  # raises on a grid that cannot halve to the target
        return cfg, distill
    if p.method == "consistency":
        from redistill.methods.consistency import ConsistencyConfig, distill

        cfg = _fill(ConsistencyConfig, p, p.consistency)
        if not 1 <= cfg.target_steps <= cfg.solver_steps:
            raise ValueError(
                f"consistency serves 1 to solver_steps ({cfg.solver_steps}) sampling steps, "
                f"not target_steps={cfg.target_steps}"
            )
        return cfg, distill
    if p.method == "output":
        from redistill.methods.output import OutputConfig, distill

        cfg = _fill(OutputConfig, p, p.output)
        return cfg, distill
    if p.method in ("adversarial", "dmd"):
        if p.method == "adversarial":
            from redistill.methods.adversarial import AdversarialConfig as Config
            from redistill.methods.adversarial import distill
        else:
            from redistill.methods.dmd import DMDConfig as Config
            from redistill.methods.dmd import distill
        cfg = _fill(Config, p, getattr(p, p.method))
        if not 1 <= cfg.target_steps <= cfg.solver_steps:
            raise ValueError(
                f"{p.method} serves 1 to solver_steps ({cfg.solver_steps}) sampling steps, "
                f"not target_steps={cfg.target_steps}"
            )
        if p.method == "dmd" and not 0 <= cfg.t_min < cfg.t_max <= 1000:
            raise ValueError(f"distill.dmd needs 0 ≤ t_min < t_max ≤ 1000, got {cfg.t_min} and {cfg.t_max}")
        return cfg, distill
    if p.method == "rectified":
        from redistill.methods.rectified import RectifiedConfig, distill

        return _fill(RectifiedConfig, p, p.rectified), distill
    raise ValueError(f"unknown distillation method {p.method!r}")  # DistillParams already refuses these


def distill(
    p: DistillParams,
    teacher,
    images,
    ckpt_dir: Path,
    log: Callable[[str], None] = print,
    on_round=None,
    teacher_path: Path | None = None,
    workspace: Path | None = None,
    init: dict | None = None,
    init_sha256: str = "",
    captions: list[str] | None = None,
):
    """Run the method `p.method` with its settings from `p`; returns (student pipeline, summary).

    `on_round(steps, pipeline)` receives intermediate students of methods that make them (progressive).
    `teacher_path` and `workspace` key and place the teacher-pair cache (`<workspace>/data/pairs`).
    `init` (a warm start: the champion's UNet weights, `init_sha256` its folder's hash) starts the student
    from those weights and trains `p.warm_fraction` of the method's steps (redistill/warm.py).
    `captions` (one per image, the data's `ImageSet.captions`) condition a text-to-image teacher: each training
    image is noised and denoised under its own caption.
    """
    cfg, run = method_config(p)
    processes, main = process_group()
    if p.batch_size % processes:
        raise ValueError(
            f"distill.batch_size {p.batch_size} is the global batch, split evenly over the {processes} "
            f"processes: make it a multiple of {processes}"
        )
    if not main:  # under `accelerate launch`, one process speaks for all
        from redistill.methods.training import quiet

        log = quiet
    from redistill.models import adapter_for

    kind = adapter_for(teacher)
    why = refuses(p.method, kind.family, kind.kind)
    if why:
        raise ValueError(why)
    if p.student.lora_rank and kind.kind in NO_LORA_KINDS:
        raise ValueError(
            f"a LoRA student (distill.student.lora_rank > 0) is not served on a {kind.kind} teacher yet; set "
            "distill.student.lora_rank: 0 for a full student of the teacher's shape"
        )
    if hasattr(kind, "use_prompts"):  # text-to-image: the data's captions are its conditions
        if not captions:
            raise ValueError(
                "a text-to-image teacher is distilled on captioned images, and this data has no captions: "
                "add captions.csv (file,caption) or metadata.jsonl (file_name,text) to the image folder"
            )
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images; give every image its caption")
        kind.use_prompts(list(captions), paired=True)
    extra = {}
    if init is not None:
        from redistill.methods.progressive import halving_schedule

        if p.method not in WARM_METHODS:
            raise ValueError(f"{p.method} cannot start warm; warm starts serve {', '.join(WARM_METHODS)}")
        # a warm start is a share of the cold budget: of the optimiser steps, and of the teacher pairs they train on
        # (a new teacher's pairs are drawn for it: the share keeps a warm cycle's cost a share of a cold one's)
        if p.method == "progressive":  # one round from the champion, a share of all the cold rounds' steps
            rounds = len(halving_schedule(cfg.teacher_steps, cfg.target_steps))
            warm = {"steps_per_round": max(1, round(cfg.steps_per_round * rounds * p.warm_fraction))}
        else:
            warm = {"steps": max(1, round(cfg.steps * p.warm_fraction))}
        if hasattr(cfg, "pairs"):
            warm["pairs"] = max(1, round(cfg.pairs * p.warm_fraction))
        cfg = dataclasses.replace(cfg, **warm, init_from=init_sha256)
        extra["init"] = init
    if on_round is not None and p.method == "progressive":
        extra["on_round"] = on_round
    if p.method in LORA_METHODS and p.student.lora_rank:  # the adapter points at its base teacher
        from redistill.models.pipelines import pipeline_sha256

        extra["teacher_sha256"] = pipeline_sha256(teacher_path) if teacher_path is not None else None
        extra["teacher_uri"] = str(Path(teacher_path).resolve()) if teacher_path is not None else None
    if p.method in ("output", "rectified") or (
        p.method == "dmd" and (p.dmd.regression_weight > 0 or p.dmd.start == "output")
    ):
        from redistill.models.pipelines import pipeline_sha256

        extra["teacher_sha256"] = pipeline_sha256(teacher_path) if teacher_path is not None else None
        ws = Path(workspace) if workspace is not None else Path.cwd()
        extra["pairs_dir"] = ws / "data" / "pairs"
        from redistill.evaluation.sampling import sample_store

        extra["samples_dir"] = sample_store(ws)  # a pixel teacher's pairs are its samples, shared with the evaluation
    student, summary = run(teacher, images, cfg, ckpt_dir, log=log, **extra)
    summary["init"] = "warm" if init is not None else "cold"
    summary["num_processes"] = processes
    return student, summary


def process_group() -> tuple[int, bool]:
    """(number of processes, whether this is the main one): 1 and True, or those of `accelerate launch`, whose
    processes join by NCCL on GPUs and by gloo where there is none (redistill/methods/training.py)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.num_processes, state.is_main_process
