"""The watch's state file, `<workspace>/runs/watch/state.json`, as plain JSON: read and written atomically.

It sits in core so that what reads it (the watch, the lineage of a registered version) needs nothing above it;
`redistill.watch.state.WatchState` is its typed form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_VERSION = 1


def state_path(root: Path) -> Path:
    """Where the watch keeps its state in the workspace `root`."""
    return Path(root) / "runs" / "watch" / "state.json"


def empty_state() -> dict:
    """The state of a watch that has seen nothing yet."""
    return {
        "version": STATE_VERSION,
        "teachers": {},
        "batches": {},
        "registry_teachers": {},
        "episode": None,
        "last_redistill_at": None,
        "current_teacher": None,
        "current_data": None,
        "history": [],
    }


def load_state(root: Path) -> dict:
    """The watch state; a missing file is an empty state, a damaged one an error that says what to do."""
    f = state_path(root)
    if not f.is_file():
        return empty_state()
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"the watch state {f} is damaged ({e}); move it aside and run `redistill watch --once` "
            "again (everything is re-checked; the registry deduplicates what was already done)"
        ) from e
    return {**empty_state(), **state}


def save_state(root: Path, state: dict) -> None:
    """Write the state whole (a temporary file renamed over the old one), so a reader never sees half of it."""
    f = state_path(root)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, f)


def registered_teacher(root: Path, sha256: str | None) -> str | None:
    """The registered model version (`model vN`) the watch fetched the teacher of `sha256` from, or None."""
    try:
        teachers = load_state(root)["teachers"].values()
    except ValueError:  # a damaged state: the lineage is shown without this detail
        return None
    found = None
    for t in teachers:
        if t.get("sha256") == sha256 and t.get("registry"):
            found = t["registry"]
    return found
