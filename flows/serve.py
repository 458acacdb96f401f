"""Serve the two deployments, `nightly` and `watch`, from this process."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import serve as prefect_serve
from prefect.schedules import Cron, Interval

from redistill.config import Params
from redistill.flows.cycle import nightly
from redistill.flows.watch import watch
from redistill.tasks.concurrency import server_configured

DEPLOYMENTS = ["redistill-nightly/nightly", "redistill-watch/watch"]


class AlreadyDeployed(RuntimeError):
    """The deployments exist on the Prefect server for a work pool, where a worker runs them."""


def worker_deployments(names: list[str]) -> list[str]:
    """Those of `names` that exist on the Prefect server with a work pool."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                d = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if d.work_pool_name:
                taken.append(name)
    return taken


def serve(root: Path, p: Params, params: Path | None) -> None:
    """Serve `nightly` (cron watch.nightly_cron) and `watch` (every watch.interval_minutes) until interrupted."""
    parameters = {"workspace_dir": str(root), "params_file": str(params.resolve()) if params else None}
    if server_configured():
        taken = worker_deployments(DEPLOYMENTS)
        if taken:
            raise AlreadyDeployed(
                f"{', '.join(taken)} already exist on this Prefect server for a work pool (from `prefect deploy`), "
                "where a worker runs them. Use one or the other: delete them (`prefect deployment delete NAME`) "
                "to serve from this process, or keep the worker and skip `redistill serve`"
            )
    prefect_serve(
        nightly.to_deployment(
            name="nightly",
            schedule=Cron(p.watch.nightly_cron, timezone=p.watch.timezone),
            parameters=parameters,
            tags=["redistill"],
            description="The nightly re-distillation cycle (trigger=schedule).",
        ),
        watch.to_deployment(
            name="watch",
            schedule=Interval(timedelta(minutes=p.watch.interval_minutes)),
            parameters=parameters,
            tags=["redistill"],
            description="New teachers and drifted batches.",
        ),
    )
