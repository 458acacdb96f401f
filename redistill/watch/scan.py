"""What changed since the last look: new teacher folders and new incoming batches, found cheaply.

`scan` only lists folders and stats files, so "nothing changed" costs milliseconds: no model is loaded, no
Prefect server starts, no file is hashed. Its findings go to the watch flow (`flows/watch.py`), which does
the expensive checks (teacher integrity, drift tests) and executes what the planner decides.

A teacher folder is taken only when it is complete and stable:
- nothing in it changed for `watch.settle_seconds`, and no partial-download file (`*.tmp`, `*.part`,
  `*.incomplete`, `*.lock`) is in it;
- it has a `model_index.json`, and every `.safetensors` file is as long as its own header says
  (a truncated file is caught here, before anything loads it).
A folder that is still settling is "pending" and looked at again next time; a settled but broken one is
"bad", recorded with its reason, and skipped until its contents change (`redistill.watch.policy.plan` decides
what to do with each finding).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from redistill.core.files import PARTIAL_SUFFIXES, safetensors_problem
from redistill.watch.state import WatchState


@dataclass
class Finding:
    """One thing the scan found: a teacher or an incoming batch, and how ready it is."""

    kind: str  # "teacher" or "batch"
    name: str  # folder name (sanitised)
    path: str
    status: str  # "ready", "pending" or "bad"
    signature: str
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Scan:
    """The result of one look: what is ready to act on, what is still settling, what is broken."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def ready(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "ready"]

    @property
    def actionable(self) -> list[Finding]:
        """Ready or newly bad: the watch flow must handle (or record) these."""
        return [f for f in self.findings if f.status in ("ready", "bad")]

    @property
    def pending(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "pending"]


# ---------------------------------------------------------------------------------------------------
# Folder readiness
# ---------------------------------------------------------------------------------------------------


def signature(folder: Path) -> tuple[str, float]:
    """A cheap fingerprint of a folder (relative path, size, mtime of every file) and its newest mtime."""
    h = hashlib.sha256()
    newest = Path(folder).stat().st_mtime
    for p in sorted(q for q in Path(folder).rglob("*")):
        st = p.stat()
        newest = max(newest, st.st_mtime)
        if p.is_file():
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32], newest


def folder_readiness(folder: Path, settle_seconds: float, now: float, teacher: bool) -> tuple[str, str, str]:
    """(status, reason, signature) of a teacher or batch folder; status is ready, pending or bad."""
    sig, newest = signature(folder)
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    partial = [p.name for p in files if p.name.endswith(PARTIAL_SUFFIXES) or p.name.startswith(".~")]
    quiet_for = now - newest
    if partial:
        return "pending", f"partial file {partial[0]} present: still being written", sig
    if quiet_for < settle_seconds:
        return "pending", f"last change {quiet_for:.0f} s ago, waiting for {settle_seconds:.0f} s of quiet", sig
    if not files:
        return "pending", "empty folder", sig
    if teacher:
        if not (Path(folder) / "model_index.json").is_file():
            return "bad", "no model_index.json: not a diffusers pipeline folder (save_pretrained layout)", sig
        tensors = [p for p in files if p.suffix == ".safetensors"]
        if not tensors:
            return "bad", "no .safetensors weights (pickle formats are never loaded)", sig
        for p in tensors:
            problem = safetensors_problem(p)
            if problem:
                return "bad", f"{p.relative_to(folder).as_posix()}: {problem}", sig
    return "ready", "", sig


LOOKS = ("teachers", "batches")  # what a look covers: new teacher folders, new incoming batches


def scan(
    root: Path,
    settle_seconds: float,
    state: WatchState | dict | None = None,
    now: float | None = None,
    look: tuple[str, ...] = LOOKS,
) -> Scan:
    """Teacher folders under data/teachers/ and batches under data/incoming/ that changed since `state` (only the
    teachers, or only the batches, with `look`)."""
    from redistill.data.images import safe_name

    root = Path(root)
    state = WatchState.load(root) if state is None else WatchState.of(state)
    now = time.time() if now is None else now
    out = Scan()
    for kind, what, parent, known in (
        ("teacher", "teachers", root / "data" / "teachers", state.teachers),
        ("batch", "batches", root / "data" / "incoming", state.batches),
    ):
        if what not in look or not parent.is_dir():
            continue
        for folder in sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name)):
            name = safe_name(folder.name)  # names from the file system are sanitised before any use
            status, reason, sig = folder_readiness(folder, settle_seconds, now, teacher=kind == "teacher")
            if known.get(name, {}).get("signature") == sig:
                continue  # already handled (or already recorded as bad) with exactly these contents
            out.findings.append(Finding(kind, name, str(folder), status, sig, reason))
    return out


# ---------------------------------------------------------------------------------------------------
# What a cycle uses by default
# ---------------------------------------------------------------------------------------------------


def current_teacher(root: Path, default_name: str, state: WatchState | dict | None = None) -> Path:
    """The newest teacher the watch accepted, else data/teachers/<teacher.name>."""
    cur = (WatchState.load(root) if state is None else WatchState.of(state)).current_teacher
    if cur and (Path(cur) / "model_index.json").is_file():
        return Path(cur)
    return Path(root) / "data" / "teachers" / default_name


def current_data(root: Path) -> Path:
    """The representative set: data/representative once drift has grown it, else data/reference."""
    rep = Path(root) / "data" / "representative"
    return rep if (rep.is_dir() and any(rep.glob("*.png"))) else Path(root) / "data" / "reference"
