"""Gate the student and publish the decision, with its metrics table, as a Prefect markdown artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from redistill.config import GateParams
from redistill.evaluation.gate import judge


@task(name="gate-student")
def gate_student(result: dict, champion: dict | None, p: GateParams, method: str | None = None) -> dict:
    """Judge the evaluation against the thresholds (the fidelity bound of `method`'s family) and the champion."""
    decision = judge(result, champion, p, method)
    rows = "\n".join(
        f"| {c.kind} | {c.name} | {'n/a' if c.value is None else f'{c.value:.4g}'} | {c.op} "
        f"{'' if c.bound is None else f'{c.bound:.4g}'} | {'pass' if c.passed else '**FAIL**'} |"
        for c in decision.checks
    )
    # a check refused without a value (figures in other feature spaces, a missing measurement) is explained
    # only by its note, which the table has no room for
    refusals = "".join(f"- **{c.name}**: {c.note}\n" for c in decision.failed() if c.value is None and c.note)
    refusals += "\n" if refusals else ""
    q, s = result["quality"], result["speed"]
    create_markdown_artifact(
        key="redistill-decision",
        description="redistill gate decision",
        markdown=(
            f"# Student {'promoted' if decision.passed else 'rejected'}\n\n"
            f"| kind | check | value | bound | verdict |\n|---|---|---|---|---|\n{rows}\n\n"
            f"{refusals}"
            f"| | teacher@{result['reference']['steps']} | student@{result['steps']} |\n|---|---|---|\n"
            f"| FID | {q['reference_fid']:.4g} | {q['fid']:.4g} [{q['fid_ci95'][0]:.3g}, {q['fid_ci95'][1]:.3g}] |\n"
            + "".join(
                f"| FID gap [{n}] (floors) | floor {sq['fid_floor']:.4g} | {sq['fid_gap']:+.4g} = "
                f"{sq['fid_gap_floors']:.3g} ± {sq['fid_gap_halfwidth_floors']:.2g} |\n"
                for n, sq in q.get("spaces", {}).items()
                if sq.get("fid_gap_floors") is not None
            )
            + f"| KID | {q['reference_kid']:.4g} | {q['kid']:.4g} |\n"
            f"| latency p50 (ms) | {s['reference_latency_ms_p50']:.1f} | {s['latency_ms_p50']:.1f} |\n"
            f"| throughput (img/s) | {s['reference_throughput_img_s']:.1f} | {s['throughput_img_s']:.1f} |\n"
        ),
    )
    return decision.to_dict() | {"reasons": decision.reasons()}
