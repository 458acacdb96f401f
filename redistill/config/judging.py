"""The settings that judge a student: the metric suite (`evaluate`), the data checks (`validate`), the gate and the
calibration of its bounds (`gate`, `calibrate`)."""

from __future__ import annotations

from pydantic import Field

from redistill.config.model import ConfigError, settings
from redistill.config.tables import FEATURE_SPACE_KINDS, FEATURE_SPACES, FID_GAP_MAX, GENERATION_BATCH


@settings("evaluate")
class EvaluateParams:
    """`evaluate`: the metric suite (quality, fidelity, speed, memory)."""

    seed: int = Field(0, description="seed of the generation noise (shared by candidate and reference)")
    num_samples: int = Field(2000, description="generated samples for FID/KID to start with")
    max_samples: int = Field(
        32000, description="... doubled up to this until every FID-gap CI lies on one side of the gate's bound"
    )
    reference_steps: int = Field(
        50, description="steps of the reference pipeline (the teacher) for fidelity and speedup"
    )
    bootstrap: int = Field(200, description="bootstrap resamples for the 95% CIs")
    kid_subset_size: int = Field(500, description="KID subset size")
    sample_batch_size: int = Field(
        GENERATION_BATCH, description="generation batch; fixed so candidate and reference share noise"
    )
    latency_repeats: int = Field(10, description="timed batch-1 calls per pipeline, after warm-up")
    throughput_repeats: int = Field(2, description="timed batch-64 calls per pipeline, after warm-up")
    throughput_batch: int = Field(64, description="batch size of the throughput timing")
    features: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="FID/KID spaces; the gate checks each; the first one's figures head the report",
    )
    floor_splits: int = Field(
        20, description="random split-halves of the real set behind the real-against-real FID floor"
    )
    curve_samples: int = Field(
        0,
        description="the cycle's report of the teacher's FID against its step count (1-16): samples per point (0: no curve; `redistill bench` draws it); it decides nothing",
    )

    def __post_init__(self):
        if not self.features:
            raise ConfigError("evaluate.features must name at least one feature space, e.g. [classifier, encoder]")
        for name in self.features:
            kind, colon, path = name.partition(":")  # inception: as before; a folder space needs its folder
            if name not in FEATURE_SPACES and not (
                kind in FEATURE_SPACE_KINDS and colon and (path or kind == "inception")
            ):
                raise ConfigError(
                    f"unknown feature space {name!r} in evaluate.features; valid are: "
                    f"{', '.join(FEATURE_SPACES)}, inception:/path/to/inception.safetensors, "
                    "clip:/path/to/clip-folder or dinov2:/path/to/dinov2-folder"
                )
        if self.max_samples < self.num_samples:
            raise ConfigError(
                f"evaluate.max_samples ({self.max_samples}) must be at least evaluate.num_samples ({self.num_samples})"
            )
        if self.floor_splits < 2:
            raise ConfigError(f"evaluate.floor_splits must be at least 2, got {self.floor_splits}")


@settings("calibrate")
class CalibrateParams:
    """`calibrate` (`redistill calibrate`, the DVC stage `calibrate`): the controls the gate's FID-gap bounds are
    measured on (redistill/calibration.py). Positive controls must pass, negative controls must fail. Each is measured
    as a cycle measures a student: evaluate.num_samples samples (the ancestral DDPM control excepted), the same spaces."""

    positive_steps: list[int] = Field(
        default_factory=lambda: [25, 100],
        description="positive: the teacher's DDIM at these step counts, on the reference's noise",
    )
    ddpm_samples: int = Field(
        2000,
        description="positive: samples of the teacher's ancestral DDPM sampler at its 1,000 training steps (0: leave it out; 20x the reference's cost per image)",
    )
    other_seed: int = Field(
        1000, description="positive: the teacher at the reference steps from other noise (evaluate.seed + this)"
    )
    finetuned: str = Field(
        "data/teacher-updates/digits-ddpm-ft",
        description='positive: a lightly fine-tuned teacher at the reference steps ("" leaves it out)',
    )
    undistilled_steps: list[int] = Field(
        default_factory=lambda: [1, 4],
        description="negative: the undistilled teacher's DDIM at the students' step counts",
    )
    half_trained_steps: int = Field(
        1500,
        description="negative: a 1-step output-distilled student trained this many steps, half the output method's budget (0: leave it out)",
    )
    blur_sigma: float = Field(
        0.4, description="negative: the teacher's samples under a Gaussian blur of this sigma, in pixels"
    )
    dropped_classes: list[int] = Field(
        default_factory=lambda: [8],
        description="negative: the teacher's samples without these classes (mode dropping); classes by the classifier, else clusters of the first space",
    )

    def __post_init__(self):
        if self.ddpm_samples < 0 or self.half_trained_steps < 0 or self.blur_sigma <= 0:
            raise ConfigError("calibrate.ddpm_samples and half_trained_steps must be at least 0, blur_sigma above 0")
        if any(k < 1 for k in self.positive_steps + self.undistilled_steps):
            raise ConfigError("calibrate.positive_steps and undistilled_steps must be step counts of at least 1")


@settings("validate")
class ValidateParams:
    """`validate`: the great_expectations suite over the per-image table of a data folder."""

    min_count: int = Field(100, description="fewer images than this cannot represent the data")
    band_quantiles: list[float] = Field(
        default_factory=lambda: [0.005, 0.995], description="reference quantiles that bound per-image mean/std"
    )
    band_widen: float = Field(0.5, description="each band is widened by this share of its width on both sides")
    mostly: float = Field(0.98, description="share of images that must sit inside the intensity bands")
    label_kl_max: float = Field(0.25, description="KL(batch labels ‖ reference labels) allowed, when labels exist")
    max_caption_tokens: int = Field(
        77,
        description="captions: the most whitespace words a caption may have when the teacher has no tokenizer/ (with one, its model_max_length in tokens is the limit)",
    )
    max_duplicate_caption_share: float = Field(
        0.25,
        description="captions: the largest share of the captioned images one caption (case and spacing ignored) may label; class prompts with a few paraphrases each stay far below, a captioner stuck on one fallback caption does not",
    )

    def __post_init__(self):
        if self.max_caption_tokens < 1:
            raise ConfigError(f"validate.max_caption_tokens must be at least 1, got {self.max_caption_tokens}")
        if not 0.0 < self.max_duplicate_caption_share <= 1.0:
            raise ConfigError(
                f"validate.max_duplicate_caption_share must be in (0, 1], got "
                f"{self.max_duplicate_caption_share}; 1 turns the duplicate check off"
            )


@settings("gate.psnr_min")
class PsnrMinParams:
    """`gate.psnr_min`: PSNR (dB) to the teacher on the same noise, at least, per method family; 0 = not gated."""

    fidelity: float = Field(
        20.0, description="output distillation: matching the teacher's outputs is the method's promise"
    )
    trajectory: float = Field(
        20.0, description="progressive, consistency, rectified: they keep the teacher's noise-to-image map"
    )
    distribution: float = Field(0.0, description="dmd, adversarial: they match the data distribution, not the map")


@settings("gate")
class GateParams:
    """`gate`: when a distilled student may replace the champion."""

    fid_gap_max: float | dict[str, float | None] = Field(
        default_factory=lambda: dict(FID_GAP_MAX),
        description="(student FID − teacher FID) ÷ the real-vs-real split-half floor, at most: one number for every "
        "evaluate.features space, or one per space with a `default` for the others (null: the space reports "
        "but does not decide); calibrated on controls by `redistill calibrate`",
    )
    speedup_min: float = Field(8.0, description="throughput speedup over the teacher at batch 64, at least")
    psnr_min: PsnrMinParams = Field(
        default_factory=PsnrMinParams, description="PSNR to the teacher, at least, per method family"
    )
    recognisable_min: float = Field(0.85, description="share of samples recognised as a digit, at least")
    fid_change_max: float = Field(
        0.10, description="relative: the student's FID CI must reach below champion FID × (1 + this)"
    )
    kid_change_max: float = Field(
        0.01, description="absolute: the student's KID CI must reach below champion KID + this"
    )
    first_run: str = Field(
        "absolute", description='with no champion: "absolute" (absolute thresholds alone) or "reject"'
    )

    def __post_init__(self):
        if self.first_run not in ("absolute", "reject"):
            raise ConfigError(f"gate.first_run must be 'absolute' or 'reject', got {self.first_run!r}")
        if isinstance(self.fid_gap_max, dict) and "default" not in self.fid_gap_max:
            raise ConfigError(
                "gate.fid_gap_max per space needs a `default` entry, the bound of every space it does not "
                f"name (null: those spaces report but do not decide); got {self.fid_gap_max}"
            )
