"""The student as an MLflow pyfunc model, so the registry serves what it registers.

The model is saved with MLflow's loader-module flavour: the student's diffusers pipeline folder is the
model's data, and this module's `_load_pyfunc` loads it from safetensors. Nothing is pickled. So:

    mlflow.pyfunc.load_model("models:/digits-student@champion").predict(
        pd.DataFrame([{"seed": 0, "num_images": 4}]))
    mlflow models serve -m models:/digits-student@champion
    curl -X POST 127.0.0.1:5000/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"seed": 0, "num_images": 4}]}'

The model folder is self-contained: the code the loader imports (SHIPPED_CODE) travels with it as `code/redistill/`,
which MLflow puts first on sys.path before it imports `redistill.registry.serving`, and its requirements are `==` pins of the
distributions that code imports, at the versions the student was evaluated with, so `mlflow models serve` builds its
environment (by default a virtualenv, pip installing requirements.txt) without redistill from any package index.

Input: one row per request, `seed` and `num_images` (at most MAX_IMAGES), optionally
`num_inference_steps` (default: the step count the student was distilled for). A class-conditional student
also takes `class_label` (default: drawn with the row's seed, one per image) and `guidance_scale` (default
1.0: the guidance distilled into it; above 1 adds classifier-free guidance on top, where it has a null class).
Output: one row per image, `seed`, `index` and `image_png_base64` (a PNG, base64), plus `height` and `width`
(and `class_label` for a conditional student). Images of one row come from one generator seeded with `seed`,
so the same request gives the same images.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

MAX_IMAGES = 64  # per row
MAX_ROWS = 64  # per request
MAX_IMAGES_PER_REQUEST = 256
DISTILL_SUMMARY = "redistill_distill.json"


class StudentModel:
    """What `mlflow.pyfunc.load_model` wraps: a loaded pipeline and its default step count."""

    def __init__(self, path: str | Path):
        from redistill.models.pipelines import load_pipeline

        path = Path(path)
        from redistill.models import adapter_for

        self.pipe = load_pipeline(path)
        self.model = adapter_for(self.pipe)  # how this kind of pipeline samples (and, if conditional, what it takes)
        summary = path / DISTILL_SUMMARY
        self.steps = int(json.loads(summary.read_text())["num_inference_steps"]) if summary.is_file() else 4
        self.max_steps = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def predict(self, model_input, params=None):
        import pandas as pd
        import torch

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"seed", "num_images"} - set(df.columns)
        if missing:
            raise ValueError(f"each request row needs `seed` and `num_images`; missing {sorted(missing)}")
        if len(df) > MAX_ROWS:
            raise ValueError(f"at most {MAX_ROWS} rows per request, got {len(df)}")
        requests = [_check_row(r, self.steps, self.max_steps) for _, r in df.iterrows()]
        conds = [_check_condition(r, self.model) for _, r in df.iterrows()]
        total = sum(n for _, n, _ in requests)
        if total > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"at most {MAX_IMAGES_PER_REQUEST} images per request in all rows, got {total}")
        rows = []
        text = hasattr(self.model, "use_prompts")  # a text-to-image student: each row's prompt conditions it
        for (seed, n, steps), (label, guidance) in zip(requests, conds):
            g = torch.Generator(device=self.pipe.device).manual_seed(seed)
            labels = None
            if text:
                with torch.no_grad():
                    images = self.model.sample(n, steps, g, [label] * n, guidance).permute(0, 2, 3, 1).cpu().numpy()
                rows += [{**row, "prompt": label} for row in _png_rows(images, seed)]
                continue
            if self.model.conditional:
                labels = torch.full((n,), label, dtype=torch.long) if label is not None else self.model.conditions(n, g)
            with torch.no_grad():
                images = self.model.sample(n, steps, g, labels, guidance).permute(0, 2, 3, 1).cpu().numpy()
            rows += [
                {**row, **({"class_label": int(labels[i])} if labels is not None else {})}
                for i, row in enumerate(_png_rows(images, seed))
            ]
        columns = ["seed", "index", "height", "width", "image_png_base64"]
        extra = ["prompt"] if text else ["class_label"] if self.model.conditional else []
        return pd.DataFrame(rows, columns=columns + extra)


def _png_rows(images, seed: int) -> list[dict]:
    """One response row per image (N, H, W, C) in [0, 1]: its PNG in base64 and its size."""
    import numpy as np
    from PIL import Image

    rows = []
    for i, img in enumerate(images):
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rows.append(
            {
                "seed": seed,
                "index": i,
                "height": int(arr.shape[0]),
                "width": int(arr.shape[1]),
                "image_png_base64": base64.b64encode(buf.getvalue()).decode(),
            }
        )
    return rows


def _whole(value, name: str, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or ValueError naming the field (floats must be whole, no bools)."""
    import math

    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not lo <= int(f) <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {int(f)}")
    return int(f)


def _check_row(r, default_steps: int, max_steps: int) -> tuple[int, int, int]:
    """(seed, num_images, steps) of one request row, validated before any work."""
    import pandas as pd

    seed = _whole(r["seed"], "seed", 0, 2**63 - 1)
    n = _whole(r["num_images"], "num_images", 1, MAX_IMAGES)
    steps = r.get("num_inference_steps")
    steps = (
        default_steps
        if steps is None or (not isinstance(steps, str) and pd.isna(steps))
        else _whole(steps, "num_inference_steps", 1, max_steps)
    )
    return seed, n, steps


MAX_PROMPT_CHARS = 1000


def _check_condition(r, model) -> tuple[int | str | None, float | None]:
    """(class_label, guidance_scale) of one request row: only a conditional student takes them; a text-to-image
    student takes (prompt, guidance_scale) instead, and needs the prompt."""
    import pandas as pd

    def given(key):
        v = r.get(key)
        return v is not None and (isinstance(v, str) or not pd.isna(v))

    if hasattr(model, "use_prompts"):  # text-to-image
        if given("class_label"):
            raise ValueError("this student is text-to-image: it takes a `prompt`, not a class_label; drop the column")
        prompt = r.get("prompt") if given("prompt") else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("this student is text-to-image: each request row needs a non-empty `prompt` string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"a prompt may have at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
        return prompt, _guidance(r) if given("guidance_scale") else None
    if given("prompt"):
        raise ValueError("this student is not text-to-image: it takes no prompt; drop the column")
    if not model.conditional:
        extra = [k for k in ("class_label", "guidance_scale") if given(k)]
        if extra:
            raise ValueError(f"this student is unconditional: it takes no {' or '.join(extra)}; drop the column")
        return None, None
    label = _whole(r["class_label"], "class_label", 0, model.num_classes - 1) if given("class_label") else None
    guidance = None
    if given("guidance_scale"):
        guidance = _guidance(r)
        if guidance != 1.0 and model.null_class is None:
            raise ValueError(
                "this student has no null class, so it cannot be guided further; leave guidance_scale at 1"
            )
    return label, guidance


def _guidance(r) -> float:
    """The row's guidance_scale, a number in [0, 20]."""
    import math

    try:
        guidance = float(r["guidance_scale"])
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number, got {r['guidance_scale']!r}") from None
    if isinstance(r["guidance_scale"], bool) or not math.isfinite(guidance) or not 0.0 <= guidance <= 20.0:
        raise ValueError(f"guidance_scale must be between 0 and 20, got {r['guidance_scale']!r}")
    return guidance


def _load_pyfunc(data_path: str) -> StudentModel:
    """MLflow's loader-module entry point: `data_path` is the pipeline folder saved with the model."""
    return StudentModel(data_path)


# What `_load_pyfunc` -> StudentModel imports at load and predict time, and what that imports in turn (teacher.py:
# files.py, lora.py; lora.py: config.py at its top; models/: prediction.py), shipped with the model as
# `code/redistill/`. tests/registry/test_serving.py checks that every `redistill` import in these files names one of them.
SHIPPED_CODE = (
    "__init__.py",
    "registry/__init__.py",
    "registry/serving.py",
    "core/__init__.py",
    "core/files.py",
    "config",
    "models",
)
# the distributions that code imports (config/: yaml and pydantic), pinned to the versions installed here
PINNED = ("torch", "diffusers", "safetensors", "pillow", "numpy", "pandas", "pyyaml", "pydantic")


def pinned(dist: str) -> str:
    """`dist==<installed version>`, without a local label (`2.13.0+cpu` -> `torch==2.13.0`: an index serves that)."""
    from importlib.metadata import version

    return f"{dist}=={version(dist).split('+')[0]}"


def requirements(student: Path) -> list[str]:
    """The served student's pip requirements: PINNED, plus transformers when a component of its pipeline (or of the
    base teacher of a LoRA adapter) is a transformers class (a text encoder, a tokenizer), plus peft for a LoRA
    adapter (diffusers' load_lora_weights needs it). Never redistill: its code travels with the model."""
    from redistill.models.adapter_files import adapter_meta, is_adapter_only

    student = Path(student)
    extra = []
    folders = [student]
    if is_adapter_only(student):
        extra.append("peft")
        base = (adapter_meta(student) or {}).get("base_uri")
        folders += [Path(base)] if base else []
    for folder in folders:
        index = folder / "model_index.json"
        libs = set()
        if index.is_file():
            libs = {
                v[0]
                for k, v in json.loads(index.read_text()).items()
                if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0]
            }
        if "transformers" in libs:
            extra.append("transformers")
    return [pinned(d) for d in dict.fromkeys([*PINNED, *extra])]


def stage_code(tmp: Path) -> Path:
    """SHIPPED_CODE copied to `tmp/redistill` (a folder in `code_paths` keeps its name, so the package is
    `redistill`); returns that folder."""
    import shutil

    here, pkg = Path(__file__).resolve().parents[1], Path(tmp) / "redistill"
    pkg.mkdir(parents=True)
    for name in SHIPPED_CODE:
        if (here / name).is_dir():
            shutil.copytree(here / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (pkg / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(here / name, pkg / name)
    return pkg


def save_pyfunc(student: Path, out: Path, card: str | None = None) -> Path:
    """Write the student as a self-contained MLflow pyfunc model folder (MLmodel, signature, input example, the
    loader's code under `code/`, pinned requirements) at `out`. `card` (model_card.model_card's text), when given,
    is written as README.md beside MLmodel and in the data folder (the student's pipeline folder)."""
    import tempfile

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec("long", "seed"),
                ColSpec("long", "num_images"),
                ColSpec("long", "num_inference_steps", required=False),
                ColSpec("long", "class_label", required=False),  # conditional students only
                ColSpec("double", "guidance_scale", required=False),
                ColSpec("string", "prompt", required=False),
            ]
        ),  # text-to-image students only
        outputs=Schema(
            [
                ColSpec("long", "seed"),
                ColSpec("long", "index"),
                ColSpec("long", "height"),
                ColSpec("long", "width"),
                ColSpec("string", "image_png_base64"),
            ]
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(
            path=str(out),
            loader_module="redistill.registry.serving",
            data_path=str(student),
            signature=signature,
            input_example=pd.DataFrame([{"seed": 0, "num_images": 2}]),
            code_paths=[str(stage_code(Path(tmp)))],  # -> out/code/redistill/, first on sys.path at load
            pip_requirements=requirements(Path(student)),
        )
    if card is not None:
        data = Model.load(str(out)).flavors["python_function"]["data"]
        for folder in (Path(out), Path(out) / data):
            (folder / "README.md").write_text(card)
    return Path(out)
