"""Plain helpers the flows call around the cycle: its inputs, the registry's earlier decision, MLflow's HTTP limits,
what the cycle records when a stage fails.

Not Prefect tasks: each is a cheap read or a process setting, run before a cycle starts (or after its retries
are spent, when Prefect itself may be what failed), so a task run would cost more than it records.
"""

from __future__ import annotations

from pathlib import Path

from redistill.config import Params
from redistill.core.failpoints import failpoint  # noqa: F401  (the cycle's kill points, for the fault tests)
from redistill.cycle.runs import (  # noqa: F401  (the cycle flow's bookkeeping when a stage fails)
    earlier_decision,
    inputs_changed,
    note_unrecorded_failure,
    recover,
    resolve_inputs,
    servers_in_trouble,
    stopped_by_servers,
)
from redistill.registry.client import client, configure_http, find_by_key, tracking_uri
from redistill.registry.model_card import cycle_card  # noqa: F401  (the card the logged model carries)


def bounded_http(p: Params) -> None:
    """MLflow's HTTP retries and timeout from the settings, as the CLI sets them."""
    configure_http(p.registry.http_retries, p.registry.http_timeout_s)


def cycle_inputs(teacher: Path, data: Path, p: Params, root: Path) -> dict:
    """The cycle's inputs and idempotency key (`redistill.cycle.runs.resolve_inputs`); DataError when unusable."""
    return resolve_inputs(teacher, data, p, root)


def registry_version_for(root: Path, name: str, key: str) -> bool:
    """Whether a version is registered for `key` (an error after registering must not mark the run FAILED)."""
    return bool(find_by_key(client(tracking_uri(root)), name, key))


def settle_key(root: Path, p: Params, key: str, force: bool) -> dict | None:
    """With the slot held: undo what a killed cycle of `key` left half done, then its earlier decision (None when
    there is none, or `force`)."""
    c = client(tracking_uri(root))
    recover(
        c, p.registry.student_name, p.registry.experiment, key, root
    )  # the slot is ours: any RUNNING run of this key is dead
    return None if force else earlier_decision(c, p.registry.student_name, key)
