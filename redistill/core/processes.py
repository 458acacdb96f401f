"""A child process that dies with its parent, even when the parent is killed with SIGKILL (Linux's PR_SET_PDEATHSIG).

Elsewhere these are no-ops, and the parent's own cleanup is what remains."""

from __future__ import annotations

import signal
import sys

_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent_hook():
    """A `preexec_fn` asking the kernel to SIGTERM the child when its parent dies (Linux; else None).

    libc is looked up here, in the parent: the hook runs between fork and exec, where it must not import."""
    prctl = _prctl()
    if prctl is None:
        return None

    def hook():
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return hook


def die_with_parent() -> bool:
    """Ask the kernel to SIGTERM this process when its parent dies; True where that is possible (Linux)."""
    prctl = _prctl()
    if prctl is None:
        return False
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    return True
