"""Reading params.yaml: the YAML 1.2 loader that refuses a key given twice, `Params` (every section), its parsing
from a mapping, the workspace folder and what a workspace recorded (its model's name, its calibrated bounds)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from redistill.config.judging import CalibrateParams, EvaluateParams, GateParams, ValidateParams
from redistill.config.methods import DistillParams
from redistill.config.model import ConfigError, settings, unknown_key
from redistill.config.operations import DriftParams, RegistryParams, StackParams, WatchParams
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
from redistill.config.transformers import DiTDemoParams, DiTTeacherParams, SD3DemoParams, SD3TeacherParams


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML with YAML 1.2 booleans (only true/false), as DVC's ruamel writes params.yaml: `dvc exp run -S`
    rewrites `"no"` as a bare `no`, which YAML 1.1 would read as false."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


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
            raise _DuplicateKey(
                f"the key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


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
    dit_teacher: DiTTeacherParams = Field(default_factory=DiTTeacherParams, description="the `dit_teacher` section")
    sd3_teacher: SD3TeacherParams = Field(default_factory=SD3TeacherParams, description="the `sd3_teacher` section")
    dit_demo: DiTDemoParams = Field(default_factory=DiTDemoParams, description="the `dit_demo` section")
    sd3_demo: SD3DemoParams = Field(default_factory=SD3DemoParams, description="the `sd3_demo` section")
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
    return _calibrated(
        _named(params, isinstance(registry, dict) and "student_name" in registry, root),
        isinstance(gate, dict) and "fid_gap_max" in gate,
        root,
    )


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
