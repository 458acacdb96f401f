"""Concurrency under load (`make trials`): 5 `redistill cycle` processes with the same inputs, 5 with
different inputs, a `redistill watch --once` that finds a new teacher, and the nightly flow, all started
together on one workspace and its SQLite tracking store.

What a user relies on:
- one distillation per key: of the processes that share a key, exactly one distils and registers, the
  others return its decision (deduplicated);
- every decision registered once: one registry version per key, and no run left RUNNING;
- no SQLite "database is locked" (or any other) failure reaching the user: every process exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from helpers import LENIENT_GATE, TINY_CYCLE, tiny_trial_workspace, trial_env
from redistill.registry.client import PREFIX, client

pytestmark = [pytest.mark.trials, pytest.mark.long]  # minutes of 12 processes: `make trials-long`
NAME = "digits-student"


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory):
    root = tiny_trial_workspace(digits_ws, tmp_path_factory.mktemp("loadws"))
    (root / "params.yaml").write_text(
        TINY_CYCLE + "teacher: {name: tiny}\nwatch: {settle_seconds: 0.0}\n" + LENIENT_GATE
    )
    return root


def test_five_same_five_different_a_watch_and_the_nightly_at_once(ws):
    from helpers import make_tiny_pipeline

    redistill = [sys.executable, "-m", "redistill"]
    commands = {}
    for i in range(5):  # the same inputs: the workspace's params.yaml, which the nightly run reads too
        commands[f"same{i}"] = redistill + ["cycle", "--workspace", str(ws), "--json"]
    for i in range(5):  # different inputs: another seed, so another key
        p = ws / f"different{i}.yaml"
        p.write_text((ws / "params.yaml").read_text().replace("distill: {", f"distill: {{seed: {100 + i}, "))
        commands[f"different{i}"] = redistill + ["cycle", "--workspace", str(ws), "--params", str(p), "--json"]
    make_tiny_pipeline(ws / "data" / "teachers" / "tiny-v2", seed=7)  # the watch finds a new teacher and distils it
    commands["watch"] = redistill + ["watch", "--once", "--workspace", str(ws), "--json"]
    commands["nightly"] = [
        sys.executable,
        "-c",
        "import json, sys; from redistill.flows.cycle import nightly; "
        "print(json.dumps(nightly(workspace_dir=sys.argv[1]), default=str))",
        str(ws),
    ]

    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trial_env())
        for name, cmd in commands.items()
    }
    results, failures = {}, []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0 or "database is locked" in err:
            failures.append(f"{name} exited {proc.returncode}:\n{err[-2500:]}")
            continue
        results[name] = json.loads(out.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)

    decisions = [results[n] for n in results if n.startswith(("same", "different"))] + [results["nightly"]]
    teachers = results["watch"].get("teachers", [])
    assert any(t["teacher"] == "tiny-v2" and t["status"] == "new" and t.get("cycle") for t in teachers), teachers
    decisions += [t["cycle"] for t in teachers if t.get("cycle")]
    by_key = Counter(d["key"] for d in decisions)
    distilled = Counter(d["key"] for d in decisions if not d["deduplicated"])
    assert set(distilled) == set(by_key) and set(distilled.values()) == {1}, distilled  # one distillation per key
    assert len({results[f"same{i}"]["key"] for i in range(5)}) == 1
    assert len({results[f"different{i}"]["key"] for i in range(5)}) == 5

    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    for key in by_key:  # every decision registered once
        assert len(c.search_model_versions(f"name='{NAME}' and tags.`{PREFIX}key`='{key}'")) == 1, key
    versions = {d["version"] for d in decisions}
    assert len(versions) == len(by_key)
    exp = c.get_experiment_by_name("redistill")
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    import helpers

    helpers.SUMMARY_LINES.append(
        f"load: {len(procs)} processes at once, {len(by_key)} keys, "
        f"{sum(distilled.values())} distillations, {len(versions)} versions, 0 failures"
    )
