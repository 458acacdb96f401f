"""Multi-process distillation (`accelerate launch`, gloo on these CPUs): two processes follow one process with the
same global batch, a killed two-process run resumes to the same student as an unbroken one, only the main process
writes, and a cycle with `distill.num_processes: 2` registers its student. Real processes, real gloo, real models.

Tolerance: AdamW divides each step by the gradient's own running scale, so the float rounding by which two halves'
mean gradient differs from the whole batch's (~1e-6 relative, as SGD shows) moves weights whose gradient is near 0
by up to a full step. The test bounds the distance between the one- and two-process students by 5% of how far
training moved the weights (measured: 0.2% to 1.0%), and checks that another seed lands far outside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LENIENT_GATE, REPO, TINY_CYCLE

TOLERANCE = 0.05  # ‖w(2 processes) − w(1 process)‖ / ‖w(1 process) − w(teacher)‖, every method

# Installed as sitecustomize in every process of a run: the processes other than the main one (RANK > 0) record
# each file they open for writing, create, rename or delete under the watched folder.
AUDIT = """
import atexit, os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_WATCH"):
    _watch, _seen = os.path.realpath(os.environ["AUDIT_WATCH"]), []
    def _under(p):
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(_watch)
        except (TypeError, ValueError):
            return False
    def _hook(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and _under(args[0]):
                _seen.append(f"open {args[0]} {mode or flags}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and _under(args[0]):
            _seen.append(f"{event} {args[0]}")
    def _report():
        with open(os.environ["AUDIT_OUT"] + "." + os.environ["RANK"], "w") as f:
            f.write("\\n".join(_seen))
    atexit.register(_report)
    sys.addaudithook(_hook)
"""


def _env(tmp_path: Path, watch: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    if watch is not None:
        site = tmp_path / "audit-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(AUDIT)
        env.update(
            PYTHONPATH=os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]),
            AUDIT_WATCH=str(watch),
            AUDIT_OUT=str(tmp_path / "audit"),
        )
    return env


def _audited(tmp_path: Path) -> dict[str, str]:
    """What each non-main process wrote under the watched folder (one report per process that ran)."""
    return {p.name: p.read_text() for p in tmp_path.glob("audit.*")}


def _launch(n: int) -> list[str]:
    from redistill.ops.launch import launch_command

    return launch_command(n) if n > 1 else [sys.executable]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f.stem: load_file(f) for f in folder.glob("*.safetensors")}


def _distance(a: dict, b: dict, keys) -> float:
    return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in keys) ** 0.5


def test_settings_refuse_a_global_batch_that_does_not_split():
    from redistill.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="multiple of 3"):
        parse_params({"distill": {"batch_size": 8, "num_processes": 3}})
    with pytest.raises(ConfigError, match="at least 1"):
        parse_params({"distill": {"num_processes": 0}})
    assert parse_params({"distill": {"batch_size": 8, "num_processes": 2}}).distill.num_processes == 2


@pytest.mark.trials
def test_two_processes_follow_one_with_the_same_global_batch_for_every_method(digits_ws, tmp_path):
    from helpers import make_tiny_pipeline
    from redistill.models.pipelines import load_pipeline

    teacher = make_tiny_pipeline(tmp_path / "teacher")
    data = digits_ws / "data" / "reference"
    runs = {}
    for name, n, seed in (("one", 1, "0"), ("two", 2, "0"), ("other-seed", 1, "1")):
        ws = tmp_path / name  # own workspace: each run makes its own pair caches (the two-process one: its main)
        env = _env(tmp_path, watch=ws if n > 1 else None)
        env["JOB_SEED"] = seed
        r = subprocess.run(
            _launch(n)
            + [
                str(REPO / "tests" / "methods" / "multiprocess_job.py"),
                str(teacher),
                str(data),
                str(ws),
                str(ws / "out"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert json.loads((ws / "out" / "summaries.json").read_text())["processes"] == n
        runs[name] = _weights(ws / "out")
    start = load_pipeline(teacher).unet.state_dict()
    assert set(runs["one"]) == {"progressive", "consistency", "output", "adversarial", "dmd", "rectified"}
    for method, one in runs["one"].items():
        keys = [k for k in one if k in start and start[k].shape == one[k].shape]
        moved = _distance(one, start, keys)
        apart = _distance(runs["two"][method], one, keys) / moved
        other = _distance(runs["other-seed"][method], one, keys) / moved
        print(f"{method}: moved {moved:.3f}; two processes {apart:.4f} of it, another seed {other:.3f}")
        assert moved > 0 and apart < TOLERANCE, method
        assert other > 4 * TOLERANCE, method  # a different batch lands far outside the tolerance
    # the process that is not the main one ran, and wrote nothing: no checkpoint, pair cache or reflowed flow
    audit = _audited(tmp_path)
    assert list(audit) == ["audit.1"] and audit["audit.1"] == ""
    # the main process's caches: a pixel teacher's pairs are draws in the workspace's sample store
    assert list((tmp_path / "two" / "data" / "samples").glob("*.safetensors"))


@pytest.mark.trials
def test_a_killed_two_process_distillation_resumes_to_the_unbroken_student(digits_ws, tmp_path):
    """`redistill distill` with distill.num_processes: 2 starts its own `accelerate launch`. SIGKILL of the command
    takes its processes with it; the rerun resumes from the checkpoint and gives the unbroken run's student."""
    from helpers import make_tiny_pipeline

    def workspace(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(digits_ws / "data" / "reference", root / "data" / "reference")
        make_tiny_pipeline(root / "data" / "teachers" / "tiny")
        (root / "params.yaml").write_text(
            "teacher: {name: tiny}\n"
            "distill: {method: consistency, target_steps: 2, batch_size: 8, lr: 0.001, checkpoint_every: 5,\n"
            "          num_processes: 2, consistency: {steps: 60}}\n"
        )
        return root

    def distill(root: Path, env: dict) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "redistill", "distill", "--workspace", str(root), "--out", str(root / "student")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    unbroken = workspace("unbroken")
    proc = distill(unbroken, _env(tmp_path, watch=unbroken))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "2 processes" in out and err.count("distilling on 2 processes") == 1
    audit = _audited(tmp_path)
    assert list(audit) == ["audit.1"] and audit["audit.1"] == "", audit  # rank 1 wrote no checkpoint, log or student
    assert json.loads((unbroken / "student" / "redistill_distill.json").read_text())["num_processes"] == 2

    killed = workspace("killed")
    env = _env(tmp_path)
    proc = distill(killed, env)
    deadline = time.time() + 300
    ckpts = killed / "runs" / "distill" / "student" / "checkpoints"
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("*/meta.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the command only: its launcher and the two processes must follow
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; raise consistency.steps"
    deadline = time.time() + 30
    while time.time() < deadline and _session(proc.pid):
        time.sleep(0.2)
    assert not _session(proc.pid), "processes of the killed distillation are still running"
    assert not (killed / "student").exists()

    proc = distill(killed, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from checkpoint-00-" in err
    a, b = _weights(unbroken / "student" / "unet"), _weights(killed / "student" / "unet")
    for name in a:
        for k in a[name]:
            assert float((a[name][k] - b[name][k]).abs().max()) <= 1e-6, k


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    r = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True)
    return [
        int(pid)
        for pid, s, stat in (line.split()[:3] for line in r.stdout.splitlines())
        if int(s) == sid and not stat.startswith("Z")
    ]


@pytest.mark.trials
def test_a_cycle_distils_on_two_processes_and_registers_from_its_own(digits_ws, tmp_path, prefect_harness):
    from typer.testing import CliRunner

    from helpers import make_tiny_pipeline
    from redistill.cli import app
    from redistill.registry.client import PREFIX, client, tracking_uri

    root = tmp_path / "ws"
    shutil.copytree(digits_ws / "data", root / "data")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(
        TINY_CYCLE.replace("batch_size: 8,", "batch_size: 8, num_processes: 2,")
        + LENIENT_GATE
        + "teacher: {name: tiny}\n"
    )
    r = CliRunner().invoke(app, ["cycle", "--workspace", str(root), "--json"])
    assert r.exit_code == 0, r.output[-3000:]
    decision = json.loads(r.stdout.strip().splitlines()[-1])
    assert decision["decision"] == "promoted" and decision["distill"]["num_processes"] == 2
    c = client(tracking_uri(root))
    (mv,) = c.search_model_versions("name='digits-student'")
    run = c.get_run(mv.run_id)
    assert run.data.params.get("distill.num_processes") == "2" and mv.tags[PREFIX + "gate"] == "passed"
