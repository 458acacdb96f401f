"""`redistill demo` is the continuous loop, on tiny models: a champion made by `redistill champion` is registered as
version 1 through the evaluation and the gate (trigger bootstrap), a fine-tuned teacher lands in data/teachers/, the
watch finds it, a warm re-distillation from the champion is judged and promoted; a second demo changes nothing, and
the README's next steps (lineage, rollback) work on what it left."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from helpers import LENIENT_GATE
from redistill.cli import app
from redistill.registry.client import PREFIX, alias, client

runner = CliRunner()
NAME = "tiny-student"

SETTINGS = (
    f"""
teacher: {{name: tiny}}
registry: {{student_name: {NAME}}}
champion: {{out: data/champion/{NAME}}}
demo: {{new_teacher: data/teacher-updates/tiny-ft}}
watch: {{settle_seconds: 1.0}}
distill: {{method: progressive, target_steps: 2, batch_size: 8, checkpoint_every: 2, progressive: {{teacher_steps: 8, steps_per_round: 3}}}}
evaluate: {{num_samples: 120, max_samples: 240, bootstrap: 10, kid_subset_size: 50, sample_batch_size: 60, latency_repeats: 2,
           throughput_repeats: 1, throughput_batch: 8, curve_samples: 0}}
features: {{epochs: 12, encoder_epochs: 8}}
"""
    + LENIENT_GATE
)


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory, prefect_harness):
    from helpers import make_tiny_pipeline

    root = tmp_path_factory.mktemp("demows")
    shutil.copytree(digits_ws / "data", root / "data")
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    make_tiny_pipeline(root / "data" / "teacher-updates" / "tiny-ft", seed=1)  # other weights: a new teacher
    (root / "params.yaml").write_text(SETTINGS)
    return root


def test_the_champion_stage_writes_a_stock_folder_with_its_lineage(ws):
    r = runner.invoke(app, ["champion", "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    folder = ws / "data" / "champion" / NAME
    lineage = json.loads((folder / "redistill_lineage.json").read_text())
    from redistill.data.images import dir_md5
    from redistill.models.pipelines import pipeline_sha256

    assert lineage["teacher"] == {
        "path": "data/teachers/tiny",
        "sha256": pipeline_sha256(ws / "data" / "teachers" / "tiny"),
    }
    assert lineage["data"]["dvc_md5"] == dir_md5(ws / "data" / "reference")
    assert lineage["params"]["distill"]["method"] == "progressive" and lineage["code"]["git_commit"]
    assert lineage["budget"]["limit_s"] == 90 * 60 and lineage["budget"]["wall_time_s"] > 0
    assert lineage["figures"]["gate"]["passed"] is True and set(lineage["figures"]["fid_gap_floors"]) == {
        "classifier",
        "encoder",
    }
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and lineage["teacher"]["sha256"] in card
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)  # stock diffusers, no redistill
    assert type(pipe).__name__ == "DDPMPipeline"
    r = runner.invoke(app, ["champion", "--workspace", str(ws)])
    assert r.exit_code == 2 and "never overwritten" in r.output


def test_demo_registers_the_champion_then_promotes_a_warm_student_of_the_new_teacher(ws):
    t = time.perf_counter()
    r = runner.invoke(app, ["demo", "--workspace", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bootstrap"]["decision"] == "promoted" and out["bootstrap"]["version"] == "1"
    (teacher,) = [t for t in out["watch"]["teachers"] if t["status"] == "new"]
    assert teacher["teacher"] == "tiny-ft" and teacher["cycle"]["decision"] == "promoted"
    assert (ws / "data" / "teachers" / "tiny-ft" / "model_index.json").is_file()  # it landed where the watch looks
    c = client(f"sqlite:///{ws / 'mlflow.db'}")
    v1, v2 = (c.get_model_version(NAME, v) for v in ("1", "2"))
    assert v1.tags[PREFIX + "trigger"] == "bootstrap" and v1.tags[PREFIX + "init"] == "cold"
    assert v1.tags[PREFIX + "student_sha256"] and "adopted from" in c.get_run(v1.run_id).data.tags[PREFIX + "init_note"]
    assert v1.tags[PREFIX + "method"] == "progressive" and v1.tags[PREFIX + "num_inference_steps"] == "2"
    assert v2.tags[PREFIX + "trigger"] == "teacher" and v2.tags[PREFIX + "init"] == "warm:1"
    assert v2.tags[PREFIX + "teacher_uri"].endswith("data/teachers/tiny-ft")
    assert str(alias(c, NAME, "champion").version) == "2" and str(alias(c, NAME, "previous").version) == "1"
    assert [v["version"] for v in out["versions"]] == ["1", "2"] and out["versions"][1]["metrics"]["steps"] == 2
    # the warm cycle trained one round from the champion, a share of the cold rounds' steps
    assert teacher["cycle"]["decision"] == "promoted"
    first = time.perf_counter() - t

    # a second demo finds every step done: no new version, no distillation, no Prefect server
    t = time.perf_counter()
    r = runner.invoke(app, ["demo", "--workspace", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["bootstrap"]["deduplicated"] and again["watch"]["changed"] is False
    assert len(c.search_model_versions(f"name='{NAME}'")) == 2
    assert time.perf_counter() - t < min(30, first)

    # the next steps the demo prints work on what it left
    r = runner.invoke(app, ["lineage", "--alias", "champion", "--workspace", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["init"]["from_version"] == "1"
    r = runner.invoke(app, ["rollback", "--workspace", str(ws), "--reason", "test", "--json"])
    assert r.exit_code == 0, r.output
    assert str(alias(c, NAME, "champion").version) == "1"


def test_a_bootstrap_needs_its_student_and_a_student_needs_the_bootstrap_trigger(ws):
    r = runner.invoke(app, ["cycle", "--workspace", str(ws), "--trigger", "bootstrap"])
    assert r.exit_code == 2 and "--student DIR and --trigger bootstrap go together" in r.output
    r = runner.invoke(
        app, ["cycle", "--workspace", str(ws), "--trigger", "manual", "--student", str(ws / "data" / "champion" / NAME)]
    )
    assert r.exit_code == 2 and "go together" in r.output
