"""At most one distillation at a time, across processes.

With a Prefect server (`PREFECT_API_URL`, or any API URL in the active settings) the slot is a Prefect
global concurrency limit, `redistill-distill`, with one slot: every process that talks to that server, on
any machine, queues on it. Without one, the slot is a file lock in the workspace (`runs/locks/`), which
serialises the processes of this machine.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LIMIT_NAME = "redistill-distill"


def server_configured() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def ensure_limit(name: str = LIMIT_NAME, slots: int = 1) -> None:
    """Create the global concurrency limit if the server does not have it (a race to create it is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, slots)
        except ObjectAlreadyExists:
            pass


@contextmanager
def one_at_a_time(root: Path, name: str = LIMIT_NAME) -> Iterator[str]:
    """Hold the single distillation slot; yields which mechanism holds it ("prefect" or "file")."""
    if server_configured():
        from prefect.concurrency.sync import concurrency

        ensure_limit(name)
        with concurrency(name, occupy=1, strict=True):
            yield "prefect"
        return
    from filelock import FileLock

    lock = Path(root) / "runs" / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield "file"
