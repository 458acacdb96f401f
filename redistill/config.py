"""Typed settings: `params.yaml` → dataclasses, one section per stage.

`params.yaml` is the single source of settings; the DVC stages and the CLI both read it through
`load_params`. An unknown or misspelt key is an error that names the key and lists the valid ones, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML with YAML 1.2 booleans (only true/false), as DVC's ruamel writes params.yaml: `dvc exp run -S`
    rewrites `"no"` as a bare `no`, which YAML 1.1 would read as false."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class ConfigError(ValueError):
    """A settings file that cannot be used as written; the message says what to change."""


@dataclass
class PrepareParams:
    """`prepare` stage: sklearn's bundled digits → PNG folders."""

    seed: int = 0  # one seed fixes the split, the incoming batches and their drift
    image_size: int = 8  # 8 = native digits resolution; 16 = nearest-upsampled (≈3× the training cost)
    holdout: int = 450  # images kept out of the reference: the classifier's test split and the incoming pool
    batch_size: int = 150  # images per incoming batch
    class_mix_classes: list[int] = field(default_factory=lambda: [0, 1, 7])  # over-represented in batch `class_mix`
    class_mix_share: float = 0.6  # share of batch `class_mix` drawn from those classes (the reference has ≈0.3)
    style_rotation_deg: float = 12.0  # batch `style`: rotation magnitude, sign drawn per image
    style_dilation: int = 2  # batch `style`: grey-dilation footprint in pixels (thicker strokes); 1 = off


@dataclass
class FeaturesParams:
    """`features` stage: the digit classifier whose penultimate layer feeds FID/KID."""

    seed: int = 0
    feature_dim: int = 64  # width of the penultimate layer = FID feature dimension
    epochs: int = 60
    batch_size: int = 128
    lr: float = 2.0e-3
    not_digit_ratio: float = 0.5  # "not a digit" examples per digit example (noise, shuffles, blends)
    confidence: float = 0.9  # a sample is "recognisable" when max-prob over the 10 digits is ≥ this
    encoder_epochs: int = 150  # the label-free SimCLR encoder (redistill/encoder.py), trained on the reference too
    encoder_dim: int = 128  # its representation width: the `encoder` feature space


@dataclass
class TeacherParams:
    """`teacher` stage: the DDPM teacher recipe (UNet2DModel + DDPMScheduler, ε-prediction, EMA)."""

    seed: int = 0
    name: str = "digits-ddpm"  # folder under data/teachers/
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: the linear schedule wastes steps on tiny images
    train_steps: int = 16000
    batch_size: int = 128
    lr: float = 6.0e-4
    warmup_steps: int = 250
    snr_gamma: float = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it
    ema_decay: float = 0.9995
    checkpoint_every: int = 1000  # steps between resumable checkpoints


# built-in FID/KID feature spaces (redistill/feature_spaces.py); `auto`: the classifier where the workspace has one
# (labelled data, `redistill features`), then the label-free encoder
FEATURE_SPACES = ("auto", "classifier", "encoder")
FEATURE_SPACE_KINDS = ("inception", "clip", "dinov2")  # spaces read from a local path: "<kind>:<path>"


@dataclass
class FinetuneParams:
    """`finetune` stage: a new teacher made by training the committed one a little longer (the warm-start figure)."""

    name: str = "digits-ddpm-ft"  # folder under data/teachers/
    steps: int = 300  # optimiser steps on top of the teacher's own
    lr: float = 2.0e-4
    warmup_steps: int = 20
    seed: int = 1  # another seed than the teacher's: new batches and noise, so the weights really move

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"finetune.steps must be at least 1, got {self.steps}")


@dataclass
class EvaluateParams:
    """`evaluate`: the metric suite (quality, fidelity, speed, memory)."""

    seed: int = 0
    num_samples: int = 8000  # generated samples for FID/KID to start with
    max_samples: int = 32000  # ... doubled up to this until the FID-gap CI meets the gate's precision target
    reference_steps: int = 50  # steps of the reference pipeline (the teacher) for fidelity and speedup
    bootstrap: int = 200  # bootstrap resamples for the 95% CIs
    kid_subset_size: int = 500
    sample_batch_size: int = 500  # generation batch; fixed so candidate and reference share noise
    latency_repeats: int = 20  # timed batch-1 calls per pipeline, after warm-up
    throughput_repeats: int = 3  # timed batch-64 calls per pipeline, after warm-up
    throughput_batch: int = 64
    features: list[str] = field(default_factory=lambda: ["auto"])  # FID/KID spaces; the gate checks each; the first one's figures head the report
    floor_splits: int = 20  # random split-halves of the real set behind the real-against-real FID floor

    def __post_init__(self):
        if not self.features:
            raise ConfigError("evaluate.features must name at least one feature space, e.g. [classifier, encoder]")
        for name in self.features:
            kind, colon, path = name.partition(":")  # inception: as before; a folder space needs its folder
            if name not in FEATURE_SPACES and not (kind in FEATURE_SPACE_KINDS and colon and (path or kind == "inception")):
                raise ConfigError(f"unknown feature space {name!r} in evaluate.features; valid are: "
                                  f"{', '.join(FEATURE_SPACES)}, inception:/path/to/inception.safetensors, "
                                  "clip:/path/to/clip-folder or dinov2:/path/to/dinov2-folder")
        if self.max_samples < self.num_samples:
            raise ConfigError(f"evaluate.max_samples ({self.max_samples}) must be at least evaluate.num_samples "
                              f"({self.num_samples})")
        if self.floor_splits < 2:
            raise ConfigError(f"evaluate.floor_splits must be at least 2, got {self.floor_splits}")


@dataclass
class ValidateParams:
    """`validate`: the great_expectations suite over the per-image table of a data folder."""

    min_count: int = 100  # fewer images than this cannot represent the data
    band_quantiles: list[float] = field(default_factory=lambda: [0.005, 0.995])  # reference quantiles that bound per-image mean/std
    band_widen: float = 0.5  # each band is widened by this share of its width on both sides
    mostly: float = 0.98  # share of images that must sit inside the intensity bands
    label_kl_max: float = 0.25  # KL(batch labels ‖ reference labels) allowed, when labels exist


# the survey's three families (Fan et al. 2025): what each method promises decides which fidelity bound applies
METHOD_FAMILY = {"output": "fidelity", "progressive": "trajectory", "consistency": "trajectory",
                 "adversarial": "distribution", "dmd": "distribution"}


@dataclass
class PsnrMinParams:
    """`gate.psnr_min`: PSNR (dB) to the teacher on the same noise, at least, per method family; 0 = not gated."""

    fidelity: float = 20.0  # output distillation: matching the teacher's outputs is the method's promise
    trajectory: float = 20.0  # progressive, consistency: they keep the teacher's noise-to-image map
    distribution: float = 0.0  # dmd, adversarial: they match the data distribution, not the map


@dataclass
class GateParams:
    """`gate`: when a distilled student may replace the champion."""

    fid_gap_max: float = 0.25  # (student FID − teacher FID) ÷ the real-vs-real split-half floor, at most, in every evaluate.features space
    speedup_min: float = 8.0  # throughput speedup over the teacher at batch 64, at least
    psnr_min: PsnrMinParams = field(default_factory=PsnrMinParams)
    recognisable_min: float = 0.85  # share of samples recognised as a digit, at least
    fid_change_max: float = 0.10  # relative: the student's FID CI must reach below champion FID × (1 + this)
    kid_change_max: float = 0.01  # absolute: the student's KID CI must reach below champion KID + this
    first_run: str = "absolute"  # with no champion: "absolute" (absolute thresholds alone) or "reject"

    def __post_init__(self):
        if self.first_run not in ("absolute", "reject"):
            raise ConfigError(f"gate.first_run must be 'absolute' or 'reject', got {self.first_run!r}")


METHODS = ("progressive", "consistency", "output", "adversarial", "dmd")  # one file each in redistill/methods/


@dataclass
class ProgressiveParams:
    """`distill.progressive`: halving rounds (Salimans & Ho 2022)."""

    teacher_steps: int = 16  # the teacher's DDIM step count where halving starts
    steps_per_round: int = 1500  # optimiser steps per halving round
    first_timestep: int = 959  # the student's first timestep: 959 keeps the teacher's ε; 999 = trailing, v student


@dataclass
class ConsistencyParams:
    """`distill.consistency`: LCM-style consistency distillation (Song et al. 2023; Luo et al. 2023)."""

    steps: int = 3000  # optimiser steps
    solver_steps: int = 48  # N, the teacher's DDIM solver grid; skip k = 1000 // N (48: starts at t=959)
    target_ema: float = 0.95  # μ of the target network θ⁻
    huber_c: float = 0.001  # pseudo-Huber constant; 0 gives L2
    export: str = "ema"  # the exported weights: ema (of θ, distill.ema_decay) or target (θ⁻, as diffusers' LCM script)
    sampler: str = "lcm"  # lcm (stock LCMScheduler: re-noise with fresh noise) or ddim (deterministic, stock DDIMScheduler)

    def __post_init__(self):
        if self.export not in ("ema", "target"):
            raise ConfigError(f"distill.consistency.export must be ema or target, got {self.export!r}")
        if self.sampler not in ("lcm", "ddim"):
            raise ConfigError(f"distill.consistency.sampler must be lcm or ddim, got {self.sampler!r}")


@dataclass
class OutputParams:
    """`distill.output`: one-step output distillation on cached teacher pairs (Luhman & Luhman 2021)."""

    pairs: int = 8000  # (noise, teacher output) pairs, generated once per teacher into data/pairs/
    pairs_steps: int = 50  # the teacher's DDIM steps per pair
    steps: int = 3000  # optimiser steps
    first_timestep: int = 959  # more than 1 step: the student's DDIM chain starts here, then T/steps apart


@dataclass
class AdversarialParams:
    """`distill.adversarial`: ADD-style adversarial distillation (Sauer et al. 2023)."""

    steps: int = 1500  # student steps, one discriminator step each (~4× a progressive step's cost)
    distill_weight: float = 2.5  # λ of the distillation loss next to the adversarial one
    disc_lr: float = 0.0002
    disc_max_t: int = 500  # the discriminator sees images noised at t < this
    solver_steps: int = 48  # the LCMScheduler grid of the student's timesteps (starts at 959)


@dataclass
class DMDParams:
    """`distill.dmd`: DMD2-style distribution matching (Yin et al. 2024)."""

    def __post_init__(self):
        if self.start not in ("teacher", "output", "progressive"):
            raise ConfigError(f"distill.dmd.start must be teacher, output or progressive, got {self.start!r}")

    steps: int = 1000  # generator steps
    fake_updates: int = 5  # fake-score steps per generator step (two time-scale rule)
    fake_lr: float = 0.0003
    gan_weight: float = 0.0  # > 0 adds DMD2's GAN term on real images (a head on the fake score's features)
    start: str = "teacher"  # the generator: teacher (LCM multistep), or a deterministic sampler distilled first: output or progressive
    regression_weight: float = 0.0  # > 0 adds DMD1's regression loss on cached teacher pairs (deterministic generators only)
    output_steps: int = 3000  # start: output — its optimiser steps
    progressive_steps: int = 1500  # start: progressive — optimiser steps per halving round (2 rounds)
    first_timestep: int = 959  # a deterministic K-step generator's first timestep (then T/K apart)
    pairs: int = 8000  # teacher pairs for the regression and the output start, cached in data/pairs/ (shared with `output`)
    pairs_steps: int = 50  # the teacher's DDIM steps per pair
    backward_simulation: bool = False  # later steps' inputs: the generator's own re-noised outputs (true) or noised real images
    t_min: int = 20
    t_max: int = 980
    solver_steps: int = 48  # the LCMScheduler grid of the generator's timesteps


@dataclass
class StudentParams:
    """`distill.student`: a smaller student (BK-SDM style) for any method; empty / 0 keep the teacher's shape."""

    block_out_channels: list[int] = field(default_factory=list)  # one entry per UNet level, e.g. [16, 32]
    layers_per_block: int = 0  # e.g. 1 where the teacher has 2
    feature_loss: float = 0.0  # weight of block-output feature matching to the teacher (0: off)


@dataclass
class DistillParams:
    """`distill`: the method, the shared budget, and one subsection of settings per method."""

    method: str = "progressive"  # one of METHODS
    target_steps: int = 4  # the student's sampling step count
    batch_size: int = 64
    lr: float = 3.0e-4
    ema_decay: float = 0.999  # the exported EMA of the student
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints
    mixed_precision: str = "no"  # torch AMP: no, fp16 (loss-scaled, overflowed steps skipped) or bf16
    init: str = "auto"  # cold: from the teacher; warm: from the champion (refused when it does not fit); auto: warm when it fits, else cold
    warm_fraction: float = 0.33  # a warm start trains this share of the method's optimiser steps
    progressive: ProgressiveParams = field(default_factory=ProgressiveParams)
    consistency: ConsistencyParams = field(default_factory=ConsistencyParams)
    output: OutputParams = field(default_factory=OutputParams)
    adversarial: AdversarialParams = field(default_factory=AdversarialParams)
    dmd: DMDParams = field(default_factory=DMDParams)
    student: StudentParams = field(default_factory=StudentParams)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown distill.method {self.method!r}; valid methods are: {', '.join(METHODS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"distill.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.target_steps < 1:
            raise ConfigError(f"distill.target_steps must be at least 1, got {self.target_steps}")
        if self.init not in ("cold", "warm", "auto"):
            raise ConfigError(f"distill.init must be cold, warm or auto, got {self.init!r}")
        if not 0 < self.warm_fraction <= 1:
            raise ConfigError(f"distill.warm_fraction must be in (0, 1], got {self.warm_fraction}")


@dataclass
class RegistryParams:
    """`registry`: where students are registered in MLflow."""

    student_name: str = "digits-student"  # registered model name
    experiment: str = "redistill"  # MLflow experiment of the cycle runs
    # a tracking server that goes away: each MLflow step of a cycle is tried again after these pauses (one
    # retry per entry), and each HTTP request inside a try is retried `http_retries` times with back-off and
    # waits at most `http_timeout_s` for an answer (MLFLOW_HTTP_REQUEST_* environment variables win)
    retry_delays_s: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0])
    http_retries: int = 2
    http_timeout_s: int = 60

    def __post_init__(self):
        if any(d < 0 for d in self.retry_delays_s) or len(self.retry_delays_s) > 10:
            raise ConfigError(f"registry.retry_delays_s must be at most 10 pauses of 0 s or more, got {self.retry_delays_s}")
        if not 0 <= self.http_retries <= 10:
            raise ConfigError(f"registry.http_retries must be between 0 and 10, got {self.http_retries}")
        if self.http_timeout_s < 1:
            raise ConfigError(f"registry.http_timeout_s must be at least 1, got {self.http_timeout_s}")


@dataclass
class DriftParams:
    """`drift`: is a new batch in data/incoming/ drawn like the representative set? (redistill/drift.py)"""

    alpha: float = 0.02  # family-wise false-alarm level: MMD and the Holm-corrected KS family get alpha/2 each
    permutations: int = 1000  # MMD permutations; the smallest reachable p is 1/(1 + this)
    seed: int = 0
    calibration_splits: int = 200  # reference-against-reference splits for `redistill drift calibrate` (≥ 50)
    clear_batches: int = 2  # hysteresis: clean batches in a row that close a drift episode
    cooldown_hours: float = 24.0  # a new episode re-distils at most once per this window

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ConfigError(f"drift.alpha must be between 0 and 1, got {self.alpha}")
        if self.permutations < 99:
            raise ConfigError(f"drift.permutations must be at least 99, got {self.permutations}")
        if self.calibration_splits < 50:
            raise ConfigError(f"drift.calibration_splits must be at least 50, got {self.calibration_splits}")


@dataclass
class WatchParams:
    """`watch`: the new-teacher watch and its schedule (redistill/watch.py, `redistill watch` / `serve`)."""

    settle_seconds: float = 60.0  # a teacher folder is taken only after no file in it changed for this long
    interval_minutes: float = 10.0  # `redistill serve`: how often the watch deployment runs
    nightly_cron: str = "0 2 * * *"  # `redistill serve`: the nightly cycle (keep prefect.yaml in step)
    timezone: str = "UTC"
    teacher_model: str = ""  # also watch this registered MLflow model for new teacher versions ("" = folders only)
    teacher_alias: str = "champion"  # ... at this alias

    def __post_init__(self):
        if self.settle_seconds < 0 or self.interval_minutes <= 0:
            raise ConfigError("watch.settle_seconds must be ≥ 0 and watch.interval_minutes > 0")
        if len(self.nightly_cron.split()) != 5:
            raise ConfigError(f"watch.nightly_cron must be a 5-field cron expression like '0 2 * * *', "
                              f"got {self.nightly_cron!r}")


@dataclass
class Params:
    """Every setting of the project, one section per stage."""

    prepare: PrepareParams = field(default_factory=PrepareParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    gate: GateParams = field(default_factory=GateParams)
    distill: DistillParams = field(default_factory=DistillParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    drift: DriftParams = field(default_factory=DriftParams)
    watch: WatchParams = field(default_factory=WatchParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self, sections: list[str] | None = None) -> str:
        """Hash of the resolved settings (optionally only some sections), stable across key order."""
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r} at {where}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} in params.yaml; valid keys of {where} are: "
            f"{', '.join(fields)}. Fix the spelling or remove the key."
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping into `Params`; raises ConfigError naming the bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections (prepare, features, teacher, ...)")
    fields = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown section {unknown[0]!r} in params.yaml; valid sections are: {', '.join(fields)}. "
            "Fix the spelling or remove the section."
        )
    return Params(**{name: _build(_section_type(name), raw.get(name), name) for name in fields})


def _section_type(name: str) -> type:
    return typing.get_type_hints(Params)[name]


def workspace(path: str | os.PathLike | None = None) -> Path:
    """The workspace folder: explicit path, else $REDISTILL_HOME, else the current directory."""
    if path is not None:
        return Path(path).resolve()
    env = os.environ.get("REDISTILL_HOME")
    return Path(env).resolve() if env else Path.cwd().resolve()


def load_params(path: str | os.PathLike | None = None, ws: Path | None = None) -> Params:
    """Load `params.yaml` (default: the workspace's); a missing file means all defaults."""
    p = Path(path) if path is not None else (ws or workspace()) / "params.yaml"
    if not p.exists():
        if path is not None:
            raise ConfigError(f"settings file {p} does not exist; pass an existing params.yaml")
        return Params()
    try:
        raw = yaml.load(p.read_text(), Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    try:
        return parse_params(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
