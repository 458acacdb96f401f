"""The gate: does a distilled student pass, on its own and against the current champion?

- **Quality, floor-aware**, in every feature space the evaluation measured (`evaluate.features`): the FID
  gap to the teacher (student FID − teacher FID on the same real set and the same noise) in units of the
  real-against-real floor (FID between two random halves of the real set). The student passes when
  `gap ≤ gate.fid_gap_max` floors (one bound per space, calibrated on controls: redistill/calibration.py; a space
  without one reports but does not decide): its samples are as close to the data as the teacher's, give or take a
  fraction of what resampling the data itself moves. A ratio of two FIDs near that floor is mostly noise;
  the gap is not, because what both share (the real sample, the noise) cancels, and its paired-bootstrap
  interval is reported next to it, with whether it lies on one side of the bound (the evaluation draws more
  samples until it does, up to `evaluate.max_samples`).
- **Fidelity per family** (`gate.psnr_min`): PSNR to the teacher on the same noise. Fidelity and trajectory
  methods promise the teacher's noise-to-image map and are held to it; distribution-matching and
  adversarial methods do not promise it, and their bound is 0 (not gated) by default. A student whose sampler
  draws fresh noise between steps (multistep LCM, ancestral samplers; `fidelity.fresh_noise` says which) is
  not a function of its initial noise, so its PSNR is reported and not gated, whatever the family.
- **Speed and recognisability**: throughput speedup and the share of recognisable samples.
- The absolute checks are judged by MLflow's own `validate_evaluation_results` with one `MetricThreshold`
  per metric, so a value exactly at its bound passes as MLflow defines it.
- **Change** thresholds against the champion ("no worse by more than Δ") cannot be written as a
  `MetricThreshold`: its `min_absolute_change` / `min_relative_change` must be positive ("better by at
  least"). They are judged here on the candidate's bootstrap CI, not its point value: the candidate fails
  only if even the favourable end of its CI is worse than the champion by more than Δ, so sampling noise
  alone does not reject a student.
- FIDs in different feature spaces are different quantities: every evaluation records the sha256 of each
  space it was measured in (`feature_spaces`), and when the champion's differ from the candidate's, the
  change thresholds are not judged but fail, with both spaces named and what to do (re-evaluate the champion).
- With no champion, `first_run` decides: `absolute` judges the absolute thresholds alone, `reject` never
  promotes without a champion.

Every check keeps its value, bound and verdict; `reasons()` is the text of the `redistill.gate_reasons` tag.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from redistill.config import METHOD_FAMILY, GateParams

# metric name in the evaluation JSON → (params field with its bound, greater is better)
ABSOLUTE = {
    "speedup_throughput": ("speedup_min", True),
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
            f" ({self.note})" if self.note else ""
        )


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
        "speedup_throughput": s["speedup_throughput"],
        # identical to the teacher: PSNR is unbounded, which passes any PSNR floor
        "psnr_db": math.inf if psnr is None else psnr,
        "recognisable_share": q.get("recognisable_share", math.nan),
    }


def _gap_checks(result: dict, p: GateParams) -> list[Check]:
    """One floor-aware FID-gap check per feature space."""
    spaces = result["quality"].get("spaces") or {result["quality"].get("feature_space", "features"): result["quality"]}
    checks = []
    for name, q in spaces.items():
        value = q.get("fid_gap_floors")
        check_name = f"fid_gap.{name}"
        bound = gap_bound(p.fid_gap_max, name)
        if value is None or not math.isfinite(value):
            checks.append(
                Check(
                    check_name,
                    "absolute",
                    None,
                    bound,
                    "<=",
                    bound is None,
                    "not measured (no FID gap or a zero floor)",
                )
            )
            continue
        half = q.get("fid_gap_halfwidth_floors")
        gap = (
            f"gap {q['fid_gap']:+.4g} (CI {q['fid_gap_ci95'][0]:+.4g}…{q['fid_gap_ci95'][1]:+.4g}) over a real-vs-real "
            f"floor of {q['fid_floor']:.4g}" + (f"; CI ±{half:.2g} floors" if half is not None else "")
        )
        if bound is None:  # no bound separated the calibration's controls in this space: it reports, it does not decide
            checks.append(
                Check(
                    check_name,
                    "absolute",
                    value,
                    None,
                    "<=",
                    True,
                    f"{gap}; reported, not gated: gate.fid_gap_max gives this space no bound",
                )
            )
            continue
        note = (
            f"{gap}: "
            + (
                "decided, the CI is clear of the bound"
                if decided(q, bound)
                else "NOT decided, the CI contains the bound even at evaluate.max_samples: raise it"
            )
            if half is not None
            else ""
        )
        checks.append(
            Check(
                check_name, "absolute", value, bound, "<=", _mlflow_verdict("fid_gap_floors", value, bound, False), note
            )
        )
    return checks


def gap_bound(bounds: dict[str, float | None] | float | None, space: str) -> float | None:
    """The FID-gap bound of `space` in `bounds` (`gate.fid_gap_max`: one number for every space, or a space's own,
    else the `default` entry); None where the space does not decide."""
    if not isinstance(bounds, dict):
        return bounds
    return bounds.get(space, bounds.get("default"))


def decided(q: dict, bound: float | None) -> bool:
    """Whether a space's FID-gap interval (in floors) lies on one side of its `bound`, so sampling noise cannot turn
    the verdict; a space without a bound, or without a gap, has nothing to decide."""
    lo, hi = q.get("fid_gap_ci95") or (None, None)
    floor = q.get("fid_floor") or 0
    if bound is None or lo is None or floor <= 0:
        return True
    return not lo / floor <= bound <= hi / floor


def _spaces(result: dict) -> tuple[str | None, dict[str, str] | None]:
    """(primary space, {space: sha256}) of an evaluation result; the top-level figures are the primary's."""
    return result["quality"].get("feature_space"), result.get("feature_spaces")


def _describe(primary: str | None, spaces: dict[str, str] | None) -> str:
    if spaces is None:
        return "feature spaces that it does not record"
    names = sorted(spaces, key=lambda n: n != primary)  # the primary, whose FID and KID are compared, first
    return "feature space(s) " + ", ".join(
        f"{n} (sha256 {spaces[n][:12] + '…' if spaces[n] else 'not recorded'})" for n in names
    )


def space_mismatch(candidate: dict, champion: dict) -> str | None:
    """Why the champion's figures cannot be compared with the candidate's (measured in other feature
    spaces), or None when they can.

    Spaces are the same when their weights' sha256s are (a space without one, a bare module, by its name),
    the primary one included. Two results that record no spaces at all are compared as before."""
    (cp, cs), (bp, bs) = _spaces(candidate), _spaces(champion)
    if cs is None and bs is None:
        return None
    ident = lambda spaces, name: (spaces.get(name) or name) if name in spaces else name  # noqa: E731
    if (
        cs is not None
        and bs is not None
        and ident(cs, cp) == ident(bs, bp)
        and {ident(cs, n) for n in cs} == {ident(bs, n) for n in bs}
    ):
        return None
    return (
        f"the champion's figures are in {_describe(bp, bs)} and the student's in {_describe(cp, cs)}, so "
        "they are never compared; re-evaluate the champion in the student's feature spaces (`redistill "
        "evaluate` on its student folder with this evaluate.features; a cycle does so itself when the "
        "champion's features_sha256 tag differs) and gate again"
    )


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


def judge(candidate: dict, champion: dict | None, p: GateParams, method: str | None = None) -> Decision:
    """Gate an evaluation result against `p`, and against the champion's result when there is one.

    `method` (a `distill.method`) picks the fidelity bound of its family; without it the strictest applies."""
    checks = _gap_checks(candidate, p)
    metrics = flat_metrics(candidate)
    family = METHOD_FAMILY.get(method or "", None)
    psnr_bound = getattr(p.psnr_min, family) if family else max(vars(p.psnr_min).values())
    for name, (param, greater) in {**ABSOLUTE, "psnr_db": (None, True)}.items():
        value = metrics[name]
        bound = psnr_bound if name == "psnr_db" else getattr(p, param)
        note = ""
        stochastic = name == "psnr_db" and bound > 0 and candidate.get("fidelity", {}).get("fresh_noise")
        if name == "psnr_db":
            note = (f"{family} family" if family else "method unknown: the strictest family bound") + (
                ": fidelity to the teacher is not gated" if bound <= 0 else ""
            )
        if stochastic:  # "the same noise" fixes only the start of a sampler that draws noise between steps
            checks.append(
                Check(
                    name,
                    "absolute",
                    value,
                    bound,
                    ">=",
                    True,
                    f"{note}: not gated: the student's {stochastic}, so its samples are not a function of "
                    "the initial noise and cannot keep the teacher's noise-to-image map; the FID gap judges it",
                )
            )
            continue
        if (
            math.isnan(value)
            and name == "recognisable_share"
            and "classifier" not in (candidate.get("feature_spaces") or {})
        ):
            # recognisability needs a classifier of labelled data; label-free evaluation does not measure it
            checks.append(
                Check(
                    name,
                    "absolute",
                    None,
                    bound,
                    ">=",
                    True,
                    "not gated: no classifier in evaluate.features (label-free data)",
                )
            )
            continue
        if math.isnan(value):
            checks.append(Check(name, "absolute", None, bound, ">=" if greater else "<=", False, "not measured"))
            continue
        ok = (
            bound <= 0
            and name == "psnr_db"
            or (math.isinf(value) and (value > 0) == greater)
            or _mlflow_verdict(name, value, bound, greater)
        )
        checks.append(Check(name, "absolute", value, bound, ">=" if greater else "<=", ok, note))

    if champion is None:
        if p.first_run == "reject":
            checks.append(
                Check(
                    "champion", "change", None, None, "exists", False, "no champion yet and gate.first_run is 'reject'"
                )
            )
        else:
            checks.append(
                Check(
                    "champion",
                    "change",
                    None,
                    None,
                    "exists",
                    True,
                    "no champion yet: absolute thresholds only (gate.first_run = 'absolute')",
                )
            )
    elif (mismatch := space_mismatch(candidate, champion)) is not None:
        checks.append(Check("feature_spaces_vs_champion", "change", None, None, "==", False, mismatch))
    else:
        cq, bq = candidate["quality"], champion["quality"]
        source = champion.get("evaluated_on", "the champion's recorded evaluation (same data and feature spaces)")
        # favourable end of the candidate's CI against the champion's point value plus Δ
        fid_bound = bq["fid"] * (1.0 + p.fid_change_max)
        checks.append(
            Check(
                "fid_vs_champion",
                "change",
                cq["fid_ci95"][0],
                fid_bound,
                "<=",
                cq["fid_ci95"][0] <= fid_bound,
                f"candidate FID {cq['fid']:.4g} CI {cq['fid_ci95'][0]:.4g}–{cq['fid_ci95'][1]:.4g}, "
                f"champion {bq['fid']:.4g} × (1 + {p.fid_change_max}); {source}",
            )
        )
        kid_bound = bq["kid"] + p.kid_change_max
        checks.append(
            Check(
                "kid_vs_champion",
                "change",
                cq["kid_ci95"][0],
                kid_bound,
                "<=",
                cq["kid_ci95"][0] <= kid_bound,
                f"candidate KID {cq['kid']:.4g}, champion {bq['kid']:.4g} + {p.kid_change_max}",
            )
        )
    return Decision(all(c.passed for c in checks), checks)
