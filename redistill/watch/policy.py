"""What changed since the last look: new teacher folders and new incoming batches, found cheaply.

`scan` only lists folders and stats files, so "nothing changed" costs milliseconds: no model is loaded, no
Prefect server starts, no file is hashed. Its findings go to the watch flow (`flows/watch.py`), which does
the expensive checks (teacher integrity, drift tests) and records the outcome in the watch state.

A teacher folder is taken only when it is complete and stable:
- nothing in it changed for `watch.settle_seconds`, and no partial-download file (`*.tmp`, `*.part`,
  `*.incomplete`, `*.lock`) is in it;
- it has a `model_index.json`, and every `.safetensors` file is as long as its own header says
  (a truncated file is caught here, before anything loads it).
A folder that is still settling is "pending" and looked at again next time; a settled but broken one is
"bad", recorded with its reason, and skipped until its contents change.

The state lives in `<workspace>/runs/watch/state.json`, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from redistill.core.files import PARTIAL_SUFFIXES, safetensors_problem  # noqa: F401  (shared with teacher.py)
STATE_VERSION = 1


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
# State
# ---------------------------------------------------------------------------------------------------


def state_path(root: Path) -> Path:
    return Path(root) / "runs" / "watch" / "state.json"


def empty_state() -> dict:
    return {"version": STATE_VERSION, "teachers": {}, "batches": {}, "registry_teachers": {},
            "episode": None, "last_redistill_at": None, "current_teacher": None, "current_data": None,
            "history": []}


def load_state(root: Path) -> dict:
    """The watch state; a missing file is an empty state, a damaged one an error that says what to do."""
    f = state_path(root)
    if not f.is_file():
        return empty_state()
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"the watch state {f} is damaged ({e}); move it aside and run `redistill watch --once` "
                         "again (everything is re-checked; the registry deduplicates what was already done)") from e
    return {**empty_state(), **state}


def save_state(root: Path, state: dict) -> None:
    f = state_path(root)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, f)


def note(state: dict, event: str, **details) -> None:
    """Append one line to the state's history (the last 200 are kept)."""
    state["history"] = (state.get("history") or [])[-199:] + [{"at": time.time(), "event": event, **details}]


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


def scan(root: Path, settle_seconds: float, state: dict | None = None, now: float | None = None,
         look: tuple[str, ...] = LOOKS) -> Scan:
    """Teacher folders under data/teachers/ and batches under data/incoming/ that changed since `state` (only the
    teachers, or only the batches, with `look`)."""
    from redistill.data.images import safe_name

    root = Path(root)
    state = load_state(root) if state is None else state
    now = time.time() if now is None else now
    out = Scan()
    for kind, what, parent, known in (("teacher", "teachers", root / "data" / "teachers", state["teachers"]),
                                      ("batch", "batches", root / "data" / "incoming", state["batches"])):
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


def current_teacher(root: Path, default_name: str, state: dict | None = None) -> Path:
    """The newest teacher the watch accepted, else data/teachers/<teacher.name>."""
    state = load_state(root) if state is None else state
    cur = state.get("current_teacher")
    if cur and (Path(cur) / "model_index.json").is_file():
        return Path(cur)
    return Path(root) / "data" / "teachers" / default_name


def current_data(root: Path) -> Path:
    """The representative set: data/representative once drift has grown it, else data/reference."""
    rep = Path(root) / "data" / "representative"
    return rep if (rep.is_dir() and any(rep.glob("*.png"))) else Path(root) / "data" / "reference"


def grown_from(root: Path, base: Path, batch: Path, batch_name: str) -> dict:
    """The record a representative set grown from `base` by `batch` carries (`grown_from.json`): the reference
    it grew from, by md5 (that of `base` when `base` is the reference, else the one `base` grew from), and every
    batch accepted into it since, with the file prefix its images have in the set. Validation reads it."""
    from redistill.data.images import IMAGE_SUFFIXES, DataError, dir_md5, safe_name
    from redistill.data.validation import GROWN_FROM, read_grown_from

    root, base = Path(root), Path(base)
    before = read_grown_from(base)
    if before is None and base.resolve() != (root / "data" / "reference").resolve():
        raise DataError(f"{base} has no {GROWN_FROM}: an older redistill grew it, so what it grew from is unknown and "
                        f"it cannot be validated honestly. Remove it and {base.name}.dvc; the watch then grows the "
                        "representative set from data/reference again")
    before = before or {"reference": {"path": "data/reference", "md5": dir_md5(base)}, "batches": []}
    entry = {"name": safe_name(batch_name), "prefix": safe_name(batch_name) + "__", "md5": dir_md5(batch),
             "images": sum(1 for p in Path(batch).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)}
    return {"reference": before["reference"], "batches": before["batches"] + [entry],
            "note": "written by `redistill watch` when it grew this set: validation uses the bands of this reference "
                    "widened by these batches' own bands, and refuses when the reference on disk has another md5"}


# ---------------------------------------------------------------------------------------------------
# Drift episodes: hysteresis and cooldown
# ---------------------------------------------------------------------------------------------------


def on_batch(state: dict, batch: str, drifted: bool, now: float, clear_batches: int, cooldown_hours: float) -> str:
    """Update the drift episode for one tested batch; returns what to do about it.

    - "none": no drift (a clean batch; `clear_batches` clean batches in a row close an open episode);
    - "act": a new episode opened: re-check the champion, re-distil if it is no longer fit;
    - "absorbed": drift inside an open episode, which has already acted (one episode, one re-distillation);
    - "deferred": a new episode inside the cooldown after the last re-distillation; it acts once the
      cooldown has passed (`due_episode`).
    """
    ep = state.get("episode")
    if not drifted:
        if ep:
            ep["clean_streak"] = ep.get("clean_streak", 0) + 1
            if ep["clean_streak"] >= clear_batches:
                note(state, "episode-closed", episode=ep["id"], batches=ep["batches"])
                state["episode"] = None
        return "none"
    if ep:
        ep["clean_streak"] = 0
        ep["batches"].append(batch)
        return "absorbed"
    state["episode"] = {"id": batch, "opened_at": now, "batches": [batch], "clean_streak": 0,
                        "deferred": False, "action": None}
    note(state, "episode-opened", episode=batch)
    last = state.get("last_redistill_at")
    if last is not None and now - float(last) < cooldown_hours * 3600:
        state["episode"]["deferred"] = True
        return "deferred"
    return "act"


def due_episode(state: dict, now: float, cooldown_hours: float) -> dict | None:
    """A deferred episode whose cooldown is over, or None."""
    ep = state.get("episode")
    last = state.get("last_redistill_at")
    if ep and ep.get("deferred") and (last is None or now - float(last) >= cooldown_hours * 3600):
        return ep
    return None
