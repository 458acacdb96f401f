"""Lineage: what made a student. The code version and the cycle's idempotency key (DESIGN.md, "One cycle")."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def code_version(repo: Path | None = None) -> dict:
    """The git commit of the code and whether the tree was dirty; the package version outside git."""
    here = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"git_commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"git_commit": f"package-{version('redistill')}", "dirty": False}
        except PackageNotFoundError:
            return {"git_commit": "unknown", "dirty": True}


def idempotency_key(teacher_sha256: str, data_md5: str, params_sha256: str, code: str) -> str:
    """The cycle's key: same teacher bytes, data, distill/evaluate/gate settings and code ⇒ same key."""
    return hashlib.sha256("\n".join([teacher_sha256, data_md5, params_sha256, code]).encode()).hexdigest()[:24]


def dvc_add(root: Path, path: Path, timeout: float = 300) -> dict:
    """Version `path` with `dvc add` when the workspace is a DVC repository; returns what was recorded.

    The md5 is DVC's own (from the written `.dvc` file), the same hash as `redistill.data.dir_md5`. Outside
    a DVC repository nothing is run and `{"dvc": False}` says so; a failing `dvc add` raises with its output.
    """
    import os
    import shutil
    import sys

    import yaml

    root, path = Path(root), Path(path)
    if not (root / ".dvc").is_dir():
        return {"dvc": False, "reason": f"{root} is not a DVC repository (no .dvc/); run `dvc init` to version data"}
    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([exe, "add", "-q", str(path.relative_to(root))], cwd=root, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"`dvc add {path.relative_to(root)}` failed: {(r.stderr or r.stdout).strip()[:500]}")
    dvc_file = path.with_name(path.name + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return {"dvc": True, "dvc_file": str(dvc_file.relative_to(root)), "md5": out["md5"], "nfiles": out.get("nfiles")}
