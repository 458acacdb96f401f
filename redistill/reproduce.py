"""Rebuild a registered student from its recorded lineage alone, and compare the figures.

The teacher is found by its sha256, the data by its DVC md5 (the recorded folder if it still hashes the
same, else the DVC cache or a local DVC remote), the settings from the run's `params.json`. Then the
distillation and the evaluation run again, and each figure is set next to its recorded value: inside or
outside the recorded bootstrap CI where one was recorded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable


class ReproduceError(RuntimeError):
    """A needed input is no longer retrievable; the message says which and where it was looked for."""


def locate_teacher(root: Path, uri: str | None, sha: str) -> Path:
    from redistill.teacher import pipeline_sha256

    candidates = [Path(uri)] if uri else []
    teachers = Path(root) / "data" / "teachers"
    if teachers.is_dir():
        candidates += sorted(p for p in teachers.iterdir() if p.is_dir())
    for p in candidates:
        if (p / "model_index.json").is_file() and pipeline_sha256(p) == sha:
            return p
    raise ReproduceError(f"the teacher with sha256 {sha} is gone: not at {uri}, and no folder under {teachers} "
                         "has those bytes. Put the teacher checkpoint back (any folder name under data/teachers/)")


def _dvc_remotes(root: Path) -> list[Path]:
    """Local-path DVC remotes of the workspace (their layout is the cache's)."""
    from redistill.lineage import dvc_exe

    try:
        out = subprocess.run([dvc_exe(), "remote", "list"], cwd=root, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    remotes = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1]:
            p = Path(parts[1])
            remotes.append(p if p.is_absolute() else (Path(root) / ".dvc" / p).resolve())
    return remotes


def locate_data(root: Path, uri: str | None, md5: str, work: Path) -> tuple[Path, str]:
    """The data folder with DVC md5 `md5`: (path, where it came from)."""
    from redistill.data import dir_md5

    if uri and Path(uri).is_dir() and dir_md5(Path(uri)) == md5:
        return Path(uri), "recorded folder (unchanged)"
    if not md5.endswith(".dir"):
        raise ReproduceError(f"data md5 {md5} is not a DVC directory hash")
    digest = md5.removesuffix(".dir")
    stores = [(Path(root) / ".dvc" / "cache", "DVC cache")] + [(r, f"DVC remote {r}") for r in _dvc_remotes(root)]
    for store, label in stores:
        obj = lambda h: store / "files" / "md5" / h[:2] / h[2:]  # noqa: E731  (DVC 3 layout)
        manifest = obj(digest).with_name(digest[2:] + ".dir")
        if not manifest.is_file():
            continue
        entries = json.loads(manifest.read_text())
        if not all(obj(e["md5"]).is_file() for e in entries):
            continue
        out = Path(work) / "data"
        if out.exists():
            shutil.rmtree(out)
        for e in entries:
            dest = out / e["relpath"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(obj(e["md5"]), dest)
        if dir_md5(out) != md5:
            raise ReproduceError(f"the files restored from the {label} hash to {dir_md5(out)}, not {md5}")
        return out, label
    raise ReproduceError(
        f"the data with DVC md5 {md5} is not retrievable: {uri} now holds different files (or is gone), and "
        f"neither the DVC cache ({Path(root) / '.dvc' / 'cache'}) nor a local DVC remote has it. "
        "Restore it with `dvc pull` / `dvc checkout` from the commit that made it, then run reproduce again"
    )


def compare(recorded: dict, new: dict) -> list[dict]:
    """Each figure next to its recorded value; CI membership where a CI was recorded."""
    rows = []
    rq, nq = recorded.get("quality", {}), new["quality"]
    for name, ci in (("fid", "fid_ci95"), ("kid", "kid_ci95")):
        lo, hi = rq[ci]
        rows.append({"metric": name, "recorded": rq[name], "new": nq[name], "recorded_ci95": [lo, hi],
                     "within_ci": lo <= nq[name] <= hi})
    pairs = [("fid_ratio", rq.get("fid_ratio"), nq.get("fid_ratio")),
             ("recognisable_share", rq.get("recognisable_share"), nq.get("recognisable_share")),
             ("psnr_db", recorded.get("fidelity", {}).get("psnr_db"), new["fidelity"]["psnr_db"]),
             ("ssim", recorded.get("fidelity", {}).get("ssim"), new["fidelity"]["ssim"]),
             ("speedup_throughput", recorded.get("speed", {}).get("speedup_throughput"), new["speed"]["speedup_throughput"])]
    for name, old, cur in pairs:
        rows.append({"metric": name, "recorded": old, "new": cur, "recorded_ci95": None, "within_ci": None})
    return rows


def reproduce(c, name: str, mv, root: Path, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Re-run the version's distillation and evaluation from its lineage; returns the comparison."""
    import time

    import torch

    from redistill.config import ConfigError, parse_params
    from redistill.data import load_image_folder
    from redistill.lineage import artifact_json, code_version
    from redistill.methods import distill
    from redistill.metrics import evaluate_student
    from redistill.teacher import load_pipeline, save_pipeline

    t0 = time.perf_counter()
    tag = lambda k: mv.tags.get("redistill." + k)  # noqa: E731
    raw = artifact_json(c, mv.run_id, "params.json")
    recorded = artifact_json(c, mv.run_id, "evaluation/metrics.json")
    if raw is None or recorded is None:
        raise ReproduceError(f"version {mv.version}'s run {mv.run_id} has no params.json or evaluation/metrics.json; "
                             "it predates reproducible runs or stopped before evaluation")
    try:
        p = parse_params(raw)
    except ConfigError as e:
        raise ReproduceError(f"the recorded settings no longer parse with this code: {e}") from e
    teacher = locate_teacher(root, tag("teacher_uri"), tag("teacher_sha256"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, source = locate_data(root, tag("data_uri"), tag("data_md5"), out_dir)
    log(f"teacher {teacher} (sha256 matches); data {data} ({source}); settings from the run's params.json")
    code_now = code_version()
    code_then = (tag("git_commit") or "").removesuffix("-dirty")
    images = load_image_folder(data)
    student_dir = out_dir / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    student, summary = distill(p.distill, load_pipeline(teacher), torch.from_numpy(images.images),
                               out_dir / "checkpoints", log=log, teacher_path=teacher, workspace=root)
    save_pipeline(student, student_dir, extra={"redistill_distill.json": summary})
    new = evaluate_student(student_dir, p.distill.target_steps, teacher, data, Path(root) / "data" / "features", p,
                           out_dir / "evaluation", log=log)
    rows = compare(recorded, new)
    result = {"model": name, "version": str(mv.version), "teacher": str(teacher), "data": str(data),
              "data_source": source, "code_then": code_then, "code_now": code_now["git_commit"],
              "same_code": code_then == code_now["git_commit"], "rows": rows,
              "all_within_ci": all(r["within_ci"] for r in rows if r["within_ci"] is not None),
              "wall_time_s": round(time.perf_counter() - t0, 1), "out_dir": str(out_dir)}
    (out_dir / "reproduce.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
