"""Environment settings a process makes before it loads Prefect."""

from __future__ import annotations

import os


def quiet_prefect() -> None:
    """No analytics from an ephemeral Prefect server or the client (set before Prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
