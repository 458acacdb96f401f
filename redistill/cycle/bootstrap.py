"""A workspace from just a teacher and a data folder: what a cycle needs, derived on first use.

`REDISTILL_HOME=/new/ws redistill cycle --teacher T --data D` in an empty workspace works because, before
the cycle resolves its inputs, `ensure_workspace` derives from `D` what the embedded digits get from their
own stages — with no step that needs labels:
1. **The reference set** `data/reference/`: a byte-for-byte copy of D's PNG images (and its `labels.csv` and captions, if
   any), so its md5 is D's. The validation bands of every later batch are learnt from it (GX, per channel).
2. **The evaluation feature space**: the label-free SimCLR encoder (redistill/encoder.py) trained on the
   reference, saved with its sha256 in `data/features/`. The digit classifier needs labels and a held-out
   split, so it is not made here; `evaluate.features: [auto]` measures in the classifier only where the
   workspace has one, and recognisability is gated only then.
3. **Versioning**: where the workspace is a DVC repository, both folders are `dvc add`ed; either way
   `data/bootstrap.json` records what was derived from what (D's path and md5, the reference's md5, the
   encoder's sha256 and training figures), and the cycle's lineage carries the same hashes.

Nothing is replaced: a workspace that already has a reference or an encoder keeps them. Two cycles that
start together in an empty workspace derive once (a file lock).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RECORD = "bootstrap.json"


def name_model(root: Path, p, teacher: Path, named_by_settings: bool) -> str:
    """The registered model's name for a workspace derived from a user's teacher: the settings' name where they give
    one (`named_by_settings`), else `<teacher folder>-student`, recorded in data/bootstrap.json so every later
    command finds it."""
    from redistill.config import recorded_model_name
    from redistill.data.images import safe_name

    if named_by_settings or recorded_model_name(root):
        return p.registry.student_name
    name = f"{safe_name(Path(teacher).resolve().name)}-student"
    f = Path(root) / "data" / RECORD
    previous = json.loads(f.read_text()) if f.is_file() else []
    history = previous if isinstance(previous, list) else [previous]
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{RECORD}.tmp{os.getpid()}")
    tmp.write_text(
        json.dumps(
            history
            + [
                {
                    "named_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "student_name": name,
                    "after_teacher": str(Path(teacher).resolve()),
                }
            ],
            indent=2,
        )
        + "\n"
    )
    tmp.replace(f)
    p.registry.student_name = name
    return name


def needs_bootstrap(root: Path, names: list[str]) -> bool:
    """Whether the workspace lacks a reference set or the encoder that `names` (evaluate.features) measure in."""
    from redistill.evaluation import encoder
    from redistill.evaluation import spaces as feature_spaces

    data = Path(root) / "data"
    wants_encoder = "encoder" in feature_spaces.resolve(names, data / "features")
    return not (data / "reference").is_dir() or (
        wants_encoder and not (data / "features" / encoder.WEIGHTS_FILE).is_file()
    )


def _copy_reference(src: Path, out: Path) -> int:
    """Copy the PNGs (and labels.csv, captions.csv or metadata.jsonl) of `src` into `out`, written aside and renamed: never half a folder."""
    from redistill.data.base import IMAGE_SUFFIXES

    files = sorted(f for f in Path(src).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        for extra in ("labels.csv", "captions.csv", "metadata.jsonl"):  # labels, and a text-to-image set's captions
            if (Path(src) / extra).is_file():
                shutil.copyfile(Path(src) / extra, tmp / extra)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(files)


def _version(root: Path, path: Path) -> dict:
    """`dvc add` where the workspace is a DVC repository; a failure is recorded, not fatal (the md5s are kept)."""
    from redistill.registry.lineage import dvc_add

    try:
        return dvc_add(root, path)
    except (RuntimeError, OSError) as e:
        return {"dvc": False, "reason": str(e)[:500]}


def ensure_workspace(root: Path, data: Path, p, log: Callable[[str], None] = print) -> dict | None:
    """Derive the reference set and the label-free feature space from `data` where the workspace lacks
    them (see the module docstring); returns what was derived, or None when nothing was needed.

    Raises `DataError` (nothing written) when `data` is not a usable image folder."""
    from filelock import FileLock

    from redistill.data.images import dir_md5, load_image_folder
    from redistill.evaluation import encoder
    from redistill.evaluation import spaces as feature_spaces

    root, data = Path(root), Path(data)
    if not data.is_dir() or not needs_bootstrap(root, p.evaluate.features):
        return None  # a missing data folder is the cycle's to refuse, with its own message
    (root / "data").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "data" / ".bootstrap.lock")):
        if not needs_bootstrap(root, p.evaluate.features):  # another process derived them while this one waited
            return None
        record: dict = {
            "derived_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "from_data": str(data.resolve()),
        }
        reference = root / "data" / "reference"
        if not reference.is_dir():
            images = load_image_folder(data)  # refuses unreadable, mixed-size or mislabelled data: nothing written
            n = _copy_reference(data, reference)
            record["reference"] = {
                "images": n,
                "channels": images.channels,
                "size": list(images.size),
                "labels": images.labels is not None,
                "from_md5": dir_md5(data),
                "md5": dir_md5(reference),
                "dvc": _version(root, reference),
            }
            log(
                f"workspace: data/reference derived from {data} ({n} images, {images.channels} channel(s), "
                f"{images.size[0]}×{images.size[1]}{', labelled' if images.labels is not None else ', no labels'})"
            )
        features_dir = root / "data" / "features"
        if (
            "encoder" in feature_spaces.resolve(p.evaluate.features, features_dir)
            and not (features_dir / encoder.WEIGHTS_FILE).is_file()
        ):
            ref, ref_md5 = load_image_folder(reference), dir_md5(reference)
            log(f"workspace: training the label-free encoder on data/reference ({p.features.encoder_epochs} epochs)")
            model, metrics = encoder.train_encoder(
                ref.images, epochs=p.features.encoder_epochs, dim=p.features.encoder_dim, seed=p.features.seed, log=log
            )
            encoder.save_encoder(
                model, features_dir, {"params": vars(p.features), "metrics": metrics, "trained_on": ref_md5}
            )
            record["encoder"] = {
                "sha256": feature_spaces.sha256s(["encoder"], features_dir)["encoder"],
                "metrics": metrics,
                "trained_on_md5": ref_md5,
                "dvc": _version(root, features_dir),
            }
        previous = json.loads((root / "data" / RECORD).read_text()) if (root / "data" / RECORD).is_file() else []
        history = previous if isinstance(previous, list) else [previous]
        tmp = root / "data" / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(history + [record], indent=2) + "\n")
        tmp.replace(root / "data" / RECORD)
        return record
