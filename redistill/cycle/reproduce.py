"""Rebuild a registered student from its recorded lineage alone, and compare the figures.

The teacher is found by its sha256, the data by its DVC md5 (the recorded folder if it still hashes the
same, else restored with DVC's command line, `dvc checkout` of a temporary `.dvc` file naming that md5: from
the DVC cache, or after `dvc fetch -r NAME` from any configured DVC remote), the settings from the run's
`params.json`. Then the distillation and the evaluation run again, and each
figure is set next to its recorded value: inside or outside the recorded bootstrap CI where one was recorded.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path


class ReproduceError(RuntimeError):
    """A needed input is no longer retrievable; the message says which and where it was looked for."""


def locate_teacher(root: Path, uri: str | None, sha: str) -> Path:
    from redistill.models.pipelines import pipeline_sha256

    candidates = [Path(uri)] if uri else []
    teachers = Path(root) / "data" / "teachers"
    if teachers.is_dir():
        candidates += sorted(p for p in teachers.iterdir() if p.is_dir())
    for p in candidates:
        if (p / "model_index.json").is_file() and pipeline_sha256(p) == sha:
            return p
    raise ReproduceError(
        f"the teacher with sha256 {sha} is gone: not at {uri}, and no folder under {teachers} "
        "has those bytes. Put the teacher checkpoint back (any folder name under data/teachers/)"
    )


DVC_TIMEOUT_S = 3600  # one `dvc fetch` / `dvc checkout` of a data folder; the listings take seconds


def _dvc(root: Path, *args: str, timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the `dvc` command line in the workspace, output captured; ReproduceError when it cannot run at all."""
    import os

    from redistill.registry.lineage import dvc_exe

    cmd = [dvc_exe(), *args]
    try:
        return subprocess.run(
            cmd,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        )
    except subprocess.TimeoutExpired:
        raise ReproduceError(
            f"`dvc {' '.join(args)}` in {root} ran past {timeout:.0f} s and was stopped; run it by "
            "hand to see why (an unreachable remote, or a very large folder), then run reproduce "
            "again"
        ) from None
    except OSError as e:
        raise ReproduceError(
            f"cannot run DVC ({cmd[0]}): {e}. Install it in this environment (`pip install dvc`), "
            "then run reproduce again"
        ) from e


def _dvc_error(r: subprocess.CompletedProcess) -> str:
    """The first error (else warning) line DVC printed, for a one-line report."""
    lines = [ln.strip() for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
    for prefix in ("ERROR:", "WARNING:"):
        for ln in lines:
            if ln.startswith(prefix):
                return ln[:200]
    return lines[0][:200] if lines else f"exit status {r.returncode}"


def _dvc_remotes(root: Path) -> list[tuple[str, str]]:
    """The configured DVC remotes as (name, url), the default first, as `dvc pull` would use them."""
    r = _dvc(root, "remote", "list", timeout=120)
    if r.returncode != 0:
        raise ReproduceError(
            f"`dvc remote list` failed in {root}: {_dvc_error(r)}. Fix the DVC configuration "
            "(`dvc doctor` shows the setup), then run reproduce again"
        )
    remotes = []
    for line in r.stdout.splitlines():  # "NAME   URL   (default)", columns padded with spaces
        m = re.match(r"^(\S+)\s+(.*?)(?:\s+\(default\))?\s*$", line)
        if m:
            remotes.append((m.group(1), m.group(2)))
    d = _dvc(root, "remote", "default", timeout=120)
    default = d.stdout.strip() if d.returncode == 0 else None
    return sorted(remotes, key=lambda nu: nu[0] != default)  # stable: the others keep DVC's order


def _restore_with_dvc(root: Path, md5: str, out: Path) -> tuple[str | None, list[str]]:
    """Restore the DVC directory object `md5` into `out` with DVC's command line, the documented way to get
    an object by its hash: a temporary `.dvc` file naming it, in a temporary folder inside the workspace,
    then `dvc checkout` of it (from the cache), else `dvc fetch -r NAME` + `dvc checkout` for each configured
    remote, the default first. The temporary folder (its `.dvc` file, the `.gitignore` DVC may write there,
    what was checked out) is removed whatever happens.

    Returns (where it came from, or None when nowhere had it; what was tried, one line each).
    """
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".redistill-restore-", dir=root))
    try:
        dvc_file, restored = tmp / "data.dvc", tmp / "data"
        target = str(dvc_file.relative_to(root))

        def write(remote: str | None) -> None:
            # what `dvc add` writes for a directory, less size/nfiles (optional). `remote:` pins the out to the
            # remote being tried: DVC sets up the out's remote even for a checkout, and a default remote whose
            # plugin is not installed (s3 without dvc-s3) would fail it
            dvc_file.write_text(
                f"outs:\n- md5: {md5}\n  path: data\n  hash: md5\n"
                + (f"  remote: {json.dumps(remote)}\n" if remote else "")
            )

        def checkout() -> subprocess.CompletedProcess:
            shutil.rmtree(restored, ignore_errors=True)  # nothing half checked out from an earlier try
            return _dvc(root, "checkout", "--force", target)

        def lacking(r: subprocess.CompletedProcess) -> bool:  # DVC said some objects are not there
            return any(s in r.stderr for s in ("Checkout failed", "do not exist", "Missing cache files"))

        tried: list[str] = []
        write(None)
        r = checkout()
        if r.returncode == 0 and restored.is_dir():
            source = "DVC cache"
        else:
            source = None
            c = _dvc(root, "cache", "dir", timeout=120)
            where = c.stdout.strip() if c.returncode == 0 and c.stdout.strip() else str(root / ".dvc" / "cache")
            cache_known = lacking(r)  # else the checkout failed before looking (e.g. the default remote unusable)
            tried.append(
                f"DVC cache {where}: "
                + (
                    "not every file of that directory is there"
                    if cache_known
                    else f"`dvc checkout` failed: {_dvc_error(r)}"
                )
            )
            remotes = _dvc_remotes(root)
            if not remotes:
                tried.append("no DVC remote is configured (`dvc remote list` is empty)")
            for name, url in remotes:
                write(name)
                if not cache_known:
                    r = checkout()
                    if r.returncode == 0 and restored.is_dir():
                        source = "DVC cache"
                        break
                    if lacking(r):  # the cache was looked in this time: say so instead of the earlier failure
                        cache_known, tried[0] = True, f"DVC cache {where}: not every file of that directory is there"
                label = f"DVC remote {name!r} ({url})"
                f = _dvc(root, "fetch", "-r", name, target)  # remote → cache; fetches only what the cache lacks
                r = checkout()
                if r.returncode == 0 and restored.is_dir():
                    source = label
                    break
                why = (
                    f"`dvc fetch` failed: {_dvc_error(f)}"
                    if f.returncode != 0
                    else "not every file of that directory is there"
                    if lacking(f)
                    else f"`dvc checkout` failed after `dvc fetch`: {_dvc_error(r)}"
                )
                tried.append(f"{label}: {why}")
        if source is None:
            return None, tried
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(restored), str(out))  # a rename on the same disk: links into the cache stay links
        return source, tried
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def locate_data(root: Path, uri: str | None, md5: str, work: Path) -> tuple[Path, str]:
    """The data folder with DVC md5 `md5`: (path, where it came from).

    The recorded folder when it still hashes the same; else DVC's command line checks the directory object
    out into `work/data`, from its cache or fetched from a configured remote, and the result must hash to `md5`.
    """
    from redistill.data.images import dir_md5

    if uri and Path(uri).is_dir() and dir_md5(Path(uri)) == md5:
        return Path(uri), "recorded folder (unchanged)"
    if not md5.endswith(".dir"):
        raise ReproduceError(f"data md5 {md5} is not a DVC directory hash")
    recorded = f"{uri} now holds different files (or is gone)" if uri else "no data folder was recorded"
    if not (Path(root) / ".dvc").is_dir():
        raise ReproduceError(
            f"the data with DVC md5 {md5} is not retrievable: {recorded}, and {root} is not a DVC "
            "repository (no .dvc/), so DVC has no cache or remote to restore it from. Run reproduce "
            "in the workspace that versioned the data, or put the folder back at the recorded path"
        )
    out = Path(work) / "data"
    try:
        source, tried = _restore_with_dvc(Path(root), md5, out)
    except OSError as e:  # the workspace not writable (the temporary .dvc file), the output folder not movable
        raise ReproduceError(
            f"could not restore the data with DVC md5 {md5} in {root}: {e}. Make the workspace "
            "writable, then run reproduce again"
        ) from e
    if source is None:
        raise ReproduceError(
            f"the data with DVC md5 {md5} is not retrievable: {recorded}, and DVC found it nowhere ("
            + "; ".join(tried)
            + "). Add the remote that holds it (`dvc remote add -d NAME URL`) or restore the "
            "cache (`dvc pull` / `dvc checkout` at the commit that versioned it), then run reproduce again"
        )
    if dir_md5(out) != md5:
        raise ReproduceError(
            f"the files restored from the {source} hash to {dir_md5(out)}, not {md5}: that store is "
            "corrupt; push the data again from a good copy (`dvc push`)"
        )
    return out, source


def compare(recorded: dict, new: dict) -> list[dict]:
    """Each figure next to its recorded value; CI membership where a CI was recorded."""
    rows = []
    rq, nq = recorded.get("quality", {}), new["quality"]
    for name, ci in (("fid", "fid_ci95"), ("kid", "kid_ci95")):
        lo, hi = rq[ci]
        rows.append(
            {
                "metric": name,
                "recorded": rq[name],
                "new": nq[name],
                "recorded_ci95": [lo, hi],
                "within_ci": lo <= nq[name] <= hi,
            }
        )
    pairs = [
        ("fid_ratio", rq.get("fid_ratio"), nq.get("fid_ratio")),
        ("recognisable_share", rq.get("recognisable_share"), nq.get("recognisable_share")),
        ("psnr_db", recorded.get("fidelity", {}).get("psnr_db"), new["fidelity"]["psnr_db"]),
        ("ssim", recorded.get("fidelity", {}).get("ssim"), new["fidelity"]["ssim"]),
        ("speedup_throughput", recorded.get("speed", {}).get("speedup_throughput"), new["speed"]["speedup_throughput"]),
    ]
    for name, old, cur in pairs:
        rows.append({"metric": name, "recorded": old, "new": cur, "recorded_ci95": None, "within_ci": None})
    return rows


def reproduce(c, name: str, mv, root: Path, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Re-run the version's distillation and evaluation from its lineage; returns the comparison."""
    import time

    import torch

    from redistill.config import ConfigError, parse_params
    from redistill.data.images import load_image_folder
    from redistill.evaluation.suite import evaluate_student
    from redistill.methods import distill
    from redistill.models.pipelines import load_pipeline, save_pipeline
    from redistill.registry.lineage import artifact_json, code_version

    t0 = time.perf_counter()
    tag = lambda k: mv.tags.get("redistill." + k)  # noqa: E731
    raw = artifact_json(c, mv.run_id, "params.json")
    recorded = artifact_json(c, mv.run_id, "evaluation/metrics.json")
    if raw is None or recorded is None:
        raise ReproduceError(
            f"version {mv.version}'s run {mv.run_id} has no params.json or evaluation/metrics.json; "
            "it predates reproducible runs or stopped before evaluation"
        )
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
    student, summary = distill(
        p.distill,
        load_pipeline(teacher),
        torch.from_numpy(images.images),
        out_dir / "checkpoints",
        log=log,
        teacher_path=teacher,
        workspace=root,
        captions=getattr(images, "captions", None),
    )
    save_pipeline(student, student_dir, extra={"redistill_distill.json": summary})
    new = evaluate_student(
        student_dir,
        p.distill.target_steps,
        teacher,
        data,
        Path(root) / "data" / "features",
        p,
        out_dir / "evaluation",
        log=log,
    )
    rows = compare(recorded, new)
    result = {
        "model": name,
        "version": str(mv.version),
        "teacher": str(teacher),
        "data": str(data),
        "data_source": source,
        "code_then": code_then,
        "code_now": code_now["git_commit"],
        "same_code": code_then == code_now["git_commit"],
        "rows": rows,
        "all_within_ci": all(r["within_ci"] for r in rows if r["within_ci"] is not None),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "out_dir": str(out_dir),
    }
    (out_dir / "reproduce.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
