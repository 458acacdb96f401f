"""kill -9 at every stage of a cycle, then the same command again (`make trials`; about 10 minutes).

Each trial SIGKILLs a real `redistill cycle` process at one stage: through a failpoint
(redistill/failpoints.py) at the boundaries, or when the distillation's first checkpoint appears. Then it
runs the same command again and checks what a user relies on:
- exactly one registry version for the key;
- `champion` passed its gate, and `previous` is the champion from before (when the new version was promoted);
- no MLflow run left RUNNING: the killed one is closed as KILLED with the reason;
- no Prefect server left behind by the killed process.
The module prints "kill -9: N/N recovered".
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LENIENT_GATE, TINY_CYCLE, UNMEETABLE_GAP, tiny_trial_workspace, trial_env
from redistill.registry.client import PREFIX, alias, client

pytestmark = pytest.mark.trials
NAME = "digits-student"
# (stage, gate): the failpoints in the order a cycle reaches them, a kill mid-distillation, then the
# registry stages again with a champion in place (previous moves) and once for a rejected student
TRIALS = [
    ("run-opened", "lenient"),
    ("validated", "lenient"),
    ("mid-distillation", "lenient"),
    ("distilled", "lenient"),
    ("evaluated", "lenient"),
    ("version-created", "lenient"),
    ("previous-moved", "lenient"),
    ("champion-moved", "lenient"),
    ("version-created", "strict"),
    ("evaluated", "strict"),
    ("previous-moved", "lenient"),
    ("champion-moved", "lenient"),
]
RECOVERED: list[str] = []


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory):
    yield tiny_trial_workspace(digits_ws, tmp_path_factory.mktemp("killws"))
    import helpers

    helpers.SUMMARY_LINES.append(f"kill -9: {len(RECOVERED)}/{len(TRIALS)} recovered")


def _servers() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"prefect.server.api.server" in cmd and state != "Z":
                out.add(int(d.name))
    return out


@pytest.mark.parametrize("trial", range(len(TRIALS)))
def test_kill_9_then_run_again(ws, trial):
    stage, gate = TRIALS[trial]
    params = ws / f"trial{trial}.yaml"
    slow = stage == "mid-distillation"
    cycle = TINY_CYCLE.replace("distill: {", f"distill: {{seed: {trial}, ")  # a new key per trial
    if slow:
        cycle = cycle.replace("steps_per_round: 3", "steps_per_round: 1500").replace(
            "checkpoint_every: 2", "checkpoint_every: 50"
        )
    lenient = LENIENT_GATE if gate == "lenient" else LENIENT_GATE.replace("fid_gap_max: 1000000000.0", UNMEETABLE_GAP)
    params.write_text(cycle + "teacher: {name: tiny}\n" + lenient)
    cmd = [sys.executable, "-m", "redistill", "cycle", "--workspace", str(ws), "--params", str(params), "--json"]
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    champion_before = getattr(alias(c, NAME, "champion"), "version", None) if (ws / "mlflow.db").exists() else None
    servers_before = _servers()

    if slow:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=trial_env())
        deadline = time.time() + 300
        while (
            time.time() < deadline
            and proc.poll() is None
            and not list((ws / "runs" / "cycles").glob("*/checkpoints/*/meta.json"))
        ):
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=trial_env(REDISTILL_KILL_AT=stage), timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"{stage}: the cycle was not killed there (exit {proc.returncode})"
    if slow:
        for ckpt in (ws / "runs" / "cycles").glob("*/checkpoints"):  # later trials must not see this one's
            shutil.move(str(ckpt), str(ckpt) + f"-killed{trial}")

    again = subprocess.run(cmd, capture_output=True, text=True, env=trial_env(), timeout=900)
    assert again.returncode == 0, f"{stage}: the rerun failed\n{again.stderr[-3000:]}"
    out = json.loads(again.stdout.strip().splitlines()[-1])

    mine = c.search_model_versions(f"name='{NAME}' and tags.`{PREFIX}key`='{out['key']}'")
    assert len(mine) == 1, f"{stage}: {len(mine)} versions for one key"
    champ, prev = alias(c, NAME, "champion"), alias(c, NAME, "previous")
    if gate == "lenient":
        assert out["decision"] == "promoted" and champ is not None and str(champ.version) == str(mine[0].version)
        if champion_before is not None and str(champion_before) != str(champ.version):
            assert prev is not None and str(prev.version) == str(champion_before), (
                f"{stage}: previous is not the old champion"
            )
    else:
        assert out["decision"] == "rejected"
        assert getattr(champ, "version", None) == champion_before, f"{stage}: a rejected student moved champion"
    assert champ is None or c.get_model_version(NAME, champ.version).tags[PREFIX + "gate"] == "passed"
    exp = c.get_experiment_by_name("redistill")
    running = c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, f"{stage}: runs left RUNNING: {[r.info.run_id for r in running]}"
    killed = c.search_runs([exp.experiment_id], f"tags.`{PREFIX}key` = '{out['key']}' and attributes.status = 'KILLED'")
    assert len(killed) == 1 and "died before it finished" in killed[0].data.tags[PREFIX + "failure"], (
        f"{stage}: the killed run was not closed with its reason"
    )
    deadline = time.time() + 20
    while time.time() < deadline and _servers() - servers_before:
        time.sleep(0.2)
    assert not _servers() - servers_before, f"{stage}: a Prefect server outlived its killed cycle"
    RECOVERED.append(f"{trial}:{stage}")
