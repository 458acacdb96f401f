"""The watch state, typed: what the watch has seen and decided, kept in `<workspace>/runs/watch/state.json`.

The file's format is `redistill.core.watch_state`'s (plain JSON, unchanged); `WatchState.from_dict` and `to_dict`
convert both ways, keeping keys this version does not know.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from redistill.core.watch_state import STATE_VERSION, load_state, save_state

HISTORY_KEPT = 200  # lines of history the state keeps


@dataclass
class Episode:
    """A drift episode: opened by a drifted batch, closed by `drift.clear_batches` clean ones in a row."""

    id: str  # the batch that opened it
    opened_at: float
    batches: list[str]  # the drifted batches it absorbed, the opener first
    clean_streak: int = 0
    deferred: bool = False  # opened inside the cooldown: acts once the cooldown is over
    action: str | None = None  # what it did: "champion still fit", "re-distilled: <decision>", "stopped: <why>"

    @classmethod
    def from_dict(cls, d: dict) -> Episode:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class WatchState:
    """The watch's memory. `teachers` and `batches` map a folder name to the record of how it was handled (its
    `signature`, so an unchanged folder is not looked at again, its `status` or drift `action`, and why)."""

    teachers: dict[str, dict] = field(default_factory=dict)
    batches: dict[str, dict] = field(default_factory=dict)
    registry_teachers: dict[str, str] = field(default_factory=dict)  # registered teacher model -> version handled
    episode: Episode | None = None
    last_redistill_at: float | None = None
    current_teacher: str | None = None  # the newest teacher accepted: cycles use it by default
    current_data: str | None = None  # the representative set the last re-distillation grew
    history: list[dict] = field(default_factory=list)
    version: int = STATE_VERSION
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as they were

    @classmethod
    def from_dict(cls, d: dict) -> WatchState:
        known = {f.name for f in fields(cls)} - {"extra"}
        ep = d.get("episode")
        return cls(
            teachers=dict(d.get("teachers") or {}),
            batches=dict(d.get("batches") or {}),
            registry_teachers=dict(d.get("registry_teachers") or {}),
            episode=Episode.from_dict(ep) if ep else None,
            last_redistill_at=d.get("last_redistill_at"),
            current_teacher=d.get("current_teacher"),
            current_data=d.get("current_data"),
            history=list(d.get("history") or []),
            version=d.get("version", STATE_VERSION),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def of(cls, state: WatchState | dict) -> WatchState:
        """`state` typed (the plain dict that `redistill.core.watch_state.load_state` reads is converted)."""
        return state if isinstance(state, WatchState) else cls.from_dict(state)

    @classmethod
    def load(cls, root: Path) -> WatchState:
        """The state of the workspace `root`; a damaged file raises ValueError saying what to do."""
        return cls.from_dict(load_state(root))

    def save(self, root: Path) -> None:
        save_state(root, self.to_dict())

    def to_dict(self) -> dict:
        return {
            **self.extra,
            "version": self.version,
            "teachers": self.teachers,
            "batches": self.batches,
            "registry_teachers": self.registry_teachers,
            "episode": self.episode.to_dict() if self.episode else None,
            "last_redistill_at": self.last_redistill_at,
            "current_teacher": self.current_teacher,
            "current_data": self.current_data,
            "history": self.history,
        }

    def note(self, event: str, at: float | None = None, **details) -> None:
        """Append one line to the history (the last HISTORY_KEPT are kept)."""
        line = {"at": time.time() if at is None else at, "event": event, **details}
        self.history = self.history[-(HISTORY_KEPT - 1) :] + [line]
