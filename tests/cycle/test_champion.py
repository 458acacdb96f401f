"""The committed champion is what its DVC stage made: its files match the stage's lock, the lock's inputs are the
committed teacher and the locked data, and its lineage says the same (teacher sha256, data md5, the settings, which
are today's `distill` settings, the code commit, the budget, and a gate it passed)."""

from __future__ import annotations

import json

import yaml

from helpers import REPO
from redistill.config import _Yaml12Loader, load_params
from redistill.data.images import dir_md5
from redistill.models.pipelines import pipeline_sha256

FOLDER = "data/champion/digits-student"


def _stage(name: str) -> dict:
    # YAML 1.2 as DVC writes it (`mixed_precision: no` is the string "no"), as params.yaml is read
    return yaml.load((REPO / "dvc.lock").read_text(), Loader=_Yaml12Loader)["stages"][name]


def _numbers(x):
    """The lock's values as numbers where DVC wrote a float PyYAML reads as a string (`3e-05`)."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def test_the_committed_champion_matches_its_stage_lock():
    lock = _stage("champion")
    (out,) = [o for o in lock["outs"] if o["path"] == FOLDER]
    assert dir_md5(REPO / FOLDER) == out["md5"], "the committed champion is not what `dvc repro -s champion` locked"
    deps = {d["path"]: d for d in lock["deps"]}
    teacher = "data/teachers/digits-ddpm"
    assert dir_md5(REPO / teacher) == deps[teacher]["md5"]  # made from the committed teacher
    prepared = {o["path"]: o["md5"] for o in _stage("prepare")["outs"]}
    assert deps["data/reference"]["md5"] == prepared["data/reference"]  # and from the locked data
    assert dir_md5(REPO / "data" / "features") == deps["data/features"]["md5"]  # judged in the committed spaces


def test_the_champion_carries_its_lineage_and_passed_its_gate():
    lineage = json.loads((REPO / FOLDER / "redistill_lineage.json").read_text())
    lock = _stage("champion")
    assert lineage["teacher"] == {
        "path": "data/teachers/digits-ddpm",
        "sha256": pipeline_sha256(REPO / "data" / "teachers" / "digits-ddpm"),
    }
    deps = {d["path"]: d for d in lock["deps"]}
    assert lineage["data"] == {"path": "data/reference", "dvc_md5": deps["data/reference"]["md5"]}
    # the recipe is the repository's distill settings: a cycle warm-started from it continues the same method
    assert lineage["params"]["distill"] == load_params(REPO / "params.yaml").to_dict()["distill"]
    assert lineage["params"]["distill"] == _numbers(lock["params"]["params.yaml"]["distill"])
    assert len(lineage["code"]["git_commit"]) == 40 and lineage["code"]["dirty"] is False
    budget = lineage["budget"]
    assert budget["within"] is True and budget["wall_time_s"] <= budget["limit_s"] <= 90 * 60
    assert lineage["figures"]["gate"]["passed"] is True
    assert set(lineage["figures"]["fid_gap_floors"]) == {"classifier", "encoder"}
    summary = json.loads((REPO / FOLDER / "redistill_distill.json").read_text())
    assert summary["method"] == lineage["params"]["distill"]["method"] and summary["init"] == "cold"
    card = (REPO / FOLDER / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and lineage["teacher"]["sha256"] in card


def test_the_committed_teachers_evaluation_draw_travels_with_the_repository():
    """A fresh clone does not draw the committed teacher again: every generation batch of its evaluation draw (the
    teacher at evaluate.reference_steps, evaluate.num_samples from evaluate.seed) is committed in the store, under
    the key an evaluation looks it up by, and holds what its key says."""
    import subprocess

    from safetensors import safe_open

    from redistill.evaluation.sampling import _batches, _cache_file, configure_scheduler, sample_store
    from redistill.models.pipelines import load_pipeline

    p = load_params(REPO / "params.yaml").evaluate
    teacher = REPO / "data" / "teachers" / "digits-ddpm"
    pipe = load_pipeline(teacher)
    sched = configure_scheduler(pipe, p.reference_steps, "auto")
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "data/samples"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    sha = pipeline_sha256(teacher)
    for seed, size in _batches(p.num_samples, p.seed, p.sample_batch_size):
        f, key = _cache_file(sample_store(REPO), pipe, sha, sched, p.reference_steps, seed, size)
        assert str(f.relative_to(REPO)) in tracked, f"{f.name} (batch seed {seed}) is not committed"
        with safe_open(f, "pt") as t:
            assert t.metadata()["key"] == key and tuple(t.get_tensor("images").shape) == (size, 1, 8, 8)
