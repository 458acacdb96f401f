"""Export a registered student as a stock diffusers pipeline folder with its model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def export_version(c, name: str, mv, out: Path, root: Path) -> dict:
    """Write version `mv` of `name` to `out` (which must not exist) with its README.md model card; a LoRA student,
    registered as its adapter, is rebuilt on its base teacher. Returns how to sample it: `steps`, `own_code` (the
    folder carries its pipeline code), `adapter` and `sampling` (redistill_sampling.json, text-to-image only).
    Raises ValueError when the registered student is not a usable pipeline."""
    from redistill.models.adapter_files import is_adapter_only
    from redistill.models.lora import write_complete
    from redistill.models.pipelines import PipelineError, check_pipeline_folder
    from redistill.registry.lineage import write_model_card

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        local = Path(c.download_artifacts(mv.run_id, "student", tmp))
        adapter = is_adapter_only(local)
        try:
            if adapter:  # a LoRA student is registered as its adapter: the folder is rebuilt on its base teacher
                out.parent.mkdir(parents=True, exist_ok=True)
                write_complete(local, out)
            else:
                check_pipeline_folder(local)
        except (PipelineError, ValueError) as e:
            raise ValueError(f"version {mv.version}'s student is not a usable pipeline: {e}") from e
        if not adapter:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, out)
    write_model_card(c, name, mv, out, root)  # README.md: how to load it, its lineage and its gate's figures
    own_code = isinstance(json.loads((out / "model_index.json").read_text()).get("_class_name"), list)
    sampling = (
        json.loads((out / "redistill_sampling.json").read_text()) if (out / "redistill_sampling.json").is_file() else {}
    )
    return {
        "steps": mv.tags.get("redistill.num_inference_steps"),
        "own_code": own_code,
        "adapter": adapter,
        "sampling": sampling,
    }
