"""The registry contract on the real MLflow (SQLite in a temporary folder)."""

from __future__ import annotations

import pytest

from redistill.registry.client import (
    CHAMPION,
    PREFIX,
    PREVIOUS,
    REQUIRED_TAGS,
    RegistryError,
    alias,
    champion,
    client,
    find_by_key,
    register_student,
)

NAME = "digits-student"


@pytest.fixture()
def mlflow_client(tmp_path):
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.create_experiment("redistill", artifact_location=(tmp_path / "artifacts").as_uri())
    student = tmp_path / "student"
    student.mkdir()
    (student / "model_index.json").write_text("{}")

    def new_run():
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, str(student), "student")
        c.set_terminated(run.info.run_id)
        return run.info.run_id

    return c, new_run


def tags(key: str, gate: str = "passed") -> dict[str, str]:
    t = {k: f"{k}-value" for k in REQUIRED_TAGS}
    t.update(key=key, gate=gate, gate_reasons="pass absolute fid_ratio: 1.2 <= 1.5", num_inference_steps="4")
    return t


def test_promotion_moves_champion_and_previous(mlflow_client):
    c, new_run = mlflow_client
    assert champion(c, NAME) is None  # not even registered yet
    first = register_student(c, NAME, new_run(), "student", tags("k1"), promote=True)
    assert (first.version, first.promoted, first.replaced) == ("1", True, None)
    assert str(champion(c, NAME).version) == "1" and alias(c, NAME, PREVIOUS) is None
    second = register_student(c, NAME, new_run(), "student", tags("k2"), promote=True)
    assert second.replaced == "1"
    assert str(champion(c, NAME).version) == "2" and str(alias(c, NAME, PREVIOUS).version) == "1"
    mv = c.get_model_version(NAME, "2")
    assert {PREFIX + t for t in REQUIRED_TAGS} <= set(mv.tags)
    assert mv.source.endswith("/student") and mv.run_id


def test_a_rejected_version_is_recorded_and_moves_no_alias(mlflow_client):
    c, new_run = mlflow_client
    register_student(c, NAME, new_run(), "student", tags("k1"), promote=True)
    rejected = tags("k2", gate="rejected")
    rejected["gate_reasons"] = "FAIL absolute fid_ratio: 2.1 <= 1.5"
    r = register_student(c, NAME, new_run(), "student", rejected, promote=False)
    assert not r.promoted
    assert str(champion(c, NAME).version) == "1" and alias(c, NAME, PREVIOUS) is None
    mv = c.get_model_version(NAME, r.version)
    assert mv.tags[PREFIX + "gate"] == "rejected" and "FAIL" in mv.tags[PREFIX + "gate_reasons"]
    with pytest.raises(RegistryError, match="only a version whose gate passed"):
        register_student(c, NAME, new_run(), "student", tags("k3", gate="rejected"), promote=True)
    assert str(champion(c, NAME).version) == "1"


def test_a_version_without_every_tag_is_never_created(mlflow_client):
    c, new_run = mlflow_client
    t = tags("k1")
    del t["teacher_sha256"]
    with pytest.raises(RegistryError, match="redistill.teacher_sha256"):
        register_student(c, NAME, new_run(), "student", t, promote=True)
    assert champion(c, NAME) is None
    assert c.search_model_versions(f"name='{NAME}'") == []


def test_versions_are_found_by_idempotency_key(mlflow_client):
    c, new_run = mlflow_client
    register_student(c, NAME, new_run(), "student", tags("same"), promote=True)
    register_student(c, NAME, new_run(), "student", tags("other"), promote=True)
    register_student(c, NAME, new_run(), "student", tags("same", gate="rejected"), promote=False)
    assert [str(v.version) for v in find_by_key(c, NAME, "same")] == ["3", "1"]
    assert find_by_key(c, "no-such-model", "same") == []
    assert CHAMPION == "champion"
