"""The watch's planner on hand-built states and findings: no Prefect, no MLflow, no files."""

from __future__ import annotations

from redistill.core.watch_state import empty_state
from redistill.watch import policy
from redistill.watch.scan import Finding
from redistill.watch.state import Episode, WatchState

HOUR = 3600.0


def teacher(name: str, status: str = "ready", reason: str = "") -> Finding:
    return Finding("teacher", name, f"/ws/data/teachers/{name}", status, f"sig-{name}", reason)


def batch(name: str) -> Finding:
    return Finding("batch", name, f"/ws/data/incoming/{name}", "ready", f"sig-{name}")


def drift(drifted: bool, **extra) -> dict:
    return {
        "drifted": drifted,
        "reasons": ["mmd p=0.001"] if drifted else [],
        "mmd_p": 0.001 if drifted else 0.5,
        **extra,
    }


def test_the_state_round_trips_the_file_format_and_keeps_unknown_keys():
    d = {
        **empty_state(),
        "episode": {
            "id": "b1",
            "opened_at": 1.0,
            "batches": ["b1"],
            "clean_streak": 1,
            "deferred": True,
            "action": None,
        },
        "later_key": [1, 2],
    }
    assert WatchState.from_dict(d).to_dict() == d
    assert WatchState().to_dict() == empty_state()


def test_broken_known_and_new_teachers_only_the_newest_new_one_is_distilled():
    state = WatchState(teachers={"old": {"signature": "s", "sha256": "aaa", "status": "accepted"}})
    found = [
        teacher("broken", "bad", "no model_index.json"),
        teacher("unfit"),
        teacher("copy"),
        teacher("new1"),
        teacher("new2", reason="registered reg v3"),
    ]
    facts = {
        "unfit": {"ok": False, "error": "3 channels, the data has 1"},
        "copy": {"ok": True, "sha256": "aaa"},
        "new1": {"ok": True, "sha256": "n1"},
        "new2": {"ok": True, "sha256": "n2", "params": 7},
    }
    actions = policy.plan(state, policy.TeachersInspected(found, facts, {"zzz"}, now=100.0))
    assert [type(a).__name__ for a in actions] == [
        "RefuseTeacher",
        "RefuseTeacher",
        "Report",
        "Report",
        "DistilTeacher",
    ]
    assert actions[1].reason == "3 channels, the data has 1"
    assert actions[2].entry == {"teacher": "copy", "status": "known", "sha256": "aaa"}
    assert actions[3].entry["status"] == "superseded" and actions[3].entry["teacher"] == "new1"
    assert (actions[4].name, actions[4].sha256, actions[4].registry) == ("new2", "n2", "reg v3")
    assert state.current_teacher == "/ws/data/teachers/new2"
    assert {k: v["status"] for k, v in state.teachers.items()} == {
        "old": "accepted",
        "broken": "bad",
        "unfit": "bad",
        "copy": "known",
        "new1": "superseded",
        "new2": "accepted",
    }
    assert [h["event"] for h in state.history] == ["teacher-refused", "teacher-refused", "teacher-new"]


def test_a_fetched_registered_teacher_is_recorded_and_inspected_once():
    state = WatchState()
    got = {"name": "reg-v2", "path": "/ws/data/teachers/reg-v2", "version": "2", "signature": "s2"}
    found = policy.teacher_findings(state, [], "reg", got, now=1.0)
    assert [(f.name, f.status, f.reason) for f in found] == [("reg-v2", "ready", "registered reg v2")]
    assert state.registry_teachers == {"reg": "2"}
    assert policy.teacher_findings(state, found, "reg", got, now=2.0) == found  # already found by the scan
    assert policy.teacher_findings(state, found, "reg", None, now=3.0) == found


def test_a_drifted_batch_opens_an_episode_that_checks_the_champion_once():
    state = WatchState()
    actions = policy.plan(state, policy.BatchTested(batch("b1"), drift(True), 10.0, clear_batches=2, cooldown_hours=1))
    assert [type(a).__name__ for a in actions] == ["RecordDrift", "EmitDrift", "CheckChampion", "SaveBatch"]
    assert actions[1].action == "act" and state.episode.id == "b1"
    entry = policy.batch_done(state, actions[-1], {"decision": "champion still fit"})
    assert entry["outcome"] == {"decision": "champion still fit"} and state.batches["b1"]["signature"] == "sig-b1"
    # a second drifted batch is absorbed by the open episode: no second action
    actions = policy.plan(state, policy.BatchTested(batch("b2"), drift(True), 20.0, 2, 1))
    assert [type(a).__name__ for a in actions] == ["RecordDrift", "EmitDrift", "SaveBatch"]
    assert actions[1].action == "absorbed" and state.episode.batches == ["b1", "b2"]
    for n, name in enumerate(("c1", "c2")):  # two clean batches close it
        policy.plan(state, policy.BatchTested(batch(name), drift(False), 30.0 + n, 2, 1))
    assert state.episode is None and state.history[-1]["event"] == "episode-closed"


def test_the_champion_still_fit_keeps_it_otherwise_the_set_grows_and_the_cycle_runs():
    state = WatchState(episode=Episode("b1", 0.0, ["b1"]))
    fit = {"version": "3", "passed": True, "reasons": "pass fid_ratio 1.1 <= 1.5"}
    (a,) = policy.plan(state, policy.ChampionChecked("b1", "/p", {}, fit))
    assert isinstance(a, policy.KeepChampion) and state.episode.action == "champion still fit"
    (a,) = policy.plan(state, policy.ChampionChecked("b1", "/p", {}, {**fit, "passed": False}))
    assert isinstance(a, policy.Redistill) and a.why == "champion v3 no longer fit: pass fid_ratio 1.1 <= 1.5"
    (a,) = policy.plan(state, policy.ChampionChecked("b1", "/p", {}, None))
    assert a.why == "no champion yet"
    policy.redistilled(state, "/ws/data/representative", {"decision": "promoted"}, now=50.0)
    assert (state.last_redistill_at, state.current_data, state.episode.action) == (
        50.0,
        "/ws/data/representative",
        "re-distilled: promoted",
    )


def test_an_unreadable_batch_is_refused_and_opens_no_episode():
    state = WatchState()
    (a,) = policy.plan(state, policy.BatchTested(batch("junk"), {"error": True, "reasons": ["not a PNG"]}, 1.0, 2, 1))
    assert isinstance(a, policy.RefuseBatch) and a.reason == "not a PNG"
    assert state.episode is None and state.batches["junk"]["status"] == "bad"


def test_an_episode_inside_the_cooldown_waits_then_acts_once():
    state = WatchState(last_redistill_at=0.0)
    (_, _, save) = policy.plan(state, policy.BatchTested(batch("b1"), drift(True), HOUR / 2, 2, 1))
    policy.batch_done(state, save, None)
    assert state.episode.deferred and state.batches["b1"]["action"] == "deferred"
    assert policy.plan(state, policy.CooldownChecked(HOUR / 2 + 1, 1)) == []
    assert policy.plan(state, policy.CooldownChecked(2 * HOUR, 1, ("teachers",))) == []  # a teachers-only look
    (a,) = policy.plan(state, policy.CooldownChecked(2 * HOUR, 1))
    assert isinstance(a, policy.CheckChampion) and a.batch == "b1" and a.path is None
    assert a.report["reasons"] == ["mmd p=0.001"] and not state.episode.deferred
    assert policy.plan(state, policy.CooldownChecked(3 * HOUR, 1)) == []
    assert policy.due_episode(state.to_dict(), 3 * HOUR, 1) is None  # the plain dict the file holds works too


def test_the_champion_is_fit_when_every_absolute_check_passes():
    from types import SimpleNamespace as C

    checks = [
        C(kind="absolute", passed=True, name="fid_ratio", value=1.23456, op="<=", bound=1.5),
        C(kind="change", passed=False, name="vs_champion", value=2.0, op="<=", bound=1.0),
        C(kind="absolute", passed=False, name="kid", value=None, op="<=", bound=0.1),
    ]
    assert policy.fit_verdict(checks) == (False, "pass fid_ratio 1.2346 <= 1.5; FAIL kid None <= 0.1")
    assert policy.fit_verdict(checks[:2]) == (True, "pass fid_ratio 1.2346 <= 1.5")
