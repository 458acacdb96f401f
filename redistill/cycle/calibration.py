"""The gate calibrated on controls: where each feature space's FID-gap bound must sit, measured, not guessed.

The gate passes a student when its FID gap to the teacher is at most `gate.fid_gap_max` floors. That bound is
only meaningful between two kinds of pipeline whose answer a user already knows:
- **positive controls**, which must pass: the teacher itself under samplers a user accepts as the same model
  (DDIM at other step counts, ancestral DDPM at 1,000 steps, another seed), and a lightly fine-tuned teacher;
- **negative controls**, which must fail: the undistilled teacher at the student's step count, a half-trained
  student, a blurred student, and a student that lost some classes (mode dropping, the failure DMD-style
  methods are known for).

Each control is measured exactly as the cycle measures a student: FIDs against the same real set, the gap to
the teacher at `evaluate.reference_steps` (paired on the same noise where the control shares it), in floors,
with its bootstrap interval, in every feature space of `evaluate.features`. A space separates the controls
when every positive control's gap (the upper end of its interval) lies below every negative control's (the
lower end of its interval); the bound then belongs between the two, and `suggest_bound` puts it there. A space
in which no bound separates them can report but must not decide.

Pure functions and sampling live here; `redistill calibrate` (the DVC stage `calibrate`) writes
`metrics/calibration.json` and the table the README quotes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from redistill.cycle.controls import (
    NEGATIVE,
    POSITIVE,
    Control,
    blurred,
    class_labels,
    measure,
    summarise,
    table,
    without_classes,
)

# ---------------------------------------------------------------------------------------------------
# Transforms that make a failing "student" out of good samples
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Separation and the bound
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Measuring the controls
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# The controls of a workspace, and the whole run
# ---------------------------------------------------------------------------------------------------


def workspace_controls(
    teacher: Path,
    p,
    draw: Callable,
    half_trained: Callable[[], Path] | None,
    labels: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[Control]]:
    """(the reference samples, the controls) of the `calibrate` settings for `teacher`.

    `draw(folder, scheduler, steps, seed, n)` samples a pipeline folder (cached); `half_trained()` distils the
    half-trained student and returns its folder; `labels(images)` gives a class per image."""
    c, e = p.calibrate, p.evaluate
    n, ref_steps = e.num_samples, e.reference_steps
    reference = draw(teacher, "ddim", ref_steps, e.seed, n)
    controls = [
        Control(f"ddim{k}", POSITIVE, f"the teacher, DDIM {k} steps", lambda k=k: draw(teacher, "ddim", k, e.seed, n))
        for k in c.positive_steps
        if k != ref_steps
    ]
    if c.ddpm_samples:
        controls.append(
            Control(
                "ddpm1000",
                POSITIVE,
                "the teacher, ancestral DDPM 1,000 steps",
                lambda: draw(teacher, "ddpm", 1000, e.seed, c.ddpm_samples),
                paired=False,
            )
        )
    controls.append(
        Control(
            "seed",
            POSITIVE,
            f"the teacher, DDIM {ref_steps} steps, other noise",
            lambda: draw(teacher, "ddim", ref_steps, e.seed + c.other_seed, n),
            paired=False,
        )
    )
    if c.finetuned:
        ft = Path(c.finetuned)
        controls.append(
            Control(
                "finetuned",
                POSITIVE,
                f"a lightly fine-tuned teacher ({ft.name}), DDIM {ref_steps} steps",
                lambda: draw(ft, "ddim", ref_steps, e.seed, n),
            )
        )
    controls += [
        Control(
            f"teacher@{k}",
            NEGATIVE,
            f"the undistilled teacher, DDIM {k} step{'s' if k > 1 else ''}",
            lambda k=k: draw(teacher, "ddim", k, e.seed, n),
        )
        for k in c.undistilled_steps
    ]
    if half_trained is not None and c.half_trained_steps:
        controls.append(
            Control(
                "half-trained",
                NEGATIVE,
                f"a 1-step output student after {c.half_trained_steps} steps",
                lambda: draw(half_trained(), "saved", 1, e.seed, n),
            )
        )
    controls.append(
        Control(
            "blurred",
            NEGATIVE,
            f"the teacher's samples, Gaussian blur sigma {c.blur_sigma} px",
            lambda: blurred(reference, c.blur_sigma),
        )
    )
    if c.dropped_classes:
        controls.append(
            Control(
                "mode-drop",
                NEGATIVE,
                f"the teacher's samples without classes {', '.join(map(str, c.dropped_classes))}",
                lambda: without_classes(reference, labels(reference), c.dropped_classes),
                paired=False,
            )
        )
    return reference, controls


def run(
    root: Path, p, teacher: Path, cache_dir: Path | None, out_dir: Path, log: Callable[[str], None] = lambda m: None
) -> dict:
    """Measure every control of the `calibrate` settings against `teacher` in the `evaluate.features` spaces of the
    workspace `root`; returns {"controls": rows, "summary", "bounds", "table", ...} (the bound a space suggests, or
    None where the controls overlap)."""
    import dataclasses

    from redistill.data.images import load_image_folder
    from redistill.evaluation import spaces as feature_spaces
    from redistill.evaluation.sampling import configure_scheduler, sample_cached
    from redistill.models.pipelines import load_pipeline, pipeline_sha256

    t0 = time.perf_counter()
    features = Path(root) / "data" / "features"
    spaces = feature_spaces.load_all(p.evaluate.features, features)
    classifier = feature_spaces.classifier_for(p.evaluate.features, features)
    data = load_image_folder(Path(root) / "data" / "reference")
    batch = p.evaluate.sample_batch_size

    def draw(folder: Path, scheduler: str, steps: int, seed: int, n: int) -> torch.Tensor:
        pipe = load_pipeline(folder)
        name = configure_scheduler(pipe, steps, scheduler)
        images, _ = sample_cached(pipe, Path(folder), name, n, steps, seed, batch, cache_dir)
        return images

    def half_trained() -> Path:
        from redistill.methods import distill
        from redistill.models.pipelines import save_pipeline

        folder = Path(out_dir) / "half-trained" / f"{pipeline_sha256(teacher)[:16]}-{p.calibrate.half_trained_steps}"
        if (folder / "model_index.json").is_file():
            return folder
        d = p.distill
        dp = dataclasses.replace(
            d,
            method="output",
            target_steps=1,
            init="cold",
            output=dataclasses.replace(d.output, steps=p.calibrate.half_trained_steps),
        )
        log(f"  distilling the half-trained student ({p.calibrate.half_trained_steps} output steps)")
        student, _ = distill(
            dp,
            load_pipeline(teacher),
            torch.from_numpy(data.images),
            folder.parent / "checkpoints",
            log=lambda m: None,
            teacher_path=teacher,
            workspace=root,
        )
        save_pipeline(student, folder)
        return folder

    ft = p.calibrate.finetuned  # relative to the workspace; a workspace without it (your own data) skips that control
    if ft and not Path(ft).is_absolute():
        ft = str(Path(root) / ft)
    if ft and not (Path(ft) / "model_index.json").is_file():
        log(f"no fine-tuned teacher at {ft} (calibrate.finetuned): that positive control is skipped")
        ft = None
    p = dataclasses.replace(p, calibrate=dataclasses.replace(p.calibrate, finetuned=ft))
    first = spaces[0]
    reference, controls = workspace_controls(
        Path(teacher),
        p,
        draw,
        half_trained,
        lambda images: class_labels(
            images, classifier, first, max(10, max(p.calibrate.dropped_classes) + 1), p.evaluate.seed
        ),
    )
    log(f"reference: the teacher at DDIM {p.evaluate.reference_steps} steps, {len(reference)} samples")
    rows = measure(controls, reference, data.images, spaces, p.evaluate, log, classifier, p.features.confidence)
    names = [sp.name for sp in spaces]
    summary = summarise(rows, names)
    bounds = {s: summary["spaces"][s]["suggested_bound"] for s in names}
    return {
        "teacher": str(teacher),
        "teacher_sha256": pipeline_sha256(teacher),
        "reference_steps": p.evaluate.reference_steps,
        "num_samples": p.evaluate.num_samples,
        "feature_spaces": {sp.name: sp.sha256 for sp in spaces},
        "controls": rows,
        "summary": summary,
        "bounds": bounds,
        "table": table(rows, summary, bounds),
        "wall_time_s": time.perf_counter() - t0,
    }


WORKSPACE_RECORD = (
    "calibration.json"  # data/calibration.json: a user's workspace's own bounds (config.recorded_gap_bounds)
)
CALIBRATED_KINDS = ("unconditional-pixel", "class-conditional-pixel")  # teachers whose controls are DDIM draws


def for_workspace(root: Path, p, teacher: Path, log: Callable[[str], None] = lambda m: None) -> dict | None:
    """The gate's FID-gap bounds of a workspace derived from a user's data (redistill/bootstrap.py), measured once on
    its own feature spaces and recorded in `data/calibration.json`; the recorded one where it exists.

    The embedded bounds were calibrated in the embedded digits' spaces; a user's workspace trains its own encoder on
    its own data, whose floors and gaps are another scale, so its bounds come from its own controls. The first cycle
    measures the controls that cost a few teacher draws (the teacher under DDIM at `calibrate.positive_steps` and from
    other noise; the undistilled teacher at `calibrate.undistilled_steps`, blurred samples, a dropped cluster) and
    leaves out the 1,000-step DDPM draw, the half-trained student and the fine-tuned teacher (`redistill calibrate`
    measures them all). A space whose controls overlap gets no bound: it reports, it does not decide. Returns None
    for a teacher whose controls are not DDIM draws (the embedded bounds then apply, and the log says so)."""
    import dataclasses
    import json
    import os

    from redistill.evaluation.sampling import sample_store
    from redistill.models import adapter_for
    from redistill.models.pipelines import load_pipeline

    f = Path(root) / "data" / WORKSPACE_RECORD
    if f.is_file():
        return json.loads(f.read_text())
    kind = adapter_for(load_pipeline(teacher)).kind
    if kind not in CALIBRATED_KINDS:
        log(
            f"workspace: the gate keeps gate.fid_gap_max's bounds: a {kind} teacher's controls are not calibrated "
            "automatically (set gate.fid_gap_max in params.yaml)"
        )
        return None
    quick = dataclasses.replace(
        p, calibrate=dataclasses.replace(p.calibrate, ddpm_samples=0, half_trained_steps=0, finetuned="")
    )
    log("workspace: calibrating the gate's FID-gap bounds on this workspace's controls (once; data/calibration.json)")
    result = run(root, quick, teacher, sample_store(root), Path(root) / "runs" / "calibrate", log)
    result["made_by"] = (
        "the first cycle of this workspace (redistill cycle); `redistill calibrate` measures every control"
    )
    result["left_out"] = ["ddpm1000", "half-trained", "finetuned"]
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{WORKSPACE_RECORD}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(f)
    return result


def calibrate_workspace(
    root: Path, p, teacher: Path, settings: Path | None = None, log: Callable[[str], None] = lambda m: None
) -> dict | None:
    """Before a cycle: in a workspace derived from a user's data whose settings (`settings`, default its params.yaml)
    do not set gate.fid_gap_max, calibrate its bounds once (`for_workspace`) and put them in `p.gate`; returns the
    record, or None where the settings' bounds stay (the embedded workspace, bounds set by hand, a recorded
    calibration, which `config.load_params` already applied, or a teacher kind not calibrated automatically)."""
    from redistill.config import gap_bounds_with, recorded_gap_bounds, settings_set, workspace_derived

    if (
        not workspace_derived(root)
        or recorded_gap_bounds(root) is not None
        or settings_set("gate", "fid_gap_max", settings, root)
    ):
        return None
    record = for_workspace(root, p, teacher, log)
    if record is not None:
        gap_bounds_with(p, record["bounds"])
        log(
            "workspace: the gate's FID-gap bounds, calibrated on this workspace's controls: "
            + ", ".join(
                f"{s} {'reports only (its controls overlap)' if b is None else f'{b:.2f} floors'}"
                for s, b in record["bounds"].items()
            )
            + " (data/calibration.json)"
        )
    return record
