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
