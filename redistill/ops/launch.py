"""A distillation on several processes, data parallel: `accelerate launch` of this module over one job file.

`distill.num_processes` > 1 makes the cycle's distill task and `redistill distill` call `distill_in_processes`:

1. The job (the `distill` settings, teacher, data, checkpoint folder, warm start, where the student goes) is
   written as JSON beside the checkpoints.
2. `accelerate launch --multi_gpu --num_processes N … -m redistill.ops.launch JOB` starts N processes. They join
   by NCCL on GPUs (one GPU per process) and by gloo where there is none; each runs `redistill.methods.distill`
   on its shard of every global batch (redistill/methods/training.py).
3. Only the main process logs, writes checkpoints and writes the student (with its summary). Nothing here
   touches the registry: the caller registers, in its own process.
4. The launcher runs in its own process group and dies with its caller (PR_SET_PDEATHSIG), as the processes
   die with the launcher, so a killed cycle leaves no training behind; the next run resumes from the
   checkpoints, under any number of processes.

Bad settings or data in the processes come back as a ValueError with the processes' own message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from redistill.core.processes import die_with_parent, die_with_parent_hook
from redistill.ops.servers import free_port, stop_group

ERROR = "error.txt"  # the main process's message for a refused job (bad settings or data)


def distill_in_processes(
    p,
    teacher: Path,
    data: Path,
    ckpt_dir: Path,
    out: Path,
    log: Callable[[str], None] = print,
    workspace: Path | None = None,
    init_student: Path | None = None,
    init_sha256: str = "",
    init_tag: str = "cold",
    summary_name: str = "redistill_distill.json",
) -> dict:
    """Distil on `p.num_processes` processes into the pipeline folder `out`; returns the summary written beside it."""
    n = p.num_processes
    job_dir = Path(ckpt_dir).parent / "launch"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ERROR).unlink(missing_ok=True)
    job = {
        "distill": dataclasses.asdict(p),
        "teacher": str(Path(teacher).resolve()),
        "data": str(Path(data).resolve()),
        "ckpt_dir": str(Path(ckpt_dir).resolve()),
        "out": str(Path(out).resolve()),
        "workspace": str(Path(workspace).resolve()) if workspace is not None else None,
        "init_student": str(init_student) if init_student else None,
        "init_sha256": init_sha256,
        "init_tag": init_tag,
        "summary_name": summary_name,
        "error": str(job_dir / ERROR),
    }
    (job_dir / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    cmd = launch_command(n) + ["-m", "redistill.ops.launch", str(job_dir / "job.json")]
    log(f"distilling on {n} processes: {' '.join(cmd[2:])}")
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_with_parent_hook(),
    )
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log(line)
        rc = proc.wait()
    finally:
        _stop(proc)
    if (job_dir / ERROR).is_file():
        raise ValueError((job_dir / ERROR).read_text().strip())
    if rc != 0 or not (Path(out) / summary_name).is_file():
        raise RuntimeError(f"the distillation on {n} processes failed (exit {rc}); its last lines:\n" + "\n".join(tail))
    return json.loads((Path(out) / summary_name).read_text())


def launch_command(n: int) -> list[str]:
    """`accelerate launch` of N local processes with every choice stated (no config file needed): on a GPU
    machine one GPU each (NCCL); without GPUs, the cores shared out among them (gloo)."""
    import torch

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]  # two launches at once must not share one
    if not torch.cuda.is_available():
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))]
    elif torch.cuda.device_count() < n:
        raise ValueError(
            f"distill.num_processes is {n}, but this machine has {torch.cuda.device_count()} GPU(s): "
            "one process per GPU; lower distill.num_processes"
        )
    return cmd


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher's process group (the launcher and its N processes), if anything of it still runs."""
    stop_group(proc.pid)
    if proc.poll() is None:
        proc.wait(timeout=5)


def main(job_file: str) -> int:
    """One of the N processes: distil on its shard; the main one writes the student and its summary."""
    # die with the launcher: a launcher killed with SIGKILL leaves no process training
    if die_with_parent() and os.getppid() == 1:
        return 1
    import torch

    from redistill.config import parse_params
    from redistill.cycle.warm import load_init
    from redistill.data.base import DataError
    from redistill.data.images import load_image_folder
    from redistill.methods import distill, process_group
    from redistill.models.pipelines import PipelineError, load_pipeline, save_pipeline

    job = json.loads(Path(job_file).read_text())
    n, main_process = process_group()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        p = parse_params({"distill": job["distill"]}).distill
        folder = load_image_folder(Path(job["data"]))
        init = load_init(Path(job["init_student"])) if job.get("init_student") else None
        student, summary = distill(
            p,
            load_pipeline(Path(job["teacher"])),
            torch.from_numpy(folder.images),
            Path(job["ckpt_dir"]),
            log=log,
            teacher_path=Path(job["teacher"]),
            workspace=Path(job["workspace"]) if job.get("workspace") else None,
            init=init,
            init_sha256=job.get("init_sha256", ""),
            captions=getattr(folder, "captions", None),
        )
    except (DataError, PipelineError, ValueError) as e:
        if main_process:
            Path(job["error"]).write_text(str(e) + "\n")
            log(f"error: {e}")
        return 2
    if main_process:
        summary["init"] = job.get("init_tag", summary.get("init", "cold"))
        save_pipeline(student, Path(job["out"]), extra={job["summary_name"]: summary})
        log(f"the main process of {n} wrote the student to {job['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
