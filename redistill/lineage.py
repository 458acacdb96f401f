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
