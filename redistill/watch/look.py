"""The watch's cheap look, before any flow: whether anything needs the watch flow at all (new or changed folders,
a drift episode due, a registered teacher not handled yet), and what is pending; no model, no Prefect server."""

from __future__ import annotations

import time
from pathlib import Path

from redistill.core.watch_state import load_state
from redistill.watch.policy import due_episode
from redistill.watch.scan import LOOKS, scan


class LookFailed(RuntimeError):
    """The watch cannot look: its state file is damaged, or the registry cannot be read."""


def registered_teacher_changed(c, model: str, which: str, state: dict) -> bool:
    """Whether `model`@`which` (watch.teacher_model@teacher_alias) points at a version the watch has not handled
    yet; a registry that cannot be read raises LookFailed."""
    from redistill.registry.client import alias

    try:
        mv = alias(c, model, which)
    except Exception as e:  # an unreachable tracking server: say so, do not guess
        raise LookFailed(f"cannot read the registered teacher {model}@{which}: {e}") from e
    return mv is not None and str(mv.version) != state["registry_teachers"].get(model)


def quick_look(root: Path, p, look: tuple[str, ...] | None = None) -> dict | None:
    """The watch's result when nothing needs the flow (`changed` False, the pending folders and the drift episode),
    else None. `look`: only "teachers" or only "batches"; default both. A damaged state raises LookFailed."""
    look = look or LOOKS
    try:
        state = load_state(root)
    except ValueError as e:
        raise LookFailed(str(e)) from e
    found = scan(root, p.watch.settle_seconds, state, look=look)
    due = due_episode(state, time.time(), p.drift.cooldown_hours) if "batches" in look else None
    registered = False
    if "teachers" in look and p.watch.teacher_model:
        from redistill.registry.queries import registry_client

        registered = registered_teacher_changed(
            registry_client(root), p.watch.teacher_model, p.watch.teacher_alias, state
        )
    if found.actionable or due is not None or registered:
        return None
    return {"changed": False, "pending": [f.to_dict() for f in found.pending], "episode": state.get("episode")}


def pending_triggers(root: Path, p) -> tuple[list[dict], dict]:
    """(what the watch would look at next, its state); a damaged state is listed as a finding, with an empty state."""
    try:
        state = load_state(root)
        return [f.to_dict() for f in scan(root, p.watch.settle_seconds, state).findings], state
    except ValueError as e:
        return [{"kind": "state", "name": "watch", "status": "bad", "reason": str(e)}], {}
