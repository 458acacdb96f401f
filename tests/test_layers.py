"""The library layer runs on a bare GPU machine: importing it pulls in neither prefect nor great_expectations."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import redistill


def test_library_imports_neither_prefect_nor_gx():
    modules = [f"redistill.{m.name}" for m in pkgutil.iter_modules(redistill.__path__) if m.name not in ("__main__",)]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'great_expectations'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redistill.cli" in modules and "redistill.metrics" in modules
    assert r.stdout.strip() == "", f"library modules imported {r.stdout.strip()}"


def test_flows_and_tasks_install_namespaced():
    import importlib.util

    assert importlib.util.find_spec("redistill.flows") is not None
    assert importlib.util.find_spec("redistill.tasks") is not None
    # nothing bare named `tasks` or `flows` comes from the installed project
    for bare in ("tasks", "flows"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or "site-packages" not in (spec.origin or ""), spec
