"""The library layer runs on a bare GPU machine: importing it pulls in neither prefect nor great_expectations."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import redistill


def test_library_imports_neither_prefect_nor_gx():
    modules = [
        m.name for m in pkgutil.walk_packages(redistill.__path__, "redistill.") if not m.name.endswith("__main__")
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'great_expectations'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redistill.cli" in modules and "redistill.evaluation.suite" in modules
    assert r.stdout.strip() == "", f"library modules imported {r.stdout.strip()}"


def test_flows_and_tasks_install_namespaced():
    import importlib.util

    assert importlib.util.find_spec("redistill.flows") is not None
    assert importlib.util.find_spec("redistill.tasks") is not None
    # nothing bare named `tasks` or `flows` comes from the installed project
    for bare in ("tasks", "flows"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or "site-packages" not in (spec.origin or ""), spec


def test_every_library_subpackage_is_in_the_wheel():
    """An editable install finds any subpackage; a wheel only those listed in pyproject.toml."""
    from pathlib import Path

    import tomllib

    root = Path(redistill.__file__).parent
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "redistill." + ".".join(p.parent.relative_to(root).parts)
        for p in root.rglob("__init__.py")
        if p.parent != root and "__pycache__" not in p.parts
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_the_cli_only_parses_calls_and_prints():
    """No file under redistill/cli/ imports mlflow, prefect or redistill.tasks (inside functions too): the library
    and the flows do that work; and each file reads in one sitting (at most 250 lines)."""
    import ast
    from pathlib import Path

    banned = ("mlflow", "prefect", "redistill.tasks")
    files = sorted((Path(redistill.__file__).parent / "cli").glob("*.py"))
    assert len(files) > 1
    found, long = {}, {}
    for f in files:
        text = f.read_text()
        if len(text.splitlines()) > 250:
            long[f.name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if any(name == b or name.startswith(b + ".") for b in banned):
                    found.setdefault(f.name, []).append(name)
    assert not found, f"redistill/cli/ imports what belongs to the library or the flows: {found}"
    assert not long, f"redistill/cli/ files over 250 lines: {long}"


# Flows only wire: they import tasks, other flows, the settings and these pure policy modules (decisions that take
# data and return a decision). `redistill.evaluation.sampling` is there for `sample_store`, the samples folder's path.
FLOW_ALLOWED = (
    "redistill.tasks",
    "redistill.flows",
    "redistill.config",
    "redistill.watch.policy",
    "redistill.evaluation.sampling",
)


def _imported(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_flows_import_only_tasks_settings_and_policy_and_tasks_no_flows():
    from pathlib import Path

    repo = Path(redistill.__file__).parent.parent
    bad = {
        f"{f.name}: {m}"
        for f in (repo / "flows").glob("*.py")
        for m in _imported(f)
        if m.split(".")[0] == "redistill" and not any(m == a or m.startswith(a + ".") for a in FLOW_ALLOWED)
    }
    bad |= {
        f"{f.name}: {m}"
        for f in (repo / "tasks").glob("*.py")
        for m in _imported(f)
        if m == "redistill.flows" or m.startswith("redistill.flows.")
    }
    assert not bad, f"flows import only tasks, settings and pure policy; tasks never import flows: {sorted(bad)}"


# the library's folders from the ground up (redistill/__init__.py): each imports only folders before it
ORDER = [
    "config",
    "core",
    "data",
    "models",
    "evaluation",
    "teachers",
    "methods",
    "drift",
    "registry",
    "cycle",
    "watch",
    "ops",
    "cli",
]


def _folder_imports(path) -> set[str]:
    """The library folders a file imports, at any depth (function-level imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + (
                [f"{node.module}.{a.name}" for a in node.names] if node.module == "redistill" else []
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "redistill" and len(parts) > 1 and parts[1] in ORDER:
                found.add(parts[1])
    return found


def test_every_library_import_points_down():
    from pathlib import Path

    root = Path(redistill.__file__).parent
    folders = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(ORDER), f"place {sorted(folders - set(ORDER))} in ORDER (and redistill/__init__.py)"
    up = [
        f"{f.relative_to(root.parent)} imports redistill.{d}"
        for folder in ORDER
        for f in sorted((root / folder).glob("*.py"))
        for d in sorted(_folder_imports(f))
        if ORDER.index(d) > ORDER.index(folder)
    ]
    assert not up, up


def test_no_library_file_is_over_400_lines():
    from pathlib import Path

    root = Path(redistill.__file__).parent
    files = [*root.rglob("*.py"), *(root.parent / "tasks").glob("*.py"), *(root.parent / "flows").glob("*.py")]
    long = {str(f.relative_to(root.parent)): n for f in files if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"split these where their jobs split: {long}"
