"""The gate: does a distilled student pass, on its own and against the current champion?

- **Absolute** thresholds (FID ratio to the teacher, speedup, PSNR to the teacher, recognisability) are
  judged by MLflow's own `validate_evaluation_results` with one `MetricThreshold` per metric, so a value
  exactly at its bound passes as MLflow defines it.
- **Change** thresholds against the champion ("no worse by more than Δ") cannot be written as a
  `MetricThreshold`: its `min_absolute_change` / `min_relative_change` must be positive ("better by at
  least"). They are judged here on the candidate's bootstrap CI, not its point value: the candidate fails
  only if even the favourable end of its CI is worse than the champion by more than Δ, so sampling noise
  alone does not reject a student.
- With no champion, `first_run` decides: `absolute` judges the absolute thresholds alone, `reject` never
  promotes without a champion.

Every check keeps its value, bound and verdict; `reasons()` is the text of the `redistill.gate_reasons` tag.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from redistill.config import GateParams

# metric name in the evaluation JSON → (params field with its bound, greater is better)
ABSOLUTE = {
    "fid_ratio": ("fid_ratio_max", False),
    "speedup_throughput": ("speedup_min", True),
    "psnr_db": ("psnr_min", True),
    "recognisable_share": ("recognisable_min", True),
}


@dataclass
class Check:
    """One threshold: what was compared with what, and the verdict."""

    name: str
    kind: str  # "absolute" or "change"
    value: float | None
    bound: float | None
    op: str  # "<=" or ">="
    passed: bool
    note: str = ""

    def line(self) -> str:
        fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
        verdict = "pass" if self.passed else "FAIL"
        return f"{verdict} {self.kind} {self.name}: {fmt(self.value)} {self.op} {fmt(self.bound)}" + (
            f" ({self.note})" if self.note else "")


@dataclass
class Decision:
    """The gate's verdict with every check behind it."""

    passed: bool
    checks: list[Check] = field(default_factory=list)

    def reasons(self) -> str:
        return "; ".join(c.line() for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def flat_metrics(result: dict) -> dict[str, float]:
    """The gated figures from an evaluation result (`redistill.metrics.evaluate`)."""
    q, f, s = result["quality"], result["fidelity"], result["speed"]
    psnr = f["psnr_db"]
    return {
        "fid_ratio": q["fid_ratio"] if q["fid_ratio"] is not None else math.inf,
        "speedup_throughput": s["speedup_throughput"],
        # identical to the teacher: PSNR is unbounded, which passes any PSNR floor
        "psnr_db": math.inf if psnr is None else psnr,
        "recognisable_share": q.get("recognisable_share", math.nan),
    }


def _mlflow_verdict(name: str, value: float, bound: float, greater_is_better: bool) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult

    threshold = {name: MetricThreshold(threshold=bound, greater_is_better=greater_is_better)}
    try:
        from mlflow import validate_evaluation_results

        validate_evaluation_results(threshold, EvaluationResult(metrics={name: value}, artifacts={}))
        return True
    except MlflowException:  # ModelValidationFailedException is one
        return False


def judge(candidate: dict, champion: dict | None, p: GateParams) -> Decision:
    """Gate an evaluation result against `p`, and against the champion's result when there is one."""
    checks: list[Check] = []
    metrics = flat_metrics(candidate)
    for name, (param, greater) in ABSOLUTE.items():
        value, bound = metrics[name], getattr(p, param)
        if math.isnan(value):
            checks.append(Check(name, "absolute", None, bound, ">=" if greater else "<=", False, "not measured"))
            continue
        ok = math.isinf(value) and (value > 0) == greater or _mlflow_verdict(name, value, bound, greater)
        checks.append(Check(name, "absolute", value, bound, ">=" if greater else "<=", ok))

    if champion is None:
        if p.first_run == "reject":
            checks.append(Check("champion", "change", None, None, "exists", False,
                                "no champion yet and gate.first_run is 'reject'"))
        else:
            checks.append(Check("champion", "change", None, None, "exists", True,
                                "no champion yet: absolute thresholds only (gate.first_run = 'absolute')"))
    else:
        cq, bq = candidate["quality"], champion["quality"]
        # favourable end of the candidate's CI against the champion's point value plus Δ
        fid_bound = bq["fid"] * (1.0 + p.fid_change_max)
        checks.append(Check("fid_vs_champion", "change", cq["fid_ci95"][0], fid_bound, "<=",
                            cq["fid_ci95"][0] <= fid_bound,
                            f"candidate FID {cq['fid']:.4g} CI {cq['fid_ci95'][0]:.4g}–{cq['fid_ci95'][1]:.4g}, "
                            f"champion {bq['fid']:.4g} × (1 + {p.fid_change_max})"))
        kid_bound = bq["kid"] + p.kid_change_max
        checks.append(Check("kid_vs_champion", "change", cq["kid_ci95"][0], kid_bound, "<=",
                            cq["kid_ci95"][0] <= kid_bound,
                            f"candidate KID {cq['kid']:.4g}, champion {bq['kid']:.4g} + {p.kid_change_max}"))
    return Decision(all(c.passed for c in checks), checks)
