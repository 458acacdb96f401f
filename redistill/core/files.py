"""Checks on files that need neither torch nor diffusers: shared by the watch's cheap scan and the
teacher's folder check (so `redistill watch` with nothing new stays fast, and every stage sees one rule)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

PARTIAL_SUFFIXES = (".tmp", ".part", ".incomplete", ".lock", ".partial")  # downloads still being written


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not complete (shorter or longer than its header says), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size, 100_000_000):
                return (
                    f"{path.name} declares a {n}-byte header but the file is {size} bytes: truncated or not safetensors"
                )
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} has an unreadable safetensors header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + n + end
    if size != expected:
        return f"{path.name} is {size} bytes but its header describes {expected}: the file is truncated"
    return None


def copy_folder(src: Path, out: Path) -> Path:
    """Copy the folder `src` to `out` whole or not at all: written beside `out`, then renamed, so a watcher never sees
    half of it. Files keep their modification times (a finished folder landed this way is as settled as its source)."""
    import os
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(src, tmp / "x", copy_function=shutil.copy2)
        shutil.copystat(src, tmp / "x")
        os.replace(tmp / "x", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def swap_in(staged: Path, out: Path) -> None:
    """Replace the folder `out` by the finished folder `staged` beside it: two renames, so `out` is always either the
    old folder whole or the new one whole; the old one is removed afterwards."""
    import os
    import shutil

    old = out.with_name(out.name + f".old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
