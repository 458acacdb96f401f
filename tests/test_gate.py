"""Tier 1: the gate's verdicts, absolute (MLflow's MetricThreshold semantics) and against the champion (on the CI)."""

from __future__ import annotations

import copy

import pytest

from redistill.config import ConfigError, GateParams, parse_params
from redistill.gate import judge


def result(fid=0.40, ci=(0.30, 0.55), kid=0.010, kid_ci=(0.0, 0.03), ratio=1.2, speedup=12.0, psnr=25.0, recog=0.9):
    return {
        "quality": {"fid": fid, "fid_ci95": list(ci), "kid": kid, "kid_ci95": list(kid_ci), "fid_ratio": ratio,
                    "recognisable_share": recog},
        "fidelity": {"psnr_db": psnr, "ssim": 0.95},
        "speed": {"speedup_throughput": speedup},
    }


def test_first_student_passing_every_absolute_threshold_is_promoted():
    d = judge(result(), None, GateParams())
    assert d.passed, d.reasons()
    names = [c.name for c in d.checks]
    assert names == ["fid_ratio", "speedup_throughput", "psnr_db", "recognisable_share", "champion"]
    assert "no champion yet" in d.reasons()


@pytest.mark.parametrize("field,value,name", [
    ("ratio", 1.51, "fid_ratio"), ("speedup", 7.9, "speedup_throughput"),
    ("psnr", 19.9, "psnr_db"), ("recog", 0.84, "recognisable_share"),
])
def test_each_absolute_threshold_can_reject(field, value, name):
    d = judge(result(**{field: value}), None, GateParams())
    assert not d.passed
    assert [c.name for c in d.failed()] == [name]
    assert f"FAIL absolute {name}: {value:.4g}" in d.reasons()


def test_a_value_exactly_at_its_bound_passes_as_mlflow_defines_it():
    assert judge(result(ratio=1.5, speedup=8.0), None, GateParams()).passed


def test_first_run_policy_reject():
    d = judge(result(), None, GateParams(first_run="reject"))
    assert not d.passed and "first_run is 'reject'" in d.reasons()
    with pytest.raises(ConfigError, match="first_run"):
        GateParams(first_run="sometimes")


def test_change_is_judged_on_the_candidates_ci_not_its_point():
    champion = result(fid=0.40)
    bound = 0.40 * 1.10
    # point estimate worse than champion + 10%, but the CI reaches below the bound: noise, so it passes
    noisy = result(fid=0.47, ci=(0.40, 0.60))
    assert noisy["quality"]["fid"] > bound
    assert judge(noisy, champion, GateParams()).passed
    # the whole CI above the bound: really worse, rejected
    worse = result(fid=0.60, ci=(0.50, 0.75))
    d = judge(worse, champion, GateParams())
    assert not d.passed and [c.name for c in d.failed()] == ["fid_vs_champion"]
    assert "FAIL change fid_vs_champion: 0.5 <= 0.44" in d.reasons()


def test_kid_change_and_identical_psnr():
    champion = result(kid=0.005)
    d = judge(result(kid=0.05, kid_ci=(0.03, 0.07), psnr=None), champion, GateParams())
    assert [c.name for c in d.failed()] == ["kid_vs_champion"]  # PSNR None (identical) passes the floor


def test_reasons_record_every_value_bound_and_verdict():
    d = judge(result(), result(), GateParams())
    text = d.reasons()
    for c in d.checks:
        assert c.name in text
    assert copy.deepcopy(d.to_dict())["checks"][0] == {"name": "fid_ratio", "kind": "absolute", "value": 1.2,
                                                        "bound": 1.5, "op": "<=", "passed": True, "note": ""}


def test_thresholds_that_are_not_numbers_are_a_settings_error():
    with pytest.raises(ConfigError, match="gate.speedup_min must be a number"):
        parse_params({"gate": {"speedup_min": "fast"}})
