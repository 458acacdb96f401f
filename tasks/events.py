"""Prefect events, so that users can hang automations and notifications on what redistill decides.

| event | when | resource |
|---|---|---|
| `redistill.teacher.new` | the watch found a teacher with a new content hash that passed its checks | `redistill.teacher.<sha256[:16]>` |
| `redistill.teacher.rejected` | a new teacher folder is broken (truncated, NaN weights, wrong channels) | `redistill.teacher.<folder>` |
| `redistill.batch.rejected` | a batch in data/incoming/ cannot be read like the representative set; recorded and skipped | `redistill.batch.<batch>` |
| `redistill.drift.detected` | a batch in data/incoming/ drifted from the representative set | `redistill.batch.<batch>` |
| `redistill.champion.still-fit` | after drift, the champion still passes the gate on the new data | `redistill.model.<name>` |
| `redistill.student.promoted` | a cycle's student passed the gate and became `champion` | `redistill.model.<name>` |
| `redistill.student.rejected` | a cycle's student failed the gate; `champion` did not move | `redistill.model.<name>` |

Events reach a Prefect server (`PREFECT_API_URL`); with the ephemeral server they are accepted and
dropped, so emitting never fails a cycle.
"""

from __future__ import annotations

from prefect import task

EVENTS = (
    "redistill.teacher.new",
    "redistill.teacher.rejected",
    "redistill.batch.rejected",
    "redistill.drift.detected",
    "redistill.champion.still-fit",
    "redistill.student.promoted",
    "redistill.student.rejected",
)


@task(name="emit-event", task_run_name="event {event}")
def emit(event: str, resource_id: str, payload: dict, name: str | None = None) -> str | None:
    """Emit one redistill event; returns its id (None when events are off in this process)."""
    from prefect.events import emit_event

    if event not in EVENTS:
        raise ValueError(f"unknown redistill event {event!r}; known: {', '.join(EVENTS)}")
    resource = {"prefect.resource.id": resource_id}
    if name:
        resource["prefect.resource.name"] = name
    ev = emit_event(event=event, resource=resource, payload=payload)
    return str(ev.id) if ev is not None else None
