"""The committed champion: the project's best recipe distilled from the committed teacher, once, with its lineage.

Users of this tool already have a champion when a new teacher lands. The embedded digits get one the same way:
`redistill champion` (the DVC stage `champion`) distils `data/teachers/<teacher.name>` on `data/reference` with the
`distill` settings (the best recipe measured, README "The champion"), judges it with the evaluation suite and the
gate as a cycle would (against the teacher, no champion to beat), and writes a stock diffusers pipeline folder that
carries:
- `redistill_distill.json`: what distilled it (the method's summary: settings, losses, time, step count);
- `redistill_lineage.json`: the teacher's sha256, the data's DVC md5, the settings and their sha256, the code
  commit, the budget it was made within, and its figures (every gated value, bound and verdict);
- `README.md`: a model card (how to load and sample it, the lineage, the figures).

The folder is committed (DVC `cache: false`), so a fresh clone has it; `redistill demo` registers it as version 1
through the real evaluation and gate (trigger bootstrap) before a new teacher lands.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

LINEAGE_FILE = "redistill_lineage.json"


def lineage(root: Path, p, teacher: Path, data: Path, summary: dict, budget_s: float, figures: dict) -> dict:
    """The record a committed student carries: what it was made from, by what, within what budget, how it scored."""
    import torch

    from redistill.data.images import dir_md5
    from redistill.models.pipelines import pipeline_sha256
    from redistill.registry.lineage import code_version

    code = code_version()
    rel = lambda x: os.path.relpath(Path(x).resolve(), Path(root).resolve())  # noqa: E731
    return {
        "teacher": {"path": rel(teacher), "sha256": pipeline_sha256(teacher)},
        "data": {"path": rel(data), "dvc_md5": dir_md5(data)},
        "params": {"distill": p.to_dict()["distill"], "sha256": p.sha256(["distill"])},
        "code": {"git_commit": code["git_commit"], "dirty": code["dirty"]},
        "budget": {
            "limit_s": budget_s,
            "wall_time_s": summary["wall_time_s"],
            "within": summary["wall_time_s"] <= budget_s,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "figures": figures,
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def figures(result: dict, decision) -> dict:
    """The headline figures of an evaluation and the gate's checks, for the lineage and the model card."""
    q, s, f = result["quality"], result["speed"], result["fidelity"]
    return {
        "num_samples": result["num_samples"],
        "steps": result["steps"],
        "reference_steps": result["reference"]["steps"],
        "fid_gap_floors": {name: sq["fid_gap_floors"] for name, sq in q["spaces"].items()},
        "fid_gap_halfwidth_floors": {name: sq["fid_gap_halfwidth_floors"] for name, sq in q["spaces"].items()},
        "fid": q["fid"],
        "reference_fid": q["reference_fid"],
        "feature_space": q["feature_space"],
        "recognisable_share": q.get("recognisable_share"),
        "reference_recognisable_share": q.get("reference_recognisable_share"),
        "psnr_db": f["psnr_db"],
        "speedup_throughput": s["speedup_throughput"],
        "gate": {"passed": decision.passed, "checks": decision.to_dict()["checks"]},
    }


def build(
    root: Path, p, teacher: Path, data: Path, out: Path, budget_minutes: float, log: Callable[[str], None] = print
) -> dict:
    """Distil, judge and write the champion folder `out` (atomically; never over an existing one); returns its lineage."""
    import torch

    from redistill.data.images import load_image_folder
    from redistill.evaluation.gate import judge
    from redistill.evaluation.sampling import sample_store
    from redistill.evaluation.suite import evaluate_student
    from redistill.methods import distill
    from redistill.models.pipelines import load_pipeline, save_pipeline, validate_teacher

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; a champion is never overwritten: move it aside to rebuild it")
    images = load_image_folder(data)
    validate_teacher(teacher, images.channels, images.size)
    work = Path(root) / "runs" / "champion" / out.name
    student, summary = distill(
        p.distill,
        load_pipeline(teacher),
        torch.from_numpy(images.images),
        work / "checkpoints",
        log=log,
        teacher_path=teacher,
        workspace=root,
    )
    summary["init"] = "cold"
    candidate = work / "student"
    if candidate.exists():
        import shutil

        shutil.rmtree(candidate)
    save_pipeline(student, candidate, extra={"redistill_distill.json": summary})
    log(f"distilled in {summary['wall_time_s']:.0f} s; evaluating it against the teacher as a cycle would")
    result = evaluate_student(
        candidate,
        summary["num_inference_steps"],
        teacher,
        data,
        Path(root) / "data" / "features",
        p,
        work / "evaluation",
        sample_store(root),
        log=log,
    )
    decision = judge(result, None, p.gate, p.distill.method)
    record = lineage(root, p, teacher, data, summary, budget_minutes * 60, figures(result, decision))
    if not record["budget"]["within"]:
        log(
            f"warning: the distillation took {summary['wall_time_s'] / 60:.1f} min, over its budget of {budget_minutes} min"
        )
    record["path"] = os.path.relpath(out.resolve(), Path(root).resolve())
    (candidate / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (candidate / "README.md").write_text(model_card_for(record, summary, p.registry.student_name, candidate))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(candidate, out)
    return record


def model_card_for(record: dict, summary: dict, name: str, folder: Path) -> str:
    """The committed champion's model card, from its lineage (before any registry holds it)."""
    from redistill.registry.model_card import folder_facts, model_card

    g = record["figures"]
    return model_card(
        name=name,
        version=None,
        teacher_uri=record["teacher"]["path"],
        teacher_sha256=record["teacher"]["sha256"],
        datasets=[
            {"context": "training and evaluation", "path": record["data"]["path"], "md5": record["data"]["dvc_md5"]}
        ],
        params_sha256=record["params"]["sha256"],
        git_commit=record["code"]["git_commit"] + ("-dirty" if record["code"]["dirty"] else ""),
        trigger="the DVC stage champion",
        trigger_detail=None,
        method=summary["method"],
        steps=str(summary["num_inference_steps"]),
        checks=g["gate"]["checks"],
        verdict="passed" if g["gate"]["passed"] else "rejected",
        replaced=None,
        champion_before=None,
        run_id="none (made by `redistill champion`; `redistill demo` registers it)",
        flow_run_url=None,
        init="cold",
        path=str(record.get("path", "data/champion/digits-student")),
        **folder_facts(folder),
    )
