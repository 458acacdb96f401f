"""`redistill bench`: every method side by side on one teacher, with fixed seeds.

Rows:
- the teacher with DDIM at 10, 25, 50 and 100 steps, and DDPM at its full 1,000 (full run only); a
  flow-matching teacher with its own Euler sampler at 10, 25, 50 and 100 steps;
- each method at 1, 2, 4 and 8 steps where it applies: one progressive run halves down to 1 step and
  keeps every round's student (8, 4, 2, 1); one consistency student is sampled at each step count; the
  adversarial student at the step counts its trained grid covers (1, 2, 4); output and DMD train one
  student per step count (1, 2, 4), because each learns its own sampler's grid; so does rectified, whose rows
  also carry the straightness of the teacher's and the reflowed flow's paths. A method that does not serve the
  teacher's kind (the diffusion methods on a flow-matching teacher) is listed under `skipped` with the reason.

Every row is measured by the same suite as `redistill evaluate` against the teacher at
`evaluate.reference_steps` (FID/KID with CIs and the floor-aware FID gap in every feature space, PSNR/SSIM
on shared noise, latency, throughput, speedup, parameters, peak memory), plus the distillation wall time
of its student. Each row's student is kept as a stock pipeline folder `<out>/<method>-<steps>/`, so any row
can be judged again or served later. Writes bench.json, bench.md (the table and the goals) and
quality_vs_nfe.png.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from redistill.config import METHODS, EvaluateParams, Params
from redistill.ops.bench_report import goals, goals_table, markdown_table, plot, straightness_table

TEACHER_STEPS = (10, 25, 50, 100)
METHOD_STEPS = (1, 2, 4, 8)
PER_STEP_METHODS = {"dmd": (1, 2, 4), "output": (1, 2, 4), "rectified": (1, 2, 4)}  # trained once per step count


def quick_params(p: Params) -> Params:
    """CI-sized settings: few samples and repeats, a handful of optimiser steps per method."""
    ev = dataclasses.replace(
        p.evaluate,
        num_samples=200,
        max_samples=200,
        bootstrap=20,
        kid_subset_size=100,
        sample_batch_size=200,
        latency_repeats=3,
        throughput_repeats=1,
        throughput_batch=16,
    )
    d = p.distill
    d = dataclasses.replace(
        d,
        batch_size=16,
        checkpoint_every=10**6,
        progressive=dataclasses.replace(d.progressive, steps_per_round=20),
        consistency=dataclasses.replace(d.consistency, steps=40),
        output=dataclasses.replace(d.output, pairs=64, pairs_steps=10, steps=40),
        adversarial=dataclasses.replace(d.adversarial, steps=20),
        dmd=dataclasses.replace(d.dmd, steps=10, fake_updates=1),
        rectified=dataclasses.replace(
            d.rectified, couplings=64, couplings_steps=10, reflow_steps=40, reflow_ode_steps=4, distill_steps=20
        ),
    )
    return dataclasses.replace(p, evaluate=ev, distill=d)


def _row(
    kind: str,
    method: str,
    steps: int,
    result: dict,
    distill_s: float | None,
    sampler: str,
    student: Path | None = None,
    summary: dict | None = None,
) -> dict:
    q, f, s, m = result["quality"], result["fidelity"], result["speed"], result["memory"]
    return {
        "kind": kind,
        "method": method,
        "steps": steps,
        "sampler": sampler,
        "student": str(student) if student else None,
        "fid": q["fid"],
        "fid_ci95": q["fid_ci95"],
        "fid_ratio": q["fid_ratio"],
        "fid_ratio_ci95": q.get("fid_ratio_ci95"),
        "fid_gap_floors": {n: sq.get("fid_gap_floors") for n, sq in q.get("spaces", {}).items()},
        "kid": q["kid"],
        "recognisable_share": q.get("recognisable_share"),
        "prompt_adherence": q.get("prompt_adherence"),  # a text-to-image teacher's rows: the asked digit drawn
        "psnr_db": f["psnr_db"],
        "ssim": f["ssim"],
        "latency_ms_p50": s["latency_ms_p50"],
        "throughput_img_s": s["throughput_img_s"],
        "speedup": s["speedup_throughput"],
        "params": m["params"],
        "peak_mb": m["peak_sampling_mb"],
        "distill_wall_s": distill_s,
        **({"straightness": summary["straightness"]} if summary and "straightness" in summary else {}),
    }


def run_bench(
    root: Path,
    p: Params,
    teacher: Path,
    out: Path,
    quick: bool = False,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    methods: tuple[str, ...] = METHODS,
    teacher_rows: bool = True,
    ddpm: bool = True,
) -> dict:
    """Run the bench in `out`; returns {"rows": [...], ...} and writes bench.json, bench.md, the plot."""
    import torch

    from redistill.data.images import load_image_folder
    from redistill.evaluation import spaces as feature_spaces
    from redistill.evaluation.sampling import sample_store
    from redistill.evaluation.suite import Side, evaluate
    from redistill.methods import distill
    from redistill.models.pipelines import load_pipeline, save_pipeline

    t0 = time.perf_counter()
    if quick:
        p = quick_params(p)
    out.mkdir(parents=True, exist_ok=True)
    data = load_image_folder(root / "data" / "reference")
    classifier = feature_spaces.classifier_for(p.evaluate.features, root / "data" / "features")
    extractor = feature_spaces.load_all(p.evaluate.features, root / "data" / "features")
    ref = Side(teacher, p.evaluate.reference_steps)
    cache = sample_store(root)

    rows: list[dict] = []

    def save_partial() -> None:  # a bench that dies part-way keeps the rows it measured
        (out / "bench.partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")

    def measure(path: Path, steps: int, scheduler: str, ep: EvaluateParams = p.evaluate) -> dict:
        return evaluate(
            Side(path, steps, scheduler),
            ref,
            data,
            extractor,
            ep,
            classifier=classifier,
            confidence=p.features.confidence,
            device=device,
            cache_dir=cache,
            data_path=root / "data" / "reference",
            bounds=p.gate.fid_gap_max,
        )

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; valid methods are: {', '.join(METHODS)}")
    from redistill.methods import refuses
    from redistill.models import adapter_for

    teacher_pipe = load_pipeline(teacher)
    teacher_kind = adapter_for(teacher_pipe)
    family = teacher_kind.family
    sampler = "ddim" if family == "diffusion" else "saved"  # a flow-matching teacher: its own Euler sampler
    label = "teacher (DDIM)" if family == "diffusion" else "teacher (Euler)"
    for steps in TEACHER_STEPS if teacher_rows else ():
        log(f"{label}, {steps} steps")
        rows.append(_row("teacher", label, steps, measure(teacher, steps, sampler), None, sampler))
        save_partial()
    if (
        teacher_rows and ddpm and not quick and family == "diffusion"
    ):  # DDPM at 1,000 steps: ~9 minutes for 2,000 samples on 2 CPU cores
        ddpm_steps = teacher_pipe.scheduler.config.num_train_timesteps
        log(f"teacher, DDPM {ddpm_steps} steps")
        rows.append(_row("teacher", "teacher (DDPM)", ddpm_steps, measure(teacher, ddpm_steps, "ddpm"), None, "ddpm"))
        save_partial()

    images = torch.from_numpy(data.images)

    def train(method: str, steps: int, **extra) -> tuple[object, dict, float]:
        d = dataclasses.replace(p.distill, method=method, target_steps=steps)
        log(f"distilling {method} for {steps} steps")
        t = time.perf_counter()
        student, summary = distill(
            d,
            load_pipeline(teacher),
            images,
            out / "checkpoints" / f"{method}-{steps}",
            log=log,
            teacher_path=teacher,
            workspace=root,
            captions=getattr(data, "captions", None),
            **extra,
        )
        return student, summary, round(time.perf_counter() - t, 1)

    def keep(pipe, summary: dict, method: str, steps: int) -> Path:
        folder = out / f"{method}-{steps}"
        shutil.rmtree(folder, ignore_errors=True)
        save_pipeline(pipe, folder, extra={"redistill_distill.json": summary})
        return folder

    skipped = {}
    for method in methods:
        why = refuses(method, family, teacher_kind.kind)  # the check `distill` itself makes
        if why:
            skipped[method] = why
            log(f"skipping {method}: {why}")
            continue
        targets: list[tuple[int, Path, float]] = []  # (steps, student folder, its distillation seconds)
        summaries: dict[int, dict] = {}
        if method == "progressive":
            # one halving run down to 1 step serves every row: each round's student is kept
            rounds: dict[int, object] = {}
            _, summary, wall = train(method, 1, on_round=rounds.__setitem__)
            targets = [(n, keep(rounds[n], summary, method, n), wall) for n in sorted(rounds) if n in METHOD_STEPS]
        elif method in PER_STEP_METHODS:
            for n in PER_STEP_METHODS[method]:
                student, summary, wall = train(method, n)
                summaries[n] = summary
                targets.append((n, keep(student, summary, method, n), wall))
        else:
            trained = p.distill.target_steps
            student, summary, wall = train(method, trained)
            # adversarial serves the subsets of its trained grid; a consistency model any count with LCM's
            # sampler, its trained count with the deterministic one
            served = {"adversarial": tuple(n for n in METHOD_STEPS if n <= trained)}
            if method == "consistency" and p.distill.consistency.sampler == "ddim":
                served["consistency"] = (trained,)
            targets = [(n, keep(student, summary, method, n), wall) for n in served.get(method, METHOD_STEPS)]
        for n, path, wall in targets:
            log(f"{method} at {n} steps")
            rows.append(_row("method", method, n, measure(path, n, "saved"), wall, "saved", path, summaries.get(n)))
            save_partial()

    result = {
        "quick": quick,
        "methods": list(methods),
        "feature_spaces": [sp.name for sp in extractor],
        "teacher": str(teacher),
        "reference_steps": p.evaluate.reference_steps,
        "num_samples": p.evaluate.num_samples,
        "seed": p.evaluate.seed,
        "device": device,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "skipped": skipped,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    result["goals"] = goals(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.partial.json").unlink(missing_ok=True)
    (out / "bench.md").write_text(
        markdown_table(result) + "\n\n" + goals_table(result) + "\n" + straightness_table(result)
    )
    plot(result, out / "quality_vs_nfe.png")
    return result
