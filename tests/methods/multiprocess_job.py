"""Every distillation method on a tiny teacher, for tests/methods/test_multiprocess.py: run once as a plain process and
once under `accelerate launch --multi_gpu --num_processes 2`, it writes each student's UNet weights (main
process only) so the test can compare one process against two with the same global batch.

Usage: python tests/methods/multiprocess_job.py TEACHER DATA WORKSPACE OUT [METHOD ...]   (JOB_SEED: distill.seed, 0)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# tiny budgets: a few optimiser steps of each method, a global batch of 8 (4 rows per process under two)
SETTINGS = {
    "progressive": {"target_steps": 2, "progressive": {"teacher_steps": 4, "steps_per_round": 3}},
    "consistency": {"target_steps": 2, "consistency": {"steps": 6}},
    "output": {"target_steps": 1, "output": {"steps": 6, "pairs": 32, "pairs_steps": 4}},
    "adversarial": {"target_steps": 1, "adversarial": {"steps": 4}},
    "dmd": {"target_steps": 1, "dmd": {"steps": 3, "fake_updates": 2, "gan_weight": 0.5}},
    "rectified": {
        "target_steps": 1,
        "rectified": {
            "couplings": 32,
            "couplings_steps": 4,
            "reflow_steps": 4,
            "reflow_ode_steps": 4,
            "distill_steps": 3,
        },
    },
}


def main(teacher: str, data: str, workspace: str, out: str, *methods: str) -> None:
    import torch
    from safetensors.torch import save_file

    from redistill.config import parse_params
    from redistill.data.images import load_image_folder
    from redistill.methods import distill, process_group
    from redistill.models.pipelines import load_pipeline

    n, main_process = process_group()
    images = torch.from_numpy(load_image_folder(Path(data)).images[:256])
    summaries = {}
    for method in methods or SETTINGS:
        p = parse_params(
            {
                "distill": {
                    "method": method,
                    "batch_size": 8,
                    "checkpoint_every": 2,
                    "lr": 1e-3,
                    "seed": int(os.environ.get("JOB_SEED", "0")),
                    **SETTINGS[method],
                }
            }
        ).distill
        student, summary = distill(
            p,
            load_pipeline(Path(teacher)),
            images,
            Path(workspace) / "ckpt" / method,
            log=lambda m: None,
            teacher_path=Path(teacher),
            workspace=Path(workspace),
        )
        if main_process:
            Path(out).mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in student.unet.state_dict().items()}, Path(out) / f"{method}.safetensors"
            )
            summaries[method] = {"num_processes": summary["num_processes"], "wall_time_s": summary["wall_time_s"]}
    if main_process:
        (Path(out) / "summaries.json").write_text(json.dumps({"processes": n, "methods": summaries}))


if __name__ == "__main__":
    main(*sys.argv[1:])
