"""At most one distillation at a time, across processes.

The processes of this machine queue on a file lock in the workspace (`runs/locks/`). With a Prefect server
(`PREFECT_API_URL`, or any API URL in the active settings) the holder of that lock also takes the one slot
of a Prefect global concurrency limit, `redistill-distill`, so that every process that talks to that
server, on any machine, queues on it.

The Prefect slot is held with a lease of LEASE_S that the holder renews every BEAT_S, retrying through a
server that blinks, so a holder that is killed frees it within about a minute and a live one never loses it
to a short outage. But a Prefect server keeps leases in memory by default: when it restarts, the held slot
stays counted with no lease to expire, and every later cycle would wait forever. So the holder also beats a
heartbeat into a Prefect variable (kept in the server's database), and a waiter that finds the slot full
while the heartbeat has not moved for STALE_S (longer than any lease could still be alive) frees the slot
and says so.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("redistill")

LIMIT_NAME = "redistill-distill"
LEASE_S = 60.0  # seconds a slot outlives a holder that stopped renewing it (the server's minimum)
BEAT_S = 10.0  # the holder renews its lease and beats its heartbeat (a Prefect variable) this often
STALE_S = 150.0  # a heartbeat still for this long: its holder is dead and no lease of it can be alive
WAIT_S = 2.0  # a waiter asks for the slot again this often


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
    """Hold the single distillation slot; yields which mechanisms hold it ("file" or "file+prefect")."""
    from filelock import FileLock

    lock = Path(root) / "runs" / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if not server_configured():
            yield "file"
            return
        with _prefect_slot(name):
            yield "file+prefect"


@contextmanager
def _prefect_slot(name: str) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    ensure_limit(name)
    last_seen, still_since = object(), time.monotonic()
    while True:
        with get_client(sync_client=True) as client:
            try:
                lease_id = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", LEASE_S).json()[
                    "lease_id"
                ]
                break
            except PrefectHTTPStatusError as e:
                if e.response.status_code != 423:  # 423: every slot is taken
                    raise
        beat = _read_beat(name)
        if beat != last_seen:
            last_seen, still_since = beat, time.monotonic()
        elif time.monotonic() - still_since >= STALE_S:
            _free_orphaned_slot(name, beat)
            last_seen, still_since = object(), time.monotonic()
        time.sleep(WAIT_S)
    stop = threading.Event()
    beater = threading.Thread(target=_beat, args=(name, lease_id, stop), name="redistill-slot-heartbeat", daemon=True)
    try:
        _write_beat(name, 0)
        beater.start()
        yield
    finally:
        stop.set()
        if beater.is_alive():
            beater.join(timeout=5)
        try:
            from prefect.variables import Variable

            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease_id)
            Variable.unset(_holder_var(name))
        except Exception as e:  # the server is away: the lease (or a waiter, via the heartbeat) frees the slot
            log.warning(
                f"could not release the Prefect concurrency slot {name} ({type(e).__name__}); it frees "
                f"itself within {STALE_S:.0f} s"
            )


def _holder_var(name: str) -> str:
    return name.replace("-", "_") + "_holder"


def _beat(name: str, lease_id: str, stop: threading.Event) -> None:
    """Renew the lease and move the heartbeat every BEAT_S until stopped; a server that is away is tried
    again at the next beat (the lease outlives LEASE_S / BEAT_S missed beats)."""
    from prefect.client.orchestration import get_client

    n = 0
    while not stop.wait(BEAT_S):
        n += 1
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id, LEASE_S)
        except Exception:  # away, or restarted without its leases: the heartbeat below keeps the slot ours
            pass
        try:
            _write_beat(name, n)
        except Exception:
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
    restarted and lost the leases), unless the heartbeat moved after all (a new holder took it meanwhile)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    if _read_beat(name) != beat:
        return
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots < limit.limit:
            return
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    log.warning(
        f"freed the Prefect concurrency slot {name}: its holder ({beat or 'unknown'}) stopped beating for "
        f"{STALE_S:.0f} s, so it died or the server restarted and lost its lease"
    )
