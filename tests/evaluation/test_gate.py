"""Tier 1: the gate's verdicts: floor-aware FID gaps in every feature space, fidelity per method family,
MLflow's MetricThreshold semantics, and the change against the champion (judged on the CI)."""

from __future__ import annotations

import copy

import pytest

from redistill.config import FID_GAP_MAX, ConfigError, GateParams, parse_params
from redistill.evaluation.gate import judge


def space(gap_floors=0.1, floor=0.4, half=0.05):
    gap = gap_floors * floor
    return {
        "fid_gap_floors": gap_floors,
        "fid_gap": gap,
        "fid_gap_ci95": [gap - half * floor, gap + half * floor],
        "fid_floor": floor,
        "fid_gap_halfwidth_floors": half,
    }


def result(
    fid=0.40,
    ci=(0.30, 0.55),
    kid=0.010,
    kid_ci=(0.0, 0.03),
    gaps=(0.1, 0.1),
    speedup=12.0,
    psnr=25.0,
    recog=0.9,
    half=0.05,
):
    spaces = {name: space(g, half=half) for name, g in zip(("classifier", "encoder"), gaps)}
    return {
        "quality": {
            "fid": fid,
            "fid_ci95": list(ci),
            "kid": kid,
            "kid_ci95": list(kid_ci),
            "fid_ratio": 1.2,
            "recognisable_share": recog,
            "spaces": spaces,
        },
        "fidelity": {"psnr_db": psnr, "ssim": 0.95},
        "speed": {"speedup_throughput": speedup},
    }


def test_first_student_passing_every_absolute_threshold_is_promoted():
    d = judge(result(), None, GateParams(), "progressive")
    assert d.passed, d.reasons()
    names = [c.name for c in d.checks]
    assert names == [
        "fid_gap.classifier",
        "fid_gap.encoder",
        "speedup_throughput",
        "recognisable_share",
        "psnr_db",
        "champion",
    ]
    assert "no champion yet" in d.reasons()
    # each space's interval is clear of its calibrated bound: the verdict is decided, not a coin flip
    assert "decided, the CI is clear of the bound" in d.checks[0].note and "decided" in d.checks[1].note


@pytest.mark.parametrize(
    "field,value,name",
    [
        ("speedup", 7.9, "speedup_throughput"),
        ("psnr", 19.9, "psnr_db"),
        ("recog", 0.84, "recognisable_share"),
    ],
)
def test_each_absolute_threshold_can_reject(field, value, name):
    d = judge(result(**{field: value}), None, GateParams(), "progressive")
    assert not d.passed
    assert [c.name for c in d.failed()] == [name]
    assert f"FAIL absolute {name}: {value:.4g}" in d.reasons()


CLS, ENC = FID_GAP_MAX["classifier"], FID_GAP_MAX["encoder"]  # the calibrated bounds (metrics/calibration.json)


@pytest.mark.parametrize(
    "gaps,failed",
    [
        ((CLS + 0.05, 0.1), ["fid_gap.classifier"]),
        ((0.1, ENC + 0.01), ["fid_gap.encoder"]),
        ((CLS + 0.5, ENC + 0.2), ["fid_gap.classifier", "fid_gap.encoder"]),
    ],
)
def test_the_fid_gap_is_gated_in_every_feature_space_at_its_own_bound(gaps, failed):
    d = judge(result(gaps=gaps, half=0.001), None, GateParams(), "dmd")
    assert [c.name for c in d.failed()] == failed


def test_one_bound_for_every_space_and_a_space_that_reports_but_does_not_decide():
    # one number: every space is held to it
    assert [c.name for c in judge(result(gaps=(0.3, 0.1)), None, GateParams(fid_gap_max=0.25), "dmd").failed()] == [
        "fid_gap.classifier"
    ]
    # a space whose bound is null reports its gap and passes; an unnamed space takes the default
    gate = GateParams(fid_gap_max={"classifier": None, "default": 0.2})
    d = judge(result(gaps=(5.0, 0.3)), None, gate, "dmd")
    assert [c.name for c in d.failed()] == ["fid_gap.encoder"]
    assert d.checks[0].passed and d.checks[0].bound is None and "reported, not gated" in d.checks[0].note
    with pytest.raises(ConfigError, match="needs a `default` entry"):
        GateParams(fid_gap_max={"classifier": 1.0})


def test_a_gap_whose_interval_contains_the_bound_is_flagged_in_the_reasons():
    d = judge(result(half=0.4), None, GateParams(), "dmd")  # encoder: 0.1 ± 0.4 contains its bound
    assert "NOT decided" in d.checks[1].note and "NOT decided" not in d.checks[0].note


def test_fidelity_is_gated_per_method_family():
    low_psnr = result(psnr=12.0)
    for method in ("progressive", "consistency", "output"):  # they promise the teacher's noise-to-image map
        assert [c.name for c in judge(low_psnr, None, GateParams(), method).failed()] == ["psnr_db"]
    for method in ("dmd", "adversarial"):  # they promise the distribution, not the map
        d = judge(low_psnr, None, GateParams(), method)
        assert d.passed and "distribution family: fidelity to the teacher is not gated" in d.reasons()
    assert not judge(low_psnr, None, GateParams(), None).passed  # unknown method: the strictest bound
    strict = parse_params({"gate": {"psnr_min": {"distribution": 15.0}}}).gate
    assert not judge(low_psnr, None, strict, "dmd").passed


def test_a_sampler_that_draws_noise_between_steps_is_not_held_to_the_teachers_map():
    """Multistep LCM re-noises between steps: "the same noise" fixes only its start, so its PSNR is reported, not
    gated; the same student sampled deterministically is held to its family's bound."""
    from redistill.evaluation.sampling import fresh_noise

    low_psnr = result(psnr=12.0)
    low_psnr["fidelity"]["fresh_noise"] = "LCMScheduler at 4 steps re-noises its x0 estimate between steps"
    d = judge(low_psnr, None, GateParams(), "consistency")
    assert d.passed, d.reasons()
    psnr = next(c for c in d.checks if c.name == "psnr_db")
    assert psnr.value == 12.0 and "not gated" in psnr.note and "LCMScheduler at 4 steps" in psnr.note
    low_psnr["fidelity"]["fresh_noise"] = None
    assert [c.name for c in judge(low_psnr, None, GateParams(), "consistency").failed()] == ["psnr_db"]

    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        EulerAncestralDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchLCMScheduler,
        LCMScheduler,
    )

    assert "re-noises" in fresh_noise(LCMScheduler(), 4) and fresh_noise(LCMScheduler(), 1) is None
    # a flow-matching consistency student (SD3, Flux) re-noises as well; the flow's Euler sampler does not
    assert "FlowMatchLCMScheduler at 4 steps re-noises" in fresh_noise(FlowMatchLCMScheduler(), 4)
    assert fresh_noise(FlowMatchEulerDiscreteScheduler(), 4) is None
    assert fresh_noise(DDIMScheduler(), 50) is None
    assert "ancestral" in fresh_noise(DDPMScheduler(), 1000) and "ancestral" in fresh_noise(
        EulerAncestralDiscreteScheduler(), 8
    )


def test_a_value_exactly_at_its_bound_passes_as_mlflow_defines_it():
    assert judge(result(gaps=(CLS, ENC), speedup=8.0), None, GateParams(), "dmd").passed


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
    assert judge(noisy, champion, GateParams(), "progressive").passed
    # the whole CI above the bound: really worse, rejected
    worse = result(fid=0.60, ci=(0.50, 0.75))
    d = judge(worse, champion, GateParams(), "progressive")
    assert not d.passed and [c.name for c in d.failed()] == ["fid_vs_champion"]
    assert "FAIL change fid_vs_champion: 0.5 <= 0.44" in d.reasons()


def test_kid_change_and_identical_psnr():
    champion = result(kid=0.005)
    d = judge(result(kid=0.05, kid_ci=(0.03, 0.07), psnr=None), champion, GateParams(), "progressive")
    assert [c.name for c in d.failed()] == ["kid_vs_champion"]  # PSNR None (identical) passes the floor


def test_reasons_record_every_value_bound_and_verdict():
    d = judge(result(), result(), GateParams(), "progressive")
    text = d.reasons()
    for c in d.checks:
        assert c.name in text
    first = copy.deepcopy(d.to_dict())["checks"][0]
    assert {k: first[k] for k in ("name", "kind", "value", "bound", "op", "passed")} == {
        "name": "fid_gap.classifier",
        "kind": "absolute",
        "value": 0.1,
        "bound": CLS,
        "op": "<=",
        "passed": True,
    }


def test_thresholds_that_are_not_numbers_are_a_settings_error():
    with pytest.raises(ConfigError, match="gate.speedup_min must be a number"):
        parse_params({"gate": {"speedup_min": "fast"}})
    with pytest.raises(ConfigError, match="unknown key gate.fid_ratio_max"):
        parse_params({"gate": {"fid_ratio_max": 1.5}})


def measured_in(r, spaces):
    """`r` with the feature spaces it records (name → sha256), the first one primary."""
    r = copy.deepcopy(r)
    r["feature_spaces"] = dict(spaces)
    r["quality"]["feature_space"] = next(iter(spaces))
    return r


SPACES = {"classifier": "a" * 64, "encoder": "b" * 64}


def test_same_space_results_are_compared_exactly_as_before():
    for cand, champ in [
        (result(), result(fid=0.40)),
        (result(fid=0.60, ci=(0.50, 0.75)), result(fid=0.40)),
        (result(kid=0.05, kid_ci=(0.03, 0.07)), result(kid=0.005)),
    ]:
        before = judge(cand, champ, GateParams(), "progressive")
        recorded = judge(measured_in(cand, SPACES), measured_in(champ, SPACES), GateParams(), "progressive")
        assert recorded.to_dict() == before.to_dict()


@pytest.mark.parametrize(
    "champion_spaces,described",
    [
        (
            {"classifier": "c" * 64, "encoder": "b" * 64},  # a retrained classifier
            "feature space(s) classifier (sha256 cccccccccccc…), encoder (sha256 bbbbbbbbbbbb…)",
        ),
        (
            {"encoder": "b" * 64, "classifier": "a" * 64},  # its top-level FID and KID are the encoder's
            "feature space(s) encoder (sha256 bbbbbbbbbbbb…), classifier (sha256 aaaaaaaaaaaa…)",
        ),
        ({"classifier": "a" * 64}, "feature space(s) classifier (sha256 aaaaaaaaaaaa…)"),
        (None, "feature spaces that it does not record"),
    ],
)
def test_a_champion_measured_in_other_feature_spaces_is_never_compared(champion_spaces, described):
    # the champion is far worse: compared, the student would pass the change thresholds
    champion = result(fid=2.0, ci=(1.8, 2.2), kid=0.5)
    if champion_spaces is not None:
        champion = measured_in(champion, champion_spaces)
    d = judge(measured_in(result(), SPACES), champion, GateParams(), "progressive")
    assert not d.passed
    assert [c.name for c in d.failed()] == ["feature_spaces_vs_champion"]
    assert "fid_vs_champion" not in d.reasons()
    assert (
        f"FAIL change feature_spaces_vs_champion: n/a == n/a (the champion's figures are in {described} "
        "and the student's in feature space(s) classifier (sha256 aaaaaaaaaaaa…), encoder (sha256 "
        "bbbbbbbbbbbb…), so they are never compared; re-evaluate the champion in the student's feature "
        "spaces"
    ) in d.reasons()
    # the same space under another name (the same weights file at another path) is the same space
    renamed = measured_in(result(fid=2.0, ci=(1.8, 2.2)), {"inception:/b/x.safetensors": "f" * 64})
    assert judge(
        measured_in(result(), {"inception:/a/x.safetensors": "f" * 64}), renamed, GateParams(), "progressive"
    ).passed
