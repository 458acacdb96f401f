"""Named points where a test can kill the process, to prove that every stage recovers from `kill -9`.

`REDISTILL_KILL_AT=<name>[,<name>…]` makes the process SIGKILL itself on reaching one of those points:
no cleanup, no `finally`, exactly what an out-of-memory kill or a pulled plug does. Unset (always, outside
tests), a failpoint is one dictionary lookup. The points, in the order a cycle reaches them:

  run-opened, validated, distilled, evaluated, version-created, previous-moved, champion-moved

`REDISTILL_PAUSE_AT=<name>` with `REDISTILL_PAUSE_FILE=<path>` makes the process write `<path>` on reaching
that point and wait until the test deletes it (at most 10 minutes): the test can then take a server away
at exactly that stage.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = ("run-opened", "validated", "distilled", "evaluated", "version-created", "previous-moved", "champion-moved")


def failpoint(name: str) -> None:
    """SIGKILL this process if `name` is listed in REDISTILL_KILL_AT."""
    wanted = os.environ.get("REDISTILL_KILL_AT")
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    paused = os.environ.get("REDISTILL_PAUSE_AT")
    if paused and name in paused.split(","):
        flag = Path(os.environ["REDISTILL_PAUSE_FILE"])
        flag.write_text(name)
        deadline = time.monotonic() + 600
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
