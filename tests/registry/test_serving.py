"""The served student stands alone: its pyfunc folder ships the loader's code and `==` pins an index can serve (no
`redistill` requirement), loads where redistill is not installed, and carries a model card, as the export does."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from helpers import make_tiny_class_pipeline, make_tiny_pipeline

TEACHER_SHA = "a1" * 32
DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
PARAMS_SHA = "c3" * 32
COMMIT = "d4" * 20
CHECKS = [
    {"name": "fid_gap.classifier", "kind": "absolute", "value": 1.5, "op": "<=", "bound": 2.0, "passed": True},
    {"name": "speedup", "kind": "absolute", "value": 12.25, "op": ">=", "bound": 2.0, "passed": True},
]


def _requirements(model: Path) -> list[str]:
    return [line.strip() for line in (model / "requirements.txt").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny unconditional student and a tiny class-conditional one, each saved as a pyfunc model."""
    from redistill.registry.serving import save_pyfunc

    tmp = tmp_path_factory.mktemp("serving")
    save_pyfunc(make_tiny_pipeline(tmp / "student"), tmp / "model")
    save_pyfunc(make_tiny_class_pipeline(tmp / "cond" / "student", size=8), tmp / "cond-model")
    return tmp


def test_the_pyfunc_folder_ships_its_code_and_pins_what_an_index_serves(saved):
    model = saved / "model"
    conf = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    assert conf["loader_module"] == "redistill.registry.serving" and conf["code"] == "code"
    code = model / "code" / "redistill"  # a package folder in code_paths keeps its name
    for f in (
        "__init__.py",
        "registry/serving.py",
        "models/pipelines.py",
        "core/files.py",
        "models/lora.py",
        "config/__init__.py",
        "models/prediction.py",
        "models/__init__.py",
        "models/pixel.py",
        "models/class_pipeline.py",
        "models/text_to_image.py",
    ):
        assert (code / f).is_file(), f
    for f in ("cli", "cycle", "registry/client.py", "registry/mlflow_lineage.py", "watch", "ops"):  # not the tools
        assert not (code / f).exists(), f
    assert not list(code.rglob("__pycache__"))
    reqs = _requirements(model)
    names = [r.split("==")[0].lower() for r in reqs]
    assert "redistill" not in names and all("==" in r for r in reqs), reqs
    assert f"torch=={version('torch').split('+')[0]}" in reqs  # no local label (+cpu): an index serves the pin
    for dist in ("diffusers", "safetensors", "pillow", "numpy", "pandas", "pyyaml", "pydantic", "mlflow"):
        assert f"{dist}=={version(dist)}" in reqs, dist
    assert "transformers" not in names and "peft" not in names  # a pixel student needs neither


def test_a_text_to_image_student_pins_transformers(tmp_path):
    from redistill.registry.serving import requirements

    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "safety_checker": [None, None],
            }
        )
    )
    assert f"transformers=={version('transformers')}" in requirements(tmp_path)


def test_every_redistill_import_of_the_shipped_code_is_shipped(tmp_path):
    """A module the loader reaches but the model lacks would fail only when that path runs (a lazy import): every
    `redistill` module imported anywhere in the shipped files (at any depth: inside functions too) is shipped."""
    import redistill
    from redistill.registry.serving import stage_code

    repo = Path(redistill.__file__).parent
    pkg = stage_code(tmp_path)

    def module(name: str) -> Path | None:  # the file of module `name` under `root`, if it is one
        rel = Path(*name.split(".")[1:])
        return next((f for f in ((repo / rel).with_suffix(".py"), repo / rel / "__init__.py") if f.is_file()), None)

    shipped = {
        ".".join(("redistill", *f.relative_to(pkg).with_suffix("").parts)).removesuffix(".__init__")
        for f in pkg.rglob("*.py")
    }
    needed = set()
    for f in pkg.rglob("*.py"):
        here = ".".join(("redistill", *f.relative_to(pkg).parent.parts))
        tree = ast.parse(f.read_text())
        # config.py is shipped for lora.py's module-level import of its LoRA target presets: the loader runs none of
        # its functions (settings parsing, which may import the workspace's tools), so only its top level counts
        for node in tree.body if f.parent == pkg / "config" else ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the file's package
                    base = ".".join([*here.split(".")[: len(here.split(".")) - node.level + 1], *filter(None, [base])])
                if base.split(".")[0] == "redistill":
                    needed |= {(f.name, base)} | {
                        (f.name, f"{base}.{a.name}") for a in node.names if module(f"{base}.{a.name}")
                    }
            elif isinstance(node, ast.Import):
                needed |= {(f.name, a.name) for a in node.names if a.name.split(".")[0] == "redistill"}
    assert needed and {m for _, m in needed} >= {
        "redistill.models.pipelines",
        "redistill.models.adapter_files",
        "redistill.core.files",
    }
    missing = sorted(f"{where}: {m}" for where, m in needed if m not in shipped)
    assert not missing, missing


ISOLATED = """
import base64, importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages, without its .pth files: no editable (or any) redistill finder
assert importlib.util.find_spec("redistill") is None, "redistill is importable before the model is loaded"
import mlflow.pyfunc
import pandas as pd
out = {}
for name, row in (("model", {"seed": 0, "num_images": 2}), ("cond-model", {"seed": 1, "num_images": 2, "class_label": 3})):
    m = mlflow.pyfunc.load_model(sys.argv[2] + "/" + name)
    df = m.predict(pd.DataFrame([row]))
    out[name] = {"rows": df.to_dict("records")}
import redistill, redistill.registry.serving
out["serving_file"] = redistill.registry.serving.__file__
out["package_path"] = list(redistill.__path__)
print("RESULT " + json.dumps(out))
"""


def test_the_pyfunc_model_loads_and_predicts_where_redistill_is_not_installed(saved):
    """`python -I -S`: neither the repository (not the cwd, no PYTHONPATH) nor the installed redistill (its editable
    finder is a .pth file, which -S does not run) is on the path; the model folder alone must do."""
    site = sysconfig.get_paths()["purelib"]
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ISOLATED, site, str(saved)],
        cwd=saved,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert Path(out["serving_file"]).resolve().is_relative_to((saved / "cond-model" / "code").resolve()) or Path(
        out["serving_file"]
    ).resolve().is_relative_to((saved / "model" / "code").resolve())
    assert all(str(saved) in p for p in out["package_path"])
    for name in ("model", "cond-model"):
        rows = out[name]["rows"]
        assert [r["index"] for r in rows] == [0, 1] and all(r["height"] == 8 for r in rows)
        assert all(base64.b64decode(r["image_png_base64"]).startswith(b"\x89PNG\r\n\x1a\n") for r in rows)
    assert [r["class_label"] for r in out["cond-model"]["rows"]] == [3, 3]


def _card(**over) -> str:
    from redistill.registry.model_card import model_card

    args = dict(
        name="digits-student",
        version="7",
        teacher_uri="data/teachers/tiny",
        teacher_sha256=TEACHER_SHA,
        datasets=[
            {"context": "training", "path": "data/reference", "md5": DATA_MD5},
            {"context": "evaluation", "path": "data/reference", "md5": DATA_MD5},
        ],
        params_sha256=PARAMS_SHA,
        git_commit=COMMIT,
        trigger="drift",
        trigger_detail={"batch": "data/incoming/b1"},
        method="progressive",
        steps="2",
        checks=CHECKS,
        verdict="passed",
        replaced="6",
        champion_before="6",
        run_id="run0123",
        flow_run_url=None,
        init="warm:6",
        aliases=["champion"],
        path="/exports/v7",
    )
    return model_card(**{**args, **over})


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_model_card_has_diffusers_front_matter_lineage_and_figures():
    card = _card()
    front = _front(card)
    assert front["library_name"] == "diffusers" and front["base_model"] == "data/teachers/tiny"
    assert {"diffusers", "distillation", "progressive-distillation", "unconditional-image-generation"} <= set(
        front["tags"]
    )
    for text in (
        TEACHER_SHA,
        DATA_MD5,
        PARAMS_SHA,
        COMMIT,
        "| trigger | drift (batch `data/incoming/b1`) |",
        "from champion version 6 (warm)",
        "`digits-student` version 7 (aliases: champion)",
        "`run0123`",
        "replaced champion version 6",
        "DiffusionPipeline.from_pretrained('/exports/v7')",
        "num_inference_steps=2",
        "| gate check | value | bound | |",
        "| fid_gap.classifier | 1.5 | <= 2 | pass |",
        "| speedup | 12.25 | >= 2 | pass |",
    ):
        assert text in card, text
    rejected = _card(verdict="rejected", replaced=None, checks=[{**CHECKS[0], "value": 3.0, "passed": False}])
    assert "| fid_gap.classifier | 3 | <= 2 | FAIL |" in rejected and "the champion stayed version 6" in rejected
    unregistered = _card(version=None, replaced=None)
    assert "not registered yet" in unregistered and "assigned at registration" in unregistered


def test_the_cycle_card_reads_what_the_flow_holds_before_it_registers(tmp_path):
    """`cycle_card` takes the flow's own records (as tasks/registry.py describe_version does), less the version."""
    from redistill.registry.model_card import cycle_card

    card = cycle_card(
        "digits-student",
        {
            "teacher_uri": "data/teachers/tiny",
            "teacher_sha256": TEACHER_SHA,
            "params_sha256": PARAMS_SHA,
            "git_commit": COMMIT,
        },
        {"datasets": [{"context": "training", "path": "data/reference", "md5": DATA_MD5}]},
        {"passed": True, "checks": CHECKS},
        {"redistill.trigger": "new-teacher", "redistill.method": "consistency", "redistill.init": "cold"},
        "run0123",
        4,
        make_tiny_pipeline(tmp_path / "student"),
        champion_before="3",
        model_id="m-abc",
    )
    assert _front(card)["tags"][:3] == ["diffusers", "diffusers-training", "distillation"]
    for text in (
        TEACHER_SHA,
        DATA_MD5,
        PARAMS_SHA,
        COMMIT,
        "| trigger | new-teacher |",
        "consistency at 4 steps",
        "from the teacher (cold)",
        "`m-abc`",
        "not registered yet",
        "| fid_gap.classifier | 1.5 | <= 2 | pass |",
        "num_inference_steps=4",
    ):
        assert text in card, text


def test_the_card_tells_how_to_sample_each_kind_of_student(tmp_path):
    from redistill.registry.model_card import folder_facts

    cond = folder_facts(make_tiny_class_pipeline(tmp_path / "cond", size=8))
    card = _card(**cond)
    assert "trust_remote_code=True" in card and "class_labels=[0, 1], num_inference_steps=2" in card
    assert "class-conditional-image-generation" in _front(card)["tags"]
    t2i = _card(
        model_index={"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
        sampling={"guidance_scale": 1.0},
    )
    assert '"a prompt", num_inference_steps=2, guidance_scale=1.0' in t2i and "text-to-image" in _front(t2i)["tags"]
    lora = _card(
        adapter={"base_uri": "/teachers/sd", "base_sha256": "e5" * 32, "rank": 4}, sampling={"guidance_scale": 1.0}
    )
    assert "load_lora_weights('/exports/v7'" in lora and "from_pretrained('/teachers/sd')" in lora
    assert "lora" in _front(lora)["tags"]


def test_save_pyfunc_writes_the_card_beside_mlmodel_and_in_the_student_folder(tmp_path):
    from redistill.registry.serving import save_pyfunc

    card = _card(version=None, replaced=None)
    save_pyfunc(make_tiny_pipeline(tmp_path / "student"), tmp_path / "model", card=card)
    assert (tmp_path / "model" / "README.md").read_text() == card
    assert (tmp_path / "model" / "data" / "student" / "README.md").read_text() == card


def test_the_exported_folder_gets_the_card_of_its_registered_version(tmp_path):
    """`lineage.write_model_card` on a version registered in a real (SQLite) MLflow store, as `redistill export` calls
    it on the folder it wrote: the card names the version's lineage and gate figures, and shows the run's grid."""
    import shutil

    from PIL import Image

    from redistill.registry.client import REQUIRED_TAGS, client, register_student
    from redistill.registry.lineage import write_model_card
    from redistill.registry.mlflow_lineage import dataset, log_datasets

    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.create_experiment("redistill", artifact_location=(tmp_path / "artifacts").as_uri())
    student = make_tiny_pipeline(tmp_path / "student")
    run_id = c.create_run(exp).info.run_id
    c.log_artifacts(run_id, str(student), "student")
    c.log_dict(run_id, {"passed": True, "checks": CHECKS, "reasons": ""}, "gate/decision.json")
    (tmp_path / "evaluation").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "evaluation" / "grid.png")
    c.log_artifacts(run_id, str(tmp_path / "evaluation"), "evaluation")
    (tmp_path / "data" / "reference").mkdir(parents=True)
    log_datasets(c, run_id, [dataset(tmp_path, tmp_path / "data" / "reference", DATA_MD5, "training")])
    tags = {k: f"{k}-value" for k in REQUIRED_TAGS}
    tags.update(
        teacher_uri="data/teachers/tiny",
        teacher_sha256=TEACHER_SHA,
        data_md5=DATA_MD5,
        data_uri="data/reference",
        params_sha256=PARAMS_SHA,
        git_commit=COMMIT,
        trigger="schedule",
        method="progressive",
        num_inference_steps="2",
        gate="passed",
        gate_reasons="",
        init="cold",
    )
    mv = c.get_model_version(
        "digits-student", register_student(c, "digits-student", run_id, "student", tags, promote=True).version
    )
    out = tmp_path / "export"
    shutil.copytree(student, out)
    card = write_model_card(c, "digits-student", mv, out).read_text()
    assert _front(card)["base_model"] == "data/teachers/tiny"
    for text in (
        TEACHER_SHA,
        DATA_MD5,
        PARAMS_SHA,
        COMMIT,
        "| trigger | schedule |",
        "from the teacher (cold)",
        "`digits-student` version 1 (aliases: champion)",
        run_id,
        f"DiffusionPipeline.from_pretrained('{out}')",
        "num_inference_steps=2",
        "| fid_gap.classifier | 1.5 | <= 2 | pass |",
        "![teacher and student samples",
    ):
        assert text in card, text
    assert (out / "images" / "grid.png").is_file() and not (out / "images" / "quality_vs_steps.png").exists()
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(str(out))  # the card and images do not disturb the pipeline folder
