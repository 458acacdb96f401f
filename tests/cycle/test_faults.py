"""The fault catalogue: broken teachers, broken data and bad settings, each through the real CLI.

Every case runs `redistill cycle --teacher … --data …` (real Prefect engine, real MLflow on SQLite) in a
workspace that already has a champion, and must end with:
- a non-zero exit and one message that names the offending file or key;
- the champion and `previous` untouched, and no new registry version;
- any MLflow run it opened closed as FAILED with its reason (`redistill.failure`);
- nothing written under `data/`, and the faulty input itself left as it was (pickles never opened).

The drift-batch faults run through `redistill watch --once` in tests/watch/test_watch.py. The module ends by
printing "faults: N/N handled".
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import LENIENT_GATE, TINY_CYCLE
from redistill.cli import app
from redistill.registry.client import alias, client

runner = CliRunner()
NAME = "digits-student"
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
HANDLED: list[str] = []


@pytest.fixture(scope="module")
def ws(digits_ws, tmp_path_factory, prefect_harness):
    """A workspace with a champion (one promoted cycle), and a folder outside it for the faulty inputs."""
    from helpers import make_tiny_pipeline

    root = tmp_path_factory.mktemp("faultws")
    for sub in ("reference", "features"):
        shutil.copytree(digits_ws / "data" / sub, root / "data" / sub)
    make_tiny_pipeline(root / "data" / "teachers" / "tiny")
    (root / "params.yaml").write_text(TINY_CYCLE + "teacher: {name: tiny}\n" + LENIENT_GATE)
    r = runner.invoke(app, ["cycle", "--workspace", str(root), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["decision"] == "promoted"
    yield root
    import helpers

    helpers.SUMMARY_LINES.append(f"faults: {len(HANDLED)}/{len(CASES)} handled")


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks not followed) with its content hash."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_symlink():
            out[str(f.relative_to(folder))] = "-> " + os.readlink(f)
        elif f.is_file():
            out[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _registry(root: Path):
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    versions = sorted(v.version for v in c.search_model_versions(f"name='{NAME}'"))
    aliases = {a: getattr(alias(c, NAME, a), "version", None) for a in ("champion", "previous")}
    exp = c.get_experiment_by_name("redistill")
    runs = {r.info.run_id: r for r in c.search_runs([exp.experiment_id], max_results=1000)}
    return c, versions, aliases, runs


# ---- teachers ---------------------------------------------------------------------------------------


def _teacher(tmp: Path, seed: int = 1) -> Path:
    from helpers import make_tiny_pipeline

    return make_tiny_pipeline(tmp / "teacher", seed=seed)


def t_truncated(tmp):
    t = _teacher(tmp)
    w = t / WEIGHTS
    w.write_bytes(w.read_bytes()[:-1000])
    return {"teacher": t}, ["diffusion_pytorch_model.safetensors", "truncated"]


def t_zero_bytes(tmp):
    t = _teacher(tmp)
    (t / WEIGHTS).write_bytes(b"")
    return {"teacher": t}, ["diffusion_pytorch_model.safetensors"]


def t_oversized_header(tmp):
    t = _teacher(tmp)
    w = t / WEIGHTS
    data = w.read_bytes()
    w.write_bytes(struct.pack("<Q", 10**12) + data[8:])  # a header length beyond the file
    return {"teacher": t}, ["diffusion_pytorch_model.safetensors", "header"]


def _set_first_weight(t: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    w = t / WEIGHTS
    sd = load_file(w)
    k = sorted(sd)[0]
    sd[k] = sd[k].clone().fill_(value)
    save_file(sd, w)


def t_nan_weights(tmp):
    t = _teacher(tmp)
    _set_first_weight(t, float("nan"))
    return {"teacher": t}, ["non-finite"]


def t_inf_weights(tmp):
    t = _teacher(tmp)
    _set_first_weight(t, float("inf"))
    return {"teacher": t}, ["non-finite"]


def t_config_does_not_match_weights(tmp):
    t = _teacher(tmp)
    cfg = json.loads((t / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    (t / "unet" / "config.json").write_text(json.dumps(cfg))
    return {"teacher": t}, ["unet"]


def t_missing_unet(tmp):
    t = _teacher(tmp)
    shutil.rmtree(t / "unet")
    return {"teacher": t}, ["unet"]


def t_missing_model_index(tmp):
    t = _teacher(tmp)
    (t / "model_index.json").unlink()
    return {"teacher": t}, ["model_index.json"]


def t_missing_scheduler_config(tmp):
    t = _teacher(tmp)
    shutil.rmtree(t / "scheduler")
    return {"teacher": t}, ["scheduler"]


class _Bomb:
    """Unpickling this writes a marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _pickle_only(tmp, suffix):
    t = _teacher(tmp)
    (t / WEIGHTS).unlink()
    marker = tmp / "UNPICKLED"
    (t / "unet" / f"diffusion_pytorch_model{suffix}").write_bytes(pickle.dumps(_Bomb(marker)))
    return {"teacher": t, "never": marker}, ["safetensors"]


def t_pickle_bin(tmp):
    return _pickle_only(tmp, ".bin")


def t_pickle_ckpt(tmp):
    return _pickle_only(tmp, ".ckpt")


def t_pickle_pt(tmp):
    return _pickle_only(tmp, ".pt")


def t_symlink_outside(tmp):
    t = _teacher(tmp)
    outside = tmp / "elsewhere.safetensors"
    shutil.move(t / WEIGHTS, outside)
    (t / WEIGHTS).symlink_to(outside)
    return {"teacher": t}, ["diffusion_pytorch_model.safetensors", "outside"]


def t_still_being_written(tmp):
    t = _teacher(tmp)
    (t / "unet" / "diffusion_pytorch_model.safetensors.part").write_bytes(b"\0" * 64)
    return {"teacher": t}, [".part"]


def t_not_a_folder(tmp):
    return {"teacher": tmp / "no-such-teacher"}, ["no-such-teacher"]


# ---- data -------------------------------------------------------------------------------------------


def _data(tmp, ws, n: int = 200) -> Path:
    """The first n reference images with their labels."""
    d = tmp / "data"
    d.mkdir()
    files = sorted((ws / "data" / "reference").glob("*.png"))[:n]
    for f in files:
        shutil.copy2(f, d / f.name)
    names = {f.name for f in files}
    rows = (ws / "data" / "reference" / "labels.csv").read_text().splitlines()
    (d / "labels.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[0] in names]) + "\n")
    return d


def d_empty(tmp, ws):
    d = tmp / "empty"
    d.mkdir()
    return {"data": d}, ["empty", "no PNG images"]


def d_missing(tmp, ws):
    return {"data": tmp / "no-such-data"}, ["no-such-data"]


def d_truncated_image(tmp, ws):
    d = _data(tmp, ws)
    f = sorted(d.glob("*.png"))[3]
    f.write_bytes(f.read_bytes()[:30])
    return {"data": d}, [f.name]


def d_not_an_image(tmp, ws):
    d = _data(tmp, ws)
    f = sorted(d.glob("*.png"))[5]
    f.write_text("this is not a PNG")
    return {"data": d}, [f.name]


def d_mixed_sizes(tmp, ws):
    d = _data(tmp, ws)
    f = sorted(d.glob("*.png"))[7]
    Image.open(f).resize((16, 16)).save(f)
    return {"data": d}, [f.name]


def d_mixed_modes(tmp, ws):
    d = _data(tmp, ws)
    f = sorted(d.glob("*.png"))[9]
    Image.open(f).convert("RGB").save(f)
    return {"data": d}, [f.name]


def d_sixteen_bit(tmp, ws):
    d = _data(tmp, ws)
    f = sorted(d.glob("*.png"))[11]
    a = np.asarray(Image.open(f), dtype=np.uint16) * 257
    Image.fromarray(a).save(f)
    return {"data": d}, [f.name]


def d_decompression_bomb(tmp, ws):
    d = _data(tmp, ws)
    f = d / "bomb.png"
    Image.new("L", (12000, 12000)).save(f, optimize=True)  # 144 Mpixel, a few hundred kB on disk
    return {"data": d}, ["bomb.png"]


def _labels(d: Path, rows: list[str]) -> None:
    with open(d / "labels.csv", "a") as f:
        f.write("\n".join(rows) + "\n")


def d_labels_bad_row(tmp, ws):
    d = _data(tmp, ws)
    _labels(d, [f"{sorted(d.glob('*.png'))[0].name},seven"])
    return {"data": d}, ["labels.csv"]


def d_labels_unknown_file(tmp, ws):
    d = _data(tmp, ws)
    _labels(d, ["ghost.png,3"])
    return {"data": d}, ["labels.csv", "ghost.png"]


def d_labels_parent_path(tmp, ws):
    d = _data(tmp, ws)
    _labels(d, ["../escape.png,3"])
    return {"data": d}, ["labels.csv", "../escape.png"]


def d_labels_absolute_path(tmp, ws):
    d = _data(tmp, ws)
    _labels(d, ["/etc/passwd,3"])
    return {"data": d}, ["labels.csv", "/etc/passwd"]


def d_constant_images(tmp, ws):
    d = tmp / "constant"
    d.mkdir()
    for i in range(150):
        Image.new("L", (8, 8), color=128).save(d / f"c{i:03d}.png")
    return {"data": d}, ["std"]


def d_near_total_duplicates(tmp, ws):
    d = tmp / "dups"
    d.mkdir()
    src = sorted((ws / "data" / "reference").glob("*.png"))
    for i in range(150):
        shutil.copy2(src[i % 3], d / f"d{i:03d}.png")
    return {"data": d}, ["duplicate"]


def d_changes_while_read(tmp, ws):
    """An image lands in the data folder while the cycle distils from it: nothing may be registered."""
    d = _data(tmp, ws)
    extra = sorted((ws / "data" / "reference").glob("*.png"))[-1]
    return {"data": d, "during_distillation": lambda: shutil.copy2(extra, d / "late.png"), "changed_inputs": True}, [
        str(d),
        "changed while the cycle read it",
    ]


def d_too_few(tmp, ws):
    return {"data": _data(tmp, ws, n=20)}, ["validate.min_count", "20"]


# ---- settings ---------------------------------------------------------------------------------------


def _params(tmp, text: str) -> Path:
    p = tmp / "bad.yaml"
    p.write_text(TINY_CYCLE + "teacher: {name: tiny}\n" + LENIENT_GATE + text)
    return p


def s_unknown_key(tmp, ws):
    return {"params": _params(tmp, "drift: {alpah: 0.1}\n")}, ["alpah"]


def s_unknown_section(tmp, ws):
    return {"params": _params(tmp, "distil_typo: {steps: 3}\n")}, ["distil_typo"]


def s_wrong_type(tmp, ws):
    return {"params": _params(tmp, "drift: {permutations: many}\n")}, ["permutations"]


def s_halving_impossible(tmp, ws):
    return {"params": _rewrite(_params(tmp, ""), "teacher_steps: 4", "teacher_steps: 6")}, ["teacher_steps"]


def _rewrite(path: Path, old: str, new: str) -> Path:
    path.write_text(path.read_text().replace(old, new))
    return path


def s_unknown_method(tmp, ws):
    return {"params": _rewrite(_params(tmp, ""), "method: progressive", "method: magic")}, ["magic"]


def s_duplicate_key(tmp, ws):  # YAML would keep the last silently: the run would not be the one written
    return {"params": _rewrite(_params(tmp, ""), "method: progressive", "method: dmd, method: progressive")}, ["twice"]


def s_zero_batch(tmp, ws):
    return {"params": _rewrite(_params(tmp, ""), "batch_size: 8", "batch_size: 0")}, ["batch_size"]


def s_bad_init(tmp, ws):
    return {"params": _rewrite(_params(tmp, ""), "distill: {", "distill: {init: tepid, ")}, ["init"]


CASES = {
    f.__name__: f
    for f in (
        t_truncated,
        t_zero_bytes,
        t_oversized_header,
        t_nan_weights,
        t_inf_weights,
        t_config_does_not_match_weights,
        t_missing_unet,
        t_missing_model_index,
        t_missing_scheduler_config,
        t_pickle_bin,
        t_pickle_ckpt,
        t_pickle_pt,
        t_symlink_outside,
        t_still_being_written,
        t_not_a_folder,
        d_empty,
        d_missing,
        d_truncated_image,
        d_not_an_image,
        d_mixed_sizes,
        d_mixed_modes,
        d_sixteen_bit,
        d_decompression_bomb,
        d_labels_bad_row,
        d_labels_unknown_file,
        d_labels_parent_path,
        d_labels_absolute_path,
        d_constant_images,
        d_near_total_duplicates,
        d_too_few,
        d_changes_while_read,
        s_unknown_key,
        s_unknown_section,
        s_wrong_type,
        s_halving_impossible,
        s_unknown_method,
        s_duplicate_key,
        s_zero_batch,
        s_bad_init,
    )
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_is_refused_cleanly(ws, tmp_path, case, monkeypatch):
    make = CASES[case]
    spec, expected = make(tmp_path) if case.startswith("t_") else make(tmp_path, ws)
    if "during_distillation" in spec:  # change the input while the real cycle runs (after its key was taken)
        import redistill.flows.cycle as flow_module

        real = flow_module.distill_student

        def distill_then_change(*args, **kwargs):
            out = real(*args, **kwargs)
            spec["during_distillation"]()
            return out

        monkeypatch.setattr(flow_module, "distill_student", distill_then_change)
    teacher = spec.get("teacher", ws / "data" / "teachers" / "tiny")
    data = spec.get("data", ws / "data" / "reference")
    args = ["cycle", "--workspace", str(ws), "--teacher", str(teacher), "--data", str(data), "--force"]
    if "params" in spec:
        args += ["--params", str(spec["params"])]
    inputs_before = _tree(tmp_path)
    data_before = _tree(ws / "data")
    _, versions, aliases, runs = _registry(ws)

    r = runner.invoke(app, args)

    assert r.exit_code != 0, f"{case}: the cycle did not fail\n{r.output[-2000:]}"
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"{case}: expected one error message\n{r.output[-2000:]}"
    for needle in expected:
        assert needle.lower() in errors[0].lower(), f"{case}: {needle!r} not in the message: {errors[0][:1500]}"
    c, versions_after, aliases_after, runs_after = _registry(ws)
    assert versions_after == versions, f"{case}: a registry version was added"
    assert aliases_after == aliases, f"{case}: an alias moved"
    for rid in set(runs_after) - set(runs):
        run = runs_after[rid]
        assert run.info.status == "FAILED" and run.data.tags.get("redistill.failure"), (
            f"{case}: run {rid} is {run.info.status} without a recorded failure"
        )
    assert _tree(ws / "data") == data_before, f"{case}: something was written under data/"
    if not spec.get("changed_inputs"):
        assert _tree(tmp_path) == inputs_before, f"{case}: the faulty input was changed"
    if "never" in spec:
        assert not spec["never"].exists(), f"{case}: a pickle was unpickled"
    HANDLED.append(case)
