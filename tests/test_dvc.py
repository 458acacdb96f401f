"""`dvc repro` of the prepare stage in a temporary copy of the repository, with the real dvc command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

from redistill.data import dir_md5


def _copy_tracked_repo(dst: Path) -> None:
    """Copy what a clone would hold (tracked + unignored files) into a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def test_dvc_repro_prepare_rebuilds_the_locked_data(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_tracked_repo(repo)
    assert not (repo / "data" / "reference").exists()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    r = subprocess.run([*dvc, "repro", "prepare"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["prepare"]["outs"]}
    for path, md5 in outs.items():
        assert dir_md5(repo / path) == md5  # our md5 helper agrees with DVC's
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())
    # the stage is deterministic: a rebuild in a fresh copy gives the committed hashes
    assert outs == {o["path"]: o["md5"] for o in committed["stages"]["prepare"]["outs"]}
    status = subprocess.run([*dvc, "status", "prepare"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "", status.stdout


# the entry modules of each stage's command; the closure of what they import must be in the stage's deps.
# redistill/cli.py (dispatch) and redistill/config.py (parsing params.yaml, whose keys each stage lists)
# are left out on purpose: listing them would re-run the 30-minute teacher stage on any CLI change.
STAGE_ENTRIES = {
    "prepare": ["redistill.data"],
    "features": ["redistill.features", "redistill.encoder"],
    "teacher": ["redistill.teacher_train"],
    "finetune": ["redistill.teacher_train"],
    "evaluate": ["redistill.metrics", "redistill.feature_spaces"],
    "validate": ["redistill.validation", "redistill.tasks.validate"],
    "distill": ["redistill.methods"],
    "evaluate_student": ["redistill.metrics", "redistill.feature_spaces"],
    "drift": ["redistill.drift", "redistill.features"],
}
NOT_DEPS = {"redistill/cli.py", "redistill/config.py", "redistill/__init__.py", "tasks/__init__.py"}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "redistill":
        return None
    base = {"tasks": REPO / "tasks", "flows": REPO / "flows"}.get(parts[1] if len(parts) > 1 else "", None)
    path = (base.joinpath(*parts[2:]) if base is not None else REPO.joinpath(*parts))
    for cand in (path.with_suffix(".py"), path / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _closure(entries: list[str]) -> set[str]:
    """Repository files a stage's code imports, transitively (function-level imports included)."""
    import ast

    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        f = _module_file(name)
        if f is None or str(f) in seen:
            continue
        seen.add(str(f))
        if f.name == "__init__.py" and name in entries:  # a package entry: all its modules run (methods/ dispatches)
            todo += [f"{name}.{p.stem}" for p in f.parent.glob("*.py") if p.stem != "__init__"]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return {str(Path(s).relative_to(REPO)) for s in seen}


def test_every_stage_lists_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, entries in STAGE_ENTRIES.items():
        deps = [str(d) for d in stages[stage].get("deps", [])]
        for f in sorted(_closure(entries) - NOT_DEPS):
            if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps):
                missing.setdefault(stage, []).append(f)
    assert not missing, f"dvc.yaml stages miss code they run: {missing}"
