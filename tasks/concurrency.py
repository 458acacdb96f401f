"""At most one distillation at a time, across processes.

With a Prefect server (`PREFECT_API_URL`, or any API URL in the active settings) the slot is a Prefect
global concurrency limit, `redistill-distill`, with one slot: every process that talks to that server, on
any machine, queues on it. Without one, the slot is a file lock in the workspace (`runs/locks/`), which
serialises the processes of this machine.

A Prefect slot is held with a lease (LEASE_S), so a holder that is killed frees it within a minute. But a
Prefect server keeps leases in memory by default: when it restarts, the held slot stays counted with no lease
to expire, and every later cycle would wait forever. So the holder also beats a heartbeat into a Prefect
variable (kept in the server's database), and a waiter that sees the slot full while the heartbeat has not
moved for STALE_S frees the slot and says so.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("redistill")

LIMIT_NAME = "redistill-distill"
LEASE_S = 60.0  # seconds a slot outlives a holder that stopped renewing it
BEAT_S = 10.0  # the holder's heartbeat (a Prefect variable), which outlives a server restart
STALE_S = 60.0  # a heartbeat that has not moved for this long (as a waiter sees it) is a dead holder's


def api_url() -> str | None:
    """The Prefect API this process talks to (PREFECT_API_URL or the active profile), or None (ephemeral)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def server_configured() -> bool:
    return api_url() is not None


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
        with _prefect_slot(name):
            yield "prefect"
        return
    from filelock import FileLock

    lock = Path(root) / "runs" / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield "file"


def _holder_var(name: str) -> str:
    return name.replace("-", "_") + "_holder"


@contextmanager
def _prefect_slot(name: str) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    last_seen, unchanged_since = object(), time.monotonic()
    while True:
        # a short lease: a holder that was killed frees the slot within LEASE_S; a failed renewal (the server
        # blinked) does not stop a distillation that is under way
        held = concurrency(name, occupy=1, strict=True, timeout_seconds=BEAT_S * 2, lease_duration=LEASE_S,
                           raise_on_lease_renewal_failure=False)
        try:
            held.__enter__()
            break
        except TimeoutError:
            beat = _read_beat(name)
            if beat != last_seen:
                last_seen, unchanged_since = beat, time.monotonic()
            elif time.monotonic() - unchanged_since >= STALE_S:
                _free_orphaned_slot(name, beat)
                last_seen, unchanged_since = object(), time.monotonic()
    stop = threading.Event()
    _write_beat(name, 0)
    beater = threading.Thread(target=_beat, args=(name, stop), name="redistill-slot-heartbeat", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join(timeout=5)
        try:
            held.__exit__(None, None, None)
            from prefect.variables import Variable

            Variable.unset(_holder_var(name))
        except Exception as e:  # the server is away: the lease (or a waiter, via the heartbeat) frees the slot
            log.warning(f"could not release the Prefect concurrency slot {name} ({type(e).__name__}); it frees "
                        f"itself within {STALE_S + LEASE_S:.0f} s")


def _beat(name: str, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(BEAT_S):
        n += 1
        try:
            _write_beat(name, n)
        except Exception:  # the server is away for now; the next beat tries again
            pass


def _write_beat(name: str, n: int) -> None:
    from prefect.variables import Variable

    Variable.set(_holder_var(name), {"host": socket.gethostname(), "pid": os.getpid(), "beat": n}, overwrite=True)


def _read_beat(name: str):
    from prefect.variables import Variable

    try:
        return Variable.get(_holder_var(name))
    except Exception:
        return None


def _free_orphaned_slot(name: str, beat) -> None:
    """Free the slot of a holder whose heartbeat stopped (killed while the server was away, or the server
    restarted and lost the leases)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots < limit.limit:
            return
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    log.warning(f"freed the Prefect concurrency slot {name}: its holder ({beat or 'unknown'}) stopped beating for "
                f"{STALE_S:.0f} s, so it died or the server restarted and lost its lease")
