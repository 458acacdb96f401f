"""Environment settings a process makes before it loads Prefect."""

from __future__ import annotations

import os


def quiet_prefect() -> None:
    """No analytics from an ephemeral Prefect server or the client, and time for that server to start (set before
    Prefect is imported; a user's own settings win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect waits 20 s for its ephemeral server; on 2 busy cores (several cycles starting at once) it takes longer
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
