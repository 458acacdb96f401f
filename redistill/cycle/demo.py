"""`redistill demo`: the continuous loop on the embedded digits, one cold cycle, or a latent demo (text-to-image, DiT,
SD3) in its own workspace. The commands run the cycle and the watch (both Prefect flows), so they are passed in; this module
decides the steps and returns what happened, and the command prints it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]
RunCycle = Callable[..., dict]  # (workspace, settings, teacher, data, trigger, student) -> the cycle's result


class DemoStopped(RuntimeError):
    """The demo cannot go on; `code` is the exit status, the message (None: already logged) says why."""

    def __init__(self, message: str | None, code: int = 2):
        super().__init__(message)
        self.message, self.code = message, code


def _relative(path: Path, root: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def demo_cycle(
    ws: Path,
    p,
    teacher: Path,
    prepare: Callable[[], object],
    train_teacher: Callable[[], object],
    recipe: str,
    log: Log,
    run_cycle: RunCycle,
    student: Path | None = None,
) -> tuple[dict, dict]:
    """A demo's steps in workspace `ws`: its data (`prepare`) and feature spaces where missing, its teacher
    (`train_teacher` with `recipe` where missing), one cycle (with `student`: trigger bootstrap, that student judged
    and registered); returns (the cycle's result, seconds per step)."""
    from redistill.evaluation.encoder import train_feature_spaces

    timings, t = {}, time.perf_counter()
    if not (ws / "data" / "reference").is_dir():
        prepare()
    timings["prepare"], t = time.perf_counter() - t, time.perf_counter()
    if not all((ws / "data" / "features" / f).is_file() for f in ("classifier.safetensors", "encoder.safetensors")):
        train_feature_spaces(ws, p, log=lambda _: None)
    timings["features"], t = time.perf_counter() - t, time.perf_counter()
    if not (teacher / "model_index.json").is_file():
        log(f"no teacher at {teacher}: training one with {recipe}")
        train_teacher()
    timings["teacher"], t = time.perf_counter() - t, time.perf_counter()
    result = run_cycle(ws, p, teacher, ws / "data" / "reference", "bootstrap" if student else "manual", student)
    timings["bootstrap cycle" if student else "cycle"] = time.perf_counter() - t
    return result, timings


def watch_until_handled(p, teacher_name: str, watch_teachers: Callable[[], dict], log_err: Log) -> dict:
    """The watch's look at data/teachers/ until the landed teacher is handled (a folder that changed less than
    watch.settle_seconds ago is pending: looked at again once it has settled, as the deployment would)."""
    deadline = time.time() + p.watch.settle_seconds + 30
    while True:
        r = watch_teachers()
        waiting = [f for f in r.get("pending", []) if f["name"] == teacher_name]
        if not waiting or time.time() > deadline:
            return r
        log_err(f"   {teacher_name} is settling ({waiting[0]['reason']}); looking again in 5 s")
        time.sleep(5)


def demo_loop(
    root: Path,
    p,
    teacher: Path,
    prepare: Callable[[], object],
    train: Callable[[], object],
    recipe: str,
    log: Log,
    log_err: Log,
    run_cycle: RunCycle,
    watch_teachers: Callable[[], dict],
) -> dict:
    """The committed champion as version 1 (trigger bootstrap), a new teacher landing, the watch's look, the warm
    cycle it starts; returns the model, the bootstrap, the watch's result, every version and the time per step. A
    second run finds every step done and changes nothing."""
    from redistill.core.files import copy_folder
    from redistill.registry.queries import registry_client, versions

    name = p.registry.student_name
    timings = {}
    champion_dir = root / p.champion.out
    if not (champion_dir / "model_index.json").is_file():
        raise DemoStopped(
            f"no committed champion at {champion_dir}; restore it (`git checkout -- {p.champion.out}`) "
            "or rebuild it with `dvc repro -s champion` (about 90 minutes on 2 cores)"
        )
    log(
        f"1. the committed champion {p.champion.out}: registered through the evaluation and the gate (trigger bootstrap)"
    )
    v1, step = demo_cycle(root, p, teacher, prepare, train, recipe, log, run_cycle, student=champion_dir)
    timings.update(step)
    if v1["decision"] != "promoted":
        log(f"the committed champion was {v1['decision']} (version {v1['version']}): {v1['reasons']}")
        log(
            "no champion to re-distil from; see `redistill lineage --version "
            f"{v1['version']}` and the calibration (`redistill calibrate`)"
        )
        raise DemoStopped(None, 1)
    t = time.perf_counter()
    landed = root / "data" / "teachers" / Path(p.demo.new_teacher).name
    source = root / p.demo.new_teacher
    if not (landed / "model_index.json").is_file():
        if not (source / "model_index.json").is_file():
            raise DemoStopped(
                f"no new teacher at {source}; restore it (`git checkout -- {p.demo.new_teacher}`) or "
                "make one with `redistill teacher finetune` (the DVC stage finetune)"
            )
        copy_folder(source, landed)  # whole or not at all, as a finished download lands
        log(f"2. a new teacher landed: {_relative(landed, root)} (fine-tuned from {p.teacher.name})")
    else:
        log(f"2. the new teacher {_relative(landed, root)} landed in an earlier run")
    log("3. the watch looks for new teachers (`redistill watch --once --only teachers`, as the watch deployment does)")
    look = watch_until_handled(p, landed.name, watch_teachers, log_err)
    timings["watch and cycle"] = time.perf_counter() - t
    return {
        "kind": "digits",
        "workspace": str(root),
        "model": name,
        "bootstrap": v1,
        "watch": look,
        "versions": versions(registry_client(root), name),
        "timings_s": timings,
    }


# the latent demos: kind → (settings section of the demo, of its teacher's recipe, the teacher's folder under data/)
LATENT_DEMOS = {
    "text-to-image": ("t2i_demo", "t2i_teacher", "t2i-teachers"),
    "dit": ("dit_demo", "dit_teacher", "dit-teachers"),
    "sd3": ("sd3_demo", "sd3_teacher", "sd3-teachers"),
}


def latent_demo_workspace(root: Path, p, kind: str) -> tuple[Path, object]:
    """A latent demo's workspace runs/demo-<kind> and its settings (the workspace's params.yaml with the kind's demo
    section applied, written to that workspace's params.yaml); raises ConfigError."""
    import yaml

    from redistill.config.overrides import demo_settings

    section = LATENT_DEMOS[kind][0]
    raw, sp = demo_settings(p, section)
    sub = root / "runs" / f"demo-{kind}"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "params.yaml").write_text(
        f"# written by `redistill demo --kind {kind}` from the workspace's params.yaml and its {section} section\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    return sub, sp


def demo_latent(
    kind: str, root: Path, sub: Path, sp, log: Log, log_err: Log, run_cycle: RunCycle
) -> tuple[Path, dict, dict]:
    """The captioned (and labelled) digits at 16×16, the kind's embedded teacher (trained here if missing: the
    text-to-image UNet, the DiT or the SD3 transformer), and one cycle that distils the demo section's student in
    workspace `sub` with settings `sp`; returns (teacher, result, timings)."""
    from redistill.data.captions import prepare_t2i

    _, recipe_section, folder = LATENT_DEMOS[kind]
    teacher = root / "data" / folder / getattr(sp, recipe_section).name
    if kind == "text-to-image":
        from redistill.teachers.text_to_image import train_embedded

        train, budget = (lambda: train_embedded(root, sp, teacher, log=log_err)), "about 45 min on one core"
    else:
        from redistill.teachers.transformer import train_embedded as train_transformer

        train, budget = (lambda: train_transformer(kind, root, sp, teacher, log=log_err)), "about 50 min on one core"
    result, timings = demo_cycle(
        sub,
        sp,
        teacher,
        lambda: prepare_t2i(sp.prepare, sub / "data", seed=sp.t2i_teacher.seed, image_size=sp.t2i_teacher.image_size),
        train,
        f"the `{recipe_section}` recipe ({budget})",
        log,
        run_cycle,
    )
    return teacher, result, timings


def demo_summary(result: dict, metrics: dict | None) -> dict:
    """The decision and the headline figures of a demo cycle, for --json."""
    out = {k: result.get(k) for k in ("decision", "version", "run_id", "key", "deduplicated", "reasons")}
    if metrics:
        q, s = metrics["quality"], metrics["speed"]
        out["figures"] = {
            "steps": metrics["steps"],
            "reference_steps": metrics["reference"]["steps"],
            "fid": q["fid"],
            "reference_fid": q["reference_fid"],
            "fid_ratio": q["fid"] / q["reference_fid"] if q["reference_fid"] else None,
            **{
                k: q[k]
                for k in (
                    "recognisable_share",
                    "reference_recognisable_share",
                    "prompt_adherence",
                    "reference_prompt_adherence",
                    "prompt_adherence_gap_points",
                )
                if k in q
            },
            **{
                k: s[k]
                for k in (
                    "speedup_throughput",
                    "speedup_latency",
                    "unet_passes_per_step",
                    "reference_unet_passes_per_step",
                    "vae_decode_ms_p50",
                )
                if k in s
            },
        }
    return out
