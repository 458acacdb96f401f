"""MkDocs hooks: the CLI and settings references, generated from the code on every build so they cannot drift.

`reference/cli.md` walks the Typer app (`redistill.cli.app`); `reference/settings.md` walks the settings
models (`redistill.config.Params`, one pydantic dataclass per params.yaml section). Both pages are added to
the site as generated files, so nothing is written into docs/ and `mkdocs build --strict` sees them in the nav.
Only `redistill.cli` and `redistill.config` are imported.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

CLI_PAGE = "reference/cli.md"
SETTINGS_PAGE = "reference/settings.md"


def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent  # the repository root, where mkdocs.yml is
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for uri, make in ((CLI_PAGE, cli_page), (SETTINGS_PAGE, settings_page)):
        try:
            content = make()
        except Exception as e:  # a reference that cannot be generated must fail the build, not go stale
            raise PluginError(f"docs/hooks.py: cannot generate {uri}: {type(e).__name__}: {e}") from e
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=content))
    return files


# ---------------------------------------------------------------- text helpers


def _cell(text: Any) -> str:
    """One markdown table cell: no newlines, pipes escaped, HTML escaped outside code spans."""
    s = " ".join(str(text).split())
    parts = s.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = html.escape(parts[i], quote=False)
    return "`".join(parts).replace("|", "\\|")


def _code(text: Any) -> str:
    s = str(text)  # a pipe inside a code span does not split a table cell
    tick = "``" if "`" in s else "`"
    pad = " " if tick == "``" else ""
    return f"{tick}{pad}{s}{pad}{tick}"


def _type_name(t: Any) -> str:
    if t is None or t is type(None):
        return "None"
    if isinstance(t, type) and not getattr(t, "__args__", None):
        return t.__name__
    s = str(t).replace("typing.", "").replace("pathlib.", "")
    s = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], s)
    s = re.sub(r"Optional\[(.*)\]$", r"\1 | None", s)
    return s


# ---------------------------------------------------------------- the CLI reference


def _param_type(p: Any) -> str:
    t = getattr(p, "type", None)
    if t is not None and getattr(t, "name", None):  # click
        choices = getattr(t, "choices", None)
        return " \\| ".join(map(str, choices)) if choices else str(t.name).lower()
    desc = getattr(p, "type_descriptor", None)  # newer Typer, which carries its own click
    ann = getattr(desc, "annotation", None)
    return _type_name(ann) if ann is not None else ""


def _help_text(cmd: Any) -> str:
    text = inspect.cleandoc(cmd.help or "")
    return "\n".join(line for line in text.splitlines() if line.strip() != "\b")


def _is_group(cmd: Any) -> bool:
    return isinstance(getattr(cmd, "commands", None), dict)


def _command(cmd: Any, ctx: Any, level: int) -> list[str]:
    out = [f"{'#' * level} `{ctx.command_path}`", ""]
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    out += ["```text", usage, "```", ""]
    if cmd.help:
        out += [_help_text(cmd), ""]
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False) or p.name == "help":
            continue
        is_option = bool(getattr(p, "opts", None)) and str(p.opts[0]).startswith("-")
        names = (
            " / ".join(_code(o) for o in [*p.opts, *getattr(p, "secondary_opts", [])])
            if is_option
            else _code(str(getattr(p, "metavar", None) or p.name).upper())
        )
        kind = "flag" if getattr(p, "is_flag", False) else _param_type(p)
        default = p.default
        if getattr(p, "is_flag", False) and getattr(p, "secondary_opts", None):
            default_text = _code(p.opts[0] if default else p.secondary_opts[0])
        elif callable(default) or default is None or (getattr(p, "is_flag", False) and default is False):
            default_text = "required" if getattr(p, "required", False) else ""
        else:
            default_text = _code(json.dumps(default) if isinstance(default, (list, tuple)) else default)
        envvar = getattr(p, "envvar", None)
        help_ = getattr(p, "help", None) or ""
        if envvar:
            help_ += f" (environment: {', '.join([envvar] if isinstance(envvar, str) else envvar)})"
        rows.append(f"| {names} | {_cell(kind)} | {default_text} | {_cell(help_)} |")
    if rows:
        out += ["| argument or option | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    return out


def _walk(cmd: Any, ctx: Any, level: int) -> list[str]:
    out: list[str] = []
    for name, sub in cmd.commands.items():
        if getattr(sub, "hidden", False):
            continue
        sub_ctx = sub.context_class(sub, info_name=name, parent=ctx)
        if _is_group(sub):
            out += [f"{'#' * level} `{sub_ctx.command_path}`", ""]
            if sub.help:
                out += [_help_text(sub), ""]
            out += _walk(sub, sub_ctx, level + 1)
        else:
            out += _command(sub, sub_ctx, level)
    return out


def cli_page() -> str:
    import typer

    from redistill.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="redistill")
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app (`redistill.cli.app`) when the site is built; `redistill COMMAND --help`",
        "prints the same. Every command reads `params.yaml` (or `--params FILE`) in its workspace: `--workspace DIR`,",
        "else `$REDISTILL_HOME`, else the current folder. See also the [settings reference](settings.md).",
        "",
    ]
    if group.help:
        lines += [_help_text(group), ""]
    lines += _walk(group, ctx, 2)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the settings reference


def _fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, description) of each field of a settings model, in declaration order."""
    infos = getattr(cls, "__pydantic_fields__", None)
    out = []
    for f in dataclasses.fields(cls):
        info = infos.get(f.name) if infos else None
        if info is not None:
            ann = info.annotation
            default = info.get_default(call_default_factory=True)
            desc = info.description or ""
        else:
            ann = f.type
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            desc = (f.metadata or {}).get("description", "")
        out.append((f.name, ann, default, desc))
    return out


def _default(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "see below"
    return _code(json.dumps(value, ensure_ascii=False))


def _section(cls: type, path: str, level: int) -> list[str]:
    out = [f"{'#' * level} `{path}`", ""]
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc and not doc.startswith(f"{cls.__name__}("):  # not dataclasses' generated signature
        out += [doc, ""]
    rows, nested = [], []
    for name, ann, default, desc in _fields(cls):
        if dataclasses.is_dataclass(ann):
            nested.append((ann, f"{path}.{name}"))
            rows.append(f"| `{name}` | section | [`{path}.{name}`](#{_anchor(path + '.' + name)}) | {_cell(desc)} |")
        else:
            rows.append(f"| `{name}` | {_cell(_type_name(ann))} | {_default(default)} | {_cell(desc)} |")
    if rows:
        out += ["| key | type | default | what it means |", "|---|---|---|---|", *rows, ""]
    for sub, sub_path in nested:
        out += _section(sub, sub_path, level + 1)
    return out


def _anchor(path: str) -> str:
    """The id MkDocs' toc gives a heading `path` (code span, lower case, dots dropped)."""
    return re.sub(r"[^\w\- ]", "", path).strip().lower().replace(" ", "-")


def settings_page() -> str:
    from redistill.config import Params

    lines = [
        "# Settings reference",
        "",
        "Generated from the settings models in `redistill.config` when the site is built. `params.yaml` is the",
        "single source of settings, one section per stage; each section is read into one typed model (a pydantic",
        "dataclass with a description per field), and the distillation methods build their configs from the same",
        "models, so a default is written once. An unknown or misspelt key is an error naming it with its section",
        "path, the closest valid key and the valid ones; so is a key given twice; a value of the wrong type or",
        "range names the key, the value and what is allowed.",
        "",
        "Defaults below are the code's; a workspace's `params.yaml` overrides them, and a DVC experiment can",
        "override keys (`dvc exp run -S distill.method=consistency`).",
        "",
    ]
    for name, ann, _default_value, desc in _fields(Params):
        if dataclasses.is_dataclass(ann):
            lines += _section(ann, name, 2)
        else:
            lines += [f"## `{name}`", "", f"{_cell(_type_name(ann))}: {_cell(desc)}", ""]
    return "\n".join(lines).rstrip() + "\n"
