"""Typed settings: `params.yaml` → one pydantic dataclass per section, the single model of every setting.

`params.yaml` is the single source of settings; the DVC stages and the CLI both read it through
`load_params`. The method configs (redistill/methods/) are built from these same classes, so a default is
written once. An unknown or misspelt key is an error that names the key and lists the valid ones, and a
value of the wrong type names the key, the value and what is allowed, so a typo never silently falls back
to a default.

The settings API is this package: model.py (what a settings model is), tables.py (the fixed tables), sections.py,
judging.py, methods.py and operations.py (the section models), loader.py (params.yaml, `Params`, the workspace), overrides.py (settings derived from
settings).
"""

from redistill.config.judging import CalibrateParams, EvaluateParams, GateParams, PsnrMinParams, ValidateParams
from redistill.config.loader import (
    Params,
    _Yaml12Loader,
    gap_bounds_with,
    load_params,
    parse_params,
    recorded_gap_bounds,
    recorded_model_name,
    settings_name_model,
    settings_set,
    workspace,
    workspace_derived,
)
from redistill.config.methods import (
    AdversarialParams,
    ConsistencyParams,
    DistillParams,
    DMDParams,
    OutputParams,
    ProgressiveParams,
    RectifiedParams,
    StudentParams,
)
from redistill.config.model import SETTINGS, ConfigError, same_as, settings, unknown_key
from redistill.config.operations import DriftParams, RegistryParams, StackParams, WatchParams
from redistill.config.overrides import demo_settings, with_method
from redistill.config.sections import (
    ChampionParams,
    DemoParams,
    FeaturesParams,
    FinetuneParams,
    FlowTeacherParams,
    PrepareParams,
    T2IDemoParams,
    T2ITeacherParams,
    TeacherParams,
)
from redistill.config.tables import (
    ATTENTION,
    FEATURE_SPACE_KINDS,
    FEATURE_SPACES,
    FID_GAP_MAX,
    GENERATION_BATCH,
    LCM,
    METHOD_FAMILY,
    METHODS,
    PRESETS,
    TEACHER_OBJECTIVES,
    resolve_targets,
)
from redistill.config.transformers import (
    DiTDemoParams,
    DiTTeacherParams,
    SD3DemoParams,
    SD3TeacherParams,
    TransformerTeacherParams,
)

__all__ = [
    "ATTENTION",
    "FEATURE_SPACE_KINDS",
    "FEATURE_SPACES",
    "FID_GAP_MAX",
    "GENERATION_BATCH",
    "LCM",
    "METHOD_FAMILY",
    "METHODS",
    "PRESETS",
    "SETTINGS",
    "TEACHER_OBJECTIVES",
    "AdversarialParams",
    "CalibrateParams",
    "ChampionParams",
    "ConfigError",
    "ConsistencyParams",
    "DMDParams",
    "DemoParams",
    "DistillParams",
    "DriftParams",
    "EvaluateParams",
    "FeaturesParams",
    "FinetuneParams",
    "FlowTeacherParams",
    "GateParams",
    "OutputParams",
    "Params",
    "PrepareParams",
    "ProgressiveParams",
    "PsnrMinParams",
    "RectifiedParams",
    "RegistryParams",
    "StackParams",
    "StudentParams",
    "T2IDemoParams",
    "T2ITeacherParams",
    "DiTDemoParams",
    "DiTTeacherParams",
    "SD3DemoParams",
    "SD3TeacherParams",
    "TransformerTeacherParams",
    "TeacherParams",
    "ValidateParams",
    "WatchParams",
    "_Yaml12Loader",
    "gap_bounds_with",
    "load_params",
    "parse_params",
    "recorded_gap_bounds",
    "recorded_model_name",
    "resolve_targets",
    "same_as",
    "settings",
    "settings_name_model",
    "settings_set",
    "demo_settings",
    "unknown_key",
    "with_method",
    "workspace",
    "workspace_derived",
]
