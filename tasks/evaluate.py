"""Evaluate the student against the teacher: quality, fidelity, latency and memory in one process."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from redistill.config import Params


@task(name="evaluate-student")
def evaluate_student(
    student: Path, steps: int, teacher: Path, data: Path, features: Path, p: Params, out_dir: Path, cache_dir: Path
) -> dict:
    """The metric suite on the student (its saved scheduler) against the teacher at reference_steps."""
    from redistill.evaluation.suite import evaluate_student as suite

    return suite(student, steps, teacher, data, features, p, out_dir, cache_dir)


@task(name="quality-vs-steps")
def quality_vs_steps(
    result: dict,
    teacher: Path,
    data: Path,
    features: Path,
    p: Params,
    out_dir: Path,
    cache_dir: Path,
    steps: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> dict:
    """The teacher's FID at several step counts of its fast sampler (DDIM; a flow-matching teacher's own Euler) at
    `evaluate.curve_samples` samples each (a report, kept cheap: it decides nothing), cached by teacher bytes, and the
    student's point, as a plot. With curve_samples 0 it draws nothing and returns an empty curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from redistill.data.images import load_image_folder
    from redistill.evaluation import spaces as feature_spaces
    from redistill.evaluation.fid import fid
    from redistill.evaluation.sampling import configure_scheduler, sample_cached
    from redistill.models.pipelines import load_pipeline

    n = p.evaluate.curve_samples
    if n == 0:
        return {
            "teacher_fid_by_steps": {},
            "student_steps": result["steps"],
            "student_fid": result["quality"]["fid"],
            "plot": None,
        }
    space = feature_spaces.load_all(p.evaluate.features, features)[0]  # the primary space: the report's FID
    ext = space.extractor
    real = ext(torch.from_numpy(load_image_folder(data).images)).double()
    pipe = load_pipeline(teacher)
    curve = {}
    ref_steps = result["reference"]["steps"]
    sched = "DDIMScheduler"
    sha = result["reference"]["sha256"]
    for k in sorted(set(steps) | {ref_steps}):  # the reference's point from the first images of its own draw
        sched = configure_scheduler(pipe, k, "auto")
        images, _ = sample_cached(
            pipe, teacher, sched, n, k, p.evaluate.seed, p.evaluate.sample_batch_size, cache_dir, sha256=sha
        )
        curve[k] = fid(real, ext(images).double())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = sorted(curve)
    ax.plot(
        ks, [curve[k] for k in ks], "o-", color="0.4", label=f"teacher ({sched.replace('Scheduler', '')}, {n} samples)"
    )
    ax.plot(
        [result["steps"]],
        [result["quality"]["fid"]],
        "*",
        color="crimson",
        markersize=14,
        label=f"student @ {result['steps']} ({result['num_samples']} samples)",
    )
    lo, hi = result["quality"]["fid_ci95"]
    ax.vlines(result["steps"], lo, hi, color="crimson")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel(f"FID ({space.name} features)")
    ax.set_title("quality against steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quality_vs_steps.png", dpi=90)
    plt.close(fig)
    return {
        "teacher_fid_by_steps": {str(k): v for k, v in curve.items()},
        "student_steps": result["steps"],
        "student_fid": result["quality"]["fid"],
        "plot": str(out_dir / "quality_vs_steps.png"),
    }
