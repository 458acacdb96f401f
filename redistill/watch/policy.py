"""The watch's decisions, as pure functions: `plan(state, observation) -> actions`.

The watch flow (`flows/watch.py`) observes (scans folders, inspects teachers, tests batches for drift, re-checks the
champion), hands each observation to `plan`, and executes the actions it returns; `plan` updates the state in
memory and never reads a file, a clock or a server, so every decision is tested on hand-built states.

- Teachers: a broken one is refused and skipped until its contents change; one whose weights the registry or the
  state already know is "known"; of several new ones in one look only the newest is distilled.
- Drift episodes, with hysteresis and cooldown (`on_batch`): a drifted batch opens an episode, which acts once (the
  champion first, re-distillation only when it is no longer fit); `drift.clear_batches` clean batches in a row close
  it; an episode opened inside `drift.cooldown_hours` of the last re-distillation waits for the cooldown to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redistill.watch.scan import LOOKS, Finding  # noqa: F401  (LOOKS: what a look covers)
from redistill.watch.state import Episode, WatchState

# ---------------------------------------------------------------------------------------------------
# What the flow observed
# ---------------------------------------------------------------------------------------------------


@dataclass
class TeachersInspected:
    """The teacher findings of one look, what inspecting the ready ones said, and the weights already distilled."""

    findings: list[Finding]
    facts: dict[str, dict]  # finding name -> inspect-teacher's result (ok, error, sha256, params)
    known_sha256: set[str]  # teacher hashes the registry already has students of
    now: float


@dataclass
class BatchTested:
    """One ready batch and its drift report (`report["error"]`: it could not be read as images)."""

    finding: Finding
    report: dict
    now: float
    clear_batches: int
    cooldown_hours: float


@dataclass
class ChampionChecked:
    """The champion re-checked on a drifted batch (`fit` None: there is no champion)."""

    batch: str
    path: str | None
    report: dict
    fit: dict | None


@dataclass
class CooldownChecked:
    """The clock, for a drift episode the cooldown deferred."""

    now: float
    cooldown_hours: float
    look: tuple[str, ...] = LOOKS


# ---------------------------------------------------------------------------------------------------
# What the flow does
# ---------------------------------------------------------------------------------------------------


@dataclass
class RefuseTeacher:
    """Record a broken teacher in MLflow (a FAILED teacher-check run) and emit teacher.rejected."""

    name: str
    path: str
    reason: str


@dataclass
class Report:
    """Nothing to run: report `entry` under `section` ("teachers" or "batches")."""

    section: str
    entry: dict


@dataclass
class DistilTeacher:
    """Save the state, emit teacher.new and run one cycle on the new teacher with the current data."""

    name: str
    path: str
    sha256: str
    params: object
    registry: str | None  # "model vN" when it came from the registry


@dataclass
class RefuseBatch:
    """Record a batch that cannot be read as images (a FAILED drift-check run) and emit batch.rejected."""

    name: str
    path: str
    reason: str


@dataclass
class RecordDrift:
    """Log the drift check's MLflow run (tags, metrics, the report folder)."""

    name: str
    report: dict


@dataclass
class EmitDrift:
    """Emit drift.detected for a drifted batch."""

    name: str
    reasons: list
    mmd_p: float | None
    action: str


@dataclass
class CheckChampion:
    """Re-check the champion on the batch that opened the episode (then `plan(ChampionChecked)`)."""

    batch: str
    path: str | None  # None: the batch's folder under data/incoming/ (a deferred episode)
    report: dict


@dataclass
class KeepChampion:
    """Record that the champion is still fit: a fit-check run, a tag on its version, champion.still-fit."""

    batch: str
    fit: dict


@dataclass
class Redistill:
    """Grow the representative set by the batch and run one cycle on it."""

    batch: str
    path: str | None
    report: dict
    why: str


@dataclass
class SaveBatch:
    """Record the tested batch in the state (with the outcome of its action, once executed) and save it."""

    name: str
    record: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------


def plan(state: WatchState, seen) -> list:
    """The actions for one observation, in the order the flow executes them; `state` is updated in memory."""
    if isinstance(seen, TeachersInspected):
        return _teachers(state, seen)
    if isinstance(seen, BatchTested):
        return _batch(state, seen)
    if isinstance(seen, ChampionChecked):
        return _champion(state, seen)
    if isinstance(seen, CooldownChecked):
        ep = due_episode(state, seen.now, seen.cooldown_hours) if "batches" in seen.look else None
        if ep is None:
            return []
        ep.deferred = False
        batch = ep.batches[-1]
        done = state.batches.get(batch, {})
        return [CheckChampion(batch, None, {"reasons": done.get("reasons", []), "mmd_p": done.get("mmd_p")})]
    raise TypeError(f"the watch planner has no rule for {type(seen).__name__}")


def teacher_findings(
    state: WatchState, findings: list[Finding], model: str | None, fetched: dict | None, now: float
) -> list[Finding]:
    """The teachers a look inspects: the scan's teacher `findings`, plus the folder `fetched` from the registered
    `model` (name, path, version, signature; None when nothing new), which the state then records as handled."""
    if fetched is None:
        return findings
    state.registry_teachers[model] = fetched["version"]
    state.note("registered-teacher", at=now, model=model, version=fetched["version"], path=fetched["path"])
    if any(f.name == fetched["name"] for f in findings):
        return findings
    # written whole by the download, so it need not settle
    return findings + [
        Finding(
            "teacher",
            fetched["name"],
            fetched["path"],
            "ready",
            fetched["signature"],
            f"registered {model} v{fetched['version']}",
        )
    ]


def _teachers(state: WatchState, seen: TeachersInspected) -> list:
    known = set(seen.known_sha256) | {t["sha256"] for t in state.teachers.values() if t.get("sha256")}
    actions, new = [], []
    for f in seen.findings:
        facts = seen.facts.get(f.name, {}) if f.status != "bad" else {}
        if f.status == "bad" or not facts.get("ok"):
            reason = f.reason if f.status == "bad" else facts.get("error", "not inspected")
            state.teachers[f.name] = {"signature": f.signature, "status": "bad", "reason": reason, "at": seen.now}
            state.note("teacher-refused", at=seen.now, teacher=f.name, reason=reason)
            actions.append(RefuseTeacher(f.name, f.path, reason))
        elif facts["sha256"] in known:
            state.teachers[f.name] = {"signature": f.signature, "sha256": facts["sha256"], "status": "known"}
            actions.append(Report("teachers", {"teacher": f.name, "status": "known", "sha256": facts["sha256"]}))
        else:
            known.add(facts["sha256"])
            new.append((f, facts))
    for f, facts in new[:-1]:  # several new teachers in one look: only the newest is distilled
        state.teachers[f.name] = {"signature": f.signature, "sha256": facts["sha256"], "status": "superseded"}
        actions.append(Report("teachers", {"teacher": f.name, "status": "superseded", "sha256": facts["sha256"]}))
    if new:
        f, facts = new[-1]
        reg = f.reason.removeprefix("registered ") if f.reason.startswith("registered ") else None
        state.teachers[f.name] = {
            "signature": f.signature,
            "sha256": facts["sha256"],
            "status": "accepted",
            "at": seen.now,
            "registry": reg,
        }
        state.current_teacher = f.path
        state.note("teacher-new", at=seen.now, teacher=f.name, sha256=facts["sha256"])
        actions.append(DistilTeacher(f.name, f.path, facts["sha256"], facts.get("params"), reg))
    return actions


def teacher_distilled(state: WatchState, name: str, result: dict) -> None:
    """Record the cycle a new teacher started."""
    state.teachers[name]["decision"] = result


def _batch(state: WatchState, seen: BatchTested) -> list:
    f, report = seen.finding, seen.report
    if report.get("error"):  # not drift: nothing about the distribution was measured, so no episode opens
        reason = "; ".join(report["reasons"])
        state.batches[f.name] = {"signature": f.signature, "status": "bad", "reason": reason, "at": seen.now}
        state.note("batch-refused", at=seen.now, batch=f.name, reason=reason)
        return [RefuseBatch(f.name, f.path, reason)]
    action = on_batch(state, f.name, report["drifted"], seen.now, seen.clear_batches, seen.cooldown_hours)
    entry = {
        "batch": f.name,
        "drifted": report["drifted"],
        "action": action,
        "reasons": report["reasons"],
        "mmd_p": report.get("mmd_p"),
    }
    actions = [RecordDrift(f.name, report)]
    if report["drifted"]:
        actions.append(EmitDrift(f.name, report["reasons"], report.get("mmd_p"), action))
    if action == "act":
        actions.append(CheckChampion(f.name, f.path, report))
    return actions + [SaveBatch(f.name, {"signature": f.signature, **entry, "at": seen.now})]


def batch_done(state: WatchState, a: SaveBatch, outcome: dict | None) -> dict:
    """Record a tested batch with the `outcome` of its action (None: it needed none); returns its report entry."""
    entry = {k: v for k, v in a.record.items() if k not in ("signature", "at")}
    if outcome is not None:
        entry["outcome"] = outcome
    state.batches[a.name] = {"signature": a.record["signature"], **entry, "at": a.record["at"]}
    return entry


def _champion(state: WatchState, seen: ChampionChecked) -> list:
    ep = state.episode
    if seen.fit is not None and seen.fit["passed"]:
        ep.action = "champion still fit"
        return [KeepChampion(seen.batch, seen.fit)]
    fit = seen.fit
    why = "no champion yet" if fit is None else f"champion v{fit['version']} no longer fit: {fit['reasons']}"
    return [Redistill(seen.batch, seen.path, seen.report, why)]


def redistill_stopped(state: WatchState, reason: str) -> None:
    """The representative set could not be grown: the episode says why, and nothing was distilled."""
    state.episode.action = f"stopped: {reason}"


def redistilled(state: WatchState, data: str, result: dict, now: float) -> None:
    """Record a re-distillation on the grown set `data`: it starts the cooldown and becomes the current data."""
    state.last_redistill_at = now
    state.current_data = data
    state.episode.action = f"re-distilled: {result['decision']}"


def fit_verdict(checks) -> tuple[bool, str]:
    """Whether the champion is still fit (every absolute gate check passes) and the checks as one line."""
    absolute = [c for c in checks if c.kind == "absolute"]
    reasons = "; ".join(
        f"{'pass' if c.passed else 'FAIL'} {c.name} {c.value if c.value is None else round(c.value, 4)} "
        f"{c.op} {c.bound}"
        for c in absolute
    )
    return all(c.passed for c in absolute), reasons


# ---------------------------------------------------------------------------------------------------
# Drift episodes: hysteresis and cooldown
# ---------------------------------------------------------------------------------------------------


def on_batch(
    state: WatchState, batch: str, drifted: bool, now: float, clear_batches: int, cooldown_hours: float
) -> str:
    """Update the drift episode for one tested batch; returns what to do about it.

    - "none": no drift (a clean batch; `clear_batches` clean batches in a row close an open episode);
    - "act": a new episode opened: re-check the champion, re-distil if it is no longer fit;
    - "absorbed": drift inside an open episode, which has already acted (one episode, one re-distillation);
    - "deferred": a new episode inside the cooldown after the last re-distillation; it acts once the
      cooldown has passed (`due_episode`).
    """
    ep = state.episode
    if not drifted:
        if ep:
            ep.clean_streak += 1
            if ep.clean_streak >= clear_batches:
                state.note("episode-closed", at=now, episode=ep.id, batches=ep.batches)
                state.episode = None
        return "none"
    if ep:
        ep.clean_streak = 0
        ep.batches.append(batch)
        return "absorbed"
    state.episode = Episode(id=batch, opened_at=now, batches=[batch])
    state.note("episode-opened", at=now, episode=batch)
    last = state.last_redistill_at
    if last is not None and now - float(last) < cooldown_hours * 3600:
        state.episode.deferred = True
        return "deferred"
    return "act"


def due_episode(state: WatchState | dict, now: float, cooldown_hours: float) -> Episode | None:
    """A deferred episode whose cooldown is over, or None (`state` typed, or the plain dict the file holds)."""
    state = WatchState.of(state)
    ep, last = state.episode, state.last_redistill_at
    if ep and ep.deferred and (last is None or now - float(last) >= cooldown_hours * 3600):
        return ep
    return None
