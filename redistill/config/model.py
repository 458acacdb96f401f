"""What a settings model is: the `settings` decorator that makes a class a strict pydantic dataclass of one
params.yaml section, ConfigError, and the messages that name a bad key by its params.yaml path."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass


class ConfigError(ValueError):
    """A settings file that cannot be used as written; the message says what to change."""


# strict: a quoted "5" is not read as a number, nor `true` as 1 (a whole number is still a valid float);
# extra="forbid": an unknown key is an error, never ignored
SETTINGS = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

_EXPECTED = {
    "int_type": "a whole number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dataclass_type": "its settings model",
    "dataclass_exact_type": "its settings model",
}


def unknown_key(where: str, key: Any, valid: list[str], source: str = "") -> str:
    """The message for a key `where.key` that is not one of `valid`, with the closest valid key."""
    near = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {where}.{near[0]}?)" if near else ""
    return (
        f"unknown key {where}.{key}{source}{hint}; valid keys of {where} are: {', '.join(valid)}. "
        "Fix the spelling or remove the key."
    )


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
            lines.append(
                unknown_key(where, loc[0], list(fields))
                if where
                else f"unknown section {loc[0]!r}; valid sections are: {', '.join(fields)}"
            )
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
