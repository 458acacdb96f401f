"""dvc.yaml against the code: `dvc repro` of the prepare stage in a temporary copy of the repository, with the
real dvc command; each stage lists the code it runs and the params.yaml keys it reads, and `dvc status` sees a
change to each listed key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from redistill.config import Params
from redistill.data.images import dir_md5


def _copy_tracked_repo(dst: Path) -> None:
    """Copy what a clone would hold (tracked + unignored files) into a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def test_dvc_repro_prepare_rebuilds_the_locked_data(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_tracked_repo(repo)
    assert not (repo / "data" / "reference").exists()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    dvc = [sys.executable, "-m", "dvc"]
    r = subprocess.run([*dvc, "repro", "prepare"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["prepare"]["outs"]}
    for path, md5 in outs.items():
        assert dir_md5(repo / path) == md5  # our md5 helper agrees with DVC's
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())
    # the stage is deterministic: a rebuild in a fresh copy gives the committed hashes
    assert outs == {o["path"]: o["md5"] for o in committed["stages"]["prepare"]["outs"]}
    status = subprocess.run([*dvc, "status", "prepare"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "", status.stdout


# the entry modules of each stage's command; the closure of what they import must be in the stage's deps.
# redistill/cli/ (dispatch) and redistill/config/ (parsing params.yaml, whose keys each stage lists)
# are left out on purpose: listing them would re-run the 30-minute teacher stage on any CLI change.
STAGE_ENTRIES = {
    "prepare": ["redistill.data.digits"],
    "features": ["redistill.evaluation.features", "redistill.evaluation.encoder"],
    "teacher": ["redistill.teachers.train"],
    "finetune": ["redistill.teachers.train"],
    "teacher_flow": ["redistill.teachers.train"],
    "teacher_t2i": ["redistill.teachers.text_to_image"],
    "teacher_dit": ["redistill.teachers.transformer"],
    "teacher_sd3": ["redistill.teachers.transformer"],
    "evaluate": ["redistill.evaluation.suite", "redistill.evaluation.spaces"],
    "validate": ["redistill.data.validation", "redistill.data.expectations"],
    "distill": ["redistill.methods"],
    "evaluate_student": ["redistill.evaluation.suite", "redistill.evaluation.spaces"],
    "drift": ["redistill.drift.detect", "redistill.evaluation.features"],
    "champion": ["redistill.cycle.champion"],
    "calibrate": ["redistill.cycle.calibration"],
}
# dispatch (cli/), parsing (config/) and package docstrings run no stage's work
NOT_DEPS = {"redistill/__init__.py", "tasks/__init__.py"}


def _not_dep(f: str) -> bool:
    return (
        f in NOT_DEPS
        or f.startswith(("redistill/cli/", "redistill/config/"))
        or (f.endswith("/__init__.py") and not _imports((REPO / f).read_text()))
    )


def _imports(source: str) -> bool:
    import ast

    return any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(source)))


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "redistill":
        return None
    base = {"tasks": REPO / "tasks", "flows": REPO / "flows"}.get(parts[1] if len(parts) > 1 else "", None)
    path = base.joinpath(*parts[2:]) if base is not None else REPO.joinpath(*parts)
    for cand in (path.with_suffix(".py"), path / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _closure(entries: list[str]) -> set[str]:
    """Repository files a stage's code imports, transitively (function-level imports included)."""
    import ast

    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        f = _module_file(name)
        if f is None or str(f) in seen:
            continue
        seen.add(str(f))
        if f.name == "__init__.py" and name in entries:  # a package entry: all its modules run (methods/ dispatches)
            todo += [f"{name}.{p.stem}" for p in f.parent.glob("*.py") if p.stem != "__init__"]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return {str(Path(s).relative_to(REPO)) for s in seen}


def test_every_stage_lists_the_code_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, entries in STAGE_ENTRIES.items():
        deps = [str(d) for d in stages[stage].get("deps", [])]
        for f in sorted(f for f in _closure(entries) if not _not_dep(f)):
            if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps):
                missing.setdefault(stage, []).append(f)
    assert not missing, f"dvc.yaml stages miss code they run: {missing}"


# --- params: each stage lists every params.yaml key its command reads, and `dvc status` sees a change to it ---


def _stage_command(cmd: str) -> str:
    """The redistill/cli/ function a stage's `cmd` runs: `redistill teacher train --out …` → `teacher_train`,
    `redistill teacher text-to-image` → `teacher_text_to_image`."""
    words = cmd.split()
    assert words[0] == "redistill", cmd
    name = []
    for w in words[1:]:
        if (
            w.startswith("-") or not w.replace("_", "").replace("-", "").isalnum()
        ):  # an option, a path or an interpolation: the name ended
            break
        name.append(w.replace("-", "_"))  # typer's command `text-to-image` is the function `..._text_to_image`
    return "_".join(name)


# `_settings` is dispatch: it parses params.yaml and sets the registry client's HTTP retries, which shape no
# stage output (like redistill/cli/ and redistill/config/ among the code deps, it is left out).
NOT_READS = {"_settings"}

PARAMS_METHODS = {n for n in dir(Params) if not n.startswith("_") and callable(getattr(Params, n))}


def _params_read(tree, fn_name: str, pname: str = "p", module: str = "redistill.cli", seen=None) -> set[tuple]:
    """(section, key) pairs, key None for a whole section, that the function `fn_name` of `module` reads from
    the Params object held in its variable `pname`; it follows `p` passed whole into helpers and library calls."""
    import ast

    seen = set() if seen is None else seen
    if (module, fn_name) in seen or fn_name in NOT_READS:
        return set()
    seen.add((module, fn_name))
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn_name), None)
    assert fn is not None, f"{fn_name} not found in {module}"
    imported = {
        a.asname or a.name: (node.module, a.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for a in node.names
    }
    inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    reads: set[tuple] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain p.section.key…
            chain = []
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            # `p.to_dict()["distill"]`, `p.sha256([...])`: Params' own methods, not settings sections
            if isinstance(node, ast.Name) and node.id == pname and chain[0] not in PARAMS_METHODS:
                reads.add((chain[0], chain[1] if len(chain) > 1 else None))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            at = [i for i, a in enumerate(node.args) if isinstance(a, ast.Name) and a.id == pname]
            if not at:
                continue
            callee, callee_module = node.func.id, module
            if callee in imported:
                callee_module, callee = imported[callee]
            f = _module_file(callee_module)
            if f is None:
                continue
            sub = ast.parse(f.read_text())
            target = next((n for n in ast.walk(sub) if isinstance(n, ast.FunctionDef) and n.name == callee), None)
            if target is not None:
                reads |= _params_read(sub, callee, target.args.args[at[0]].arg, callee_module, seen)
    return reads


def _cli_module(fn_name: str):
    """(parsed module, dotted name) of the redistill/cli/ module that defines the command function `fn_name`."""
    import ast

    found = []
    for f in sorted((REPO / "redistill" / "cli").glob("*.py")):
        tree = ast.parse(f.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == fn_name for n in tree.body):
            found.append((tree, "redistill.cli" if f.stem == "__init__" else f"redistill.cli.{f.stem}"))
    assert len(found) == 1, f"{fn_name} is defined in {len(found)} redistill/cli/ modules, not one"
    return found[0]


def test_every_stage_lists_the_params_it_reads():

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, spec in stages.items():
        listed = {str(e) for e in spec.get("params", [])}
        tree, module = _cli_module(_stage_command(spec["cmd"]))
        for section, key in sorted(_params_read(tree, _stage_command(spec["cmd"]), module=module), key=str):
            wanted = section if key is None else f"{section}.{key}"
            if section not in listed and wanted not in listed:
                missing.setdefault(stage, []).append(wanted)
    assert not missing, f"dvc.yaml stages miss params.yaml keys their command reads: {missing}"


def _leaves(d: dict, prefix: str = ""):
    """(dotted key, value) of every setting in a params.yaml mapping."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _another(v):
    """A value unlike `v`, of its kind when it has one."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "-changed"
    if isinstance(v, list):
        return v + (v[-1:] or [1])
    return 1


def _with(params: dict, key: str, value) -> dict:
    import copy

    out = copy.deepcopy(params)
    *path, last = key.split(".")
    node = out
    for k in path:
        node = node[k]
    node[last] = value
    return out


@pytest.mark.trials  # a whole cycle (or every key through DVC): `make test` stays under 12 minutes
def test_dvc_status_sees_a_change_to_every_params_key_a_stage_lists(tmp_path, monkeypatch):
    from dvc.repo import Repo

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # every dep and out as a small stub, so `dvc commit -f` writes a lock for all stages without running one
    # (a path another lies inside, as a teacher folder and its vae/ that a later stage reads, is a folder)
    paths = {
        repo / (next(iter(entry)) if isinstance(entry, dict) else entry)
        for spec in stages.values()
        for entry in [*spec.get("deps", []), *spec.get("outs", []), *spec.get("metrics", [])]
    }
    for path in sorted(paths, key=lambda q: len(q.parts), reverse=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("stub\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "commit", "-f", "-q"],
    ):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    monkeypatch.chdir(repo)  # DVC names stages relative to the working directory, as `dvc status` run there does

    def status(values: dict) -> dict:
        """What `dvc status` reports with params.yaml holding `values` (in process: ~0.4 s, not ~1.3 s a call)."""
        (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        with Repo(str(repo)) as r:
            return r.status()

    assert status(params) == {}  # the lock matches: nothing changed yet

    def marks(key: str) -> set[str]:
        """The stages a change to `key` must mark: those listing it or a section above it, or interpolating it."""
        return {
            name
            for name, spec in stages.items()
            if any(key == str(e) or key.startswith(f"{e}.") for e in spec.get("params", []))
            or "${" + key + "}" in spec["cmd"]
        }

    # every key changed at once: each stage reports each params entry it lists as modified, and nothing else
    everything = params
    for key, value in _leaves(params):
        everything = _with(everything, key, _another(value))
    reported = {
        name: {k for item in st if isinstance(item, dict) for k in item.get("changed deps", {}).get("params.yaml", {})}
        for name, st in status(everything).items()
    }
    assert reported == {name: {str(e) for e in spec["params"]} for name, spec in stages.items() if spec.get("params")}

    # one key at a time, one key for each (section, stages it must mark): exactly those stages change
    probes = {}
    for key, value in _leaves(params):
        probes.setdefault((key.split(".")[0], frozenset(marks(key))), (key, value))
    wrong = {}
    for key, value in probes.values():
        changed = set(status(_with(params, key, _another(value))))
        if changed != marks(key):
            wrong[key] = {"marked": sorted(changed), "expected": sorted(marks(key))}
    assert not wrong, f"`dvc status` after a change to each key: {wrong}"
