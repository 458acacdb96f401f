"""Run a resolved cycle from a command: check the Prefect API first, then the cycle under its slot; a stop says why
and whether the Prefect API is away (then the caller exits at once instead of draining logs to it)."""

from __future__ import annotations

from pathlib import Path

from redistill.config import Params
from redistill.flows.cycle import CycleStopped, locked_cycle
from redistill.tasks.concurrency import api_url
from redistill.tasks.cycle import servers_in_trouble, stopped_by_servers


class CycleNotRun(RuntimeError):
    """The cycle was refused or stopped; `prefect_api` is the Prefect API it talked to, None for a refusal."""

    def __init__(self, message: str, prefect_api: str | None = None):
        super().__init__(message)
        self.prefect_api = prefect_api


def run_cycle(inputs: dict, p: Params, root: Path, trigger: str, force: bool) -> dict:
    """The cycle on `inputs` under the one-distillation slot; raises CycleNotRun with the reason it did not finish."""
    prefect = api_url()
    if prefect and (trouble := servers_in_trouble(root, prefect)):  # before any work, like the tracking server
        raise CycleNotRun(
            f"the Prefect API at {prefect} {next(iter(trouble.values()))}; start it (`prefect server "
            "start`) or unset PREFECT_API_URL to let the cycle start a temporary one"
        )
    try:
        return locked_cycle(inputs, p, root, trigger, force)
    except CycleStopped as e:
        raise CycleNotRun(f"cycle stopped: {e}", prefect) from e
    except Exception as e:  # raised outside the cycle's stages (Prefect's own bookkeeping, the slot): a server
        trouble = servers_in_trouble(root, prefect)  # that went away is the usual cause; say which
        if not trouble:
            raise
        run_dir = root / "runs" / "cycles" / inputs["key"]
        reason = stopped_by_servers(trouble, "orchestration", run_dir, f"{type(e).__name__}: {e}")
        raise CycleNotRun(f"cycle stopped: {reason}", prefect) from e
