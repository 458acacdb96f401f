"""Data validation, the library half: a per-image table and the bands learnt from the reference.

The great_expectations suite that runs over this table is built in `tasks/validate.py` (GX is not imported
by the library). Every image file becomes one row, and a file that cannot be decoded still becomes a row
(`readable = False`), so one broken image fails one expectation instead of stopping the table.

Which bands validate a folder (`validation_basis`): `data/reference`'s, unless the folder is a representative set
the watch grew. Such a set carries `grown_from.json` (versioned with it, part of its md5): the reference it
grew from, by md5, and the drift batches the watch accepted into it. It is validated against that reference's
bands widened to cover each accepted batch's own bands, and refused by name when `data/reference` is no
longer the reference it grew from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from redistill.config import ValidateParams
from redistill.data import IMAGE_SUFFIXES, DataError, dir_md5, read_label_map, read_png

GROWN_FROM = "grown_from.json"  # inside a grown representative set: the reference and batches it grew from
MAX_CHANNELS = 3  # read_png gives grey (1) or RGB (3) images
CHANNEL_STATS = ("mean", "std")  # learnt per channel: columns mean_c0, std_c0, … (redistill.drift.image_stats)
TABLE_COLUMNS = ("file", "readable", "height", "width", "channels", "min", "max", "mean", "std",
                 *(f"{s}_c{k}" for s in CHANNEL_STATS for k in range(MAX_CHANNELS)), "sharpness", "saturation",
                 "nan_count", "inf_count", "pixel_sha256", "label", "error")  # error: why a file was unreadable


def band_columns(channels: int) -> list[str]:
    """The table columns whose bands are learnt from the reference, for images of `channels` channels:
    per-channel mean and spread, sharpness, and saturation (colour only: grey images have none)."""
    return [f"{s}_c{k}" for s in CHANNEL_STATS for k in range(channels)] + ["sharpness"] + \
        (["saturation"] if channels == 3 else [])


def image_table(folder: Path):
    """One row per image file in `folder`: shape, value statistics (overall, per channel, sharpness and
    saturation, as the drift tests measure them), a pixel hash and the label (None without labels.csv)."""
    import pandas as pd

    from redistill.drift import image_stats

    folder = Path(folder)
    files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    labels = read_label_map(folder) if files else {}  # a file without a label gets None: a failing row
    rows = []
    for name in files:
        try:
            x = read_png(folder / name).astype(np.float32) / 255.0
        except Exception as e:  # any decoder error: the row records it, the expectation on `readable` fails
            rows.append({"file": name, "readable": False, **{c: None for c in TABLE_COLUMNS[2:-1]},
                         "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        finite = x[np.isfinite(x)]
        chw = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        stats = image_stats(chw[None])
        per_channel = {f"{c}_c{k}": float(stats[f"{c}_c{k}"][0]) if k < chw.shape[0] else None
                       for c in CHANNEL_STATS for k in range(MAX_CHANNELS)}
        rows.append({
            "file": name,
            "readable": True,
            "height": int(x.shape[0]),
            "width": int(x.shape[1]),
            "channels": 1 if x.ndim == 2 else int(x.shape[2]),
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            **per_channel,
            "sharpness": float(stats["sharpness"][0]),
            "saturation": float(stats["saturation"][0]),
            "nan_count": int(np.isnan(x).sum()),
            "inf_count": int(np.isinf(x).sum()),
            "pixel_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
            "label": labels.get(name) if labels else None,
            "error": "",
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def reference_profile(table, p: ValidateParams) -> dict:
    """What the reference looks like: its image shape, the bands of every `band_columns` statistic (learnt per
    channel), and its label distribution when every image has a label."""
    ok = table[table["readable"].astype(bool)]
    if ok.empty:
        raise ValueError("the reference folder has no readable images; run `redistill prepare` or pass --data")
    channels = int(ok["channels"].mode()[0])
    shaped = ok[ok["channels"] == channels]  # a stray image of another channel count has no value in some columns

    def band(column: str) -> list[float]:
        lo, hi = np.quantile(shaped[column].astype(float), p.band_quantiles)
        widen = p.band_widen * (hi - lo)
        top = np.sqrt(2.0) if column == "sharpness" else 1.0  # a gradient magnitude reaches √2, the rest 1
        return [max(0.0, float(lo - widen)), min(top, float(hi + widen))]

    profile = {
        "height": int(ok["height"].mode()[0]),
        "width": int(ok["width"].mode()[0]),
        "channels": channels,
        "bands": {column: band(column) for column in band_columns(channels)},
        "num_images": int(len(ok)),
    }
    if ok["label"].notna().all():
        counts = ok["label"].astype(int).value_counts().sort_index()
        profile["label_values"] = [int(v) for v in counts.index]
        profile["label_weights"] = [float(w) for w in counts / counts.sum()]
    return profile


def read_grown_from(folder: Path) -> dict | None:
    """The record of what a grown representative set grew from (`grown_from.json`), or None for any other folder."""
    f = Path(folder) / GROWN_FROM
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
        whole = isinstance(record["reference"]["md5"], str) and all(
            isinstance(b["name"], str) and isinstance(b["prefix"], str) and b["prefix"] for b in record["batches"])
    except (ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        raise DataError(f"{f} is damaged: it must name the reference {folder} grew from (md5) and the batches it "
                        f"accepted. Restore it with `dvc checkout {Path(folder).name}.dvc`, or remove the folder and "
                        "its .dvc file so cycles use data/reference again")
    return record


def validation_basis(folder: Path, reference: Path) -> dict:
    """What validates `folder`: the reference's md5, the accepted batches whose bands widen its bands, a
    one-line description for the report and the MLflow tag, and `problem` when the set cannot be validated
    honestly (it grew from another reference than the one on disk)."""
    reference = Path(reference)
    md5 = dir_md5(reference) if reference.is_dir() else ""
    record = read_grown_from(folder)
    if record is None:
        return {"reference_md5": md5, "batches": [], "problem": None, "bands_from": f"{reference} {md5 or '(missing)'}"}
    path, grew_md5 = record["reference"].get("path", "data/reference"), record["reference"]["md5"]
    names = ", ".join(b["name"] for b in record["batches"]) or "(none)"
    basis = {"reference_md5": md5, "batches": record["batches"], "problem": None,
             "bands_from": f"{path} {grew_md5} widened by the accepted batches {names} ({GROWN_FROM})"}
    if grew_md5 != md5:
        basis["problem"] = (
            f"{folder} grew from {path} at {grew_md5} (its {GROWN_FROM}), but {reference} is now {md5 or 'missing'}: "
            f"the bands it would be validated against are not those of the reference it grew from. Restore that "
            f"reference (`git checkout <commit> -- dvc.lock && dvc checkout {path}`), or start the representative "
            f"set again from the new one: remove {folder} and its .dvc file")
    return basis


def grown_profile(reference_table, table, batches: list[dict], p: ValidateParams) -> dict:
    """The reference's profile with its bands widened to cover each accepted batch's own bands (learnt
    the same way, from the batch's images in the grown set) and its label mix learnt from the reference and
    those batches together. Shape and channels stay the reference's."""
    import pandas as pd

    profile = reference_profile(reference_table, p)
    parts = [reference_table[reference_table["readable"].astype(bool)]]
    for b in batches:
        rows = table[table["file"].str.startswith(b["prefix"]) & table["readable"].astype(bool)]
        if rows.empty:
            raise DataError(f"the accepted batch {b['name']} has no readable images ({b['prefix']}*) in the grown set; "
                            "it was changed after the watch grew it: remove it and its .dvc file to start again")
        own = reference_profile(rows, p)
        for column, (lo, hi) in profile["bands"].items():
            if column in own["bands"]:  # a batch of another channel count fails the channels expectation instead
                profile["bands"][column] = [min(lo, own["bands"][column][0]), max(hi, own["bands"][column][1])]
        parts.append(rows)
    profile = {k: v for k, v in profile.items() if k not in ("label_values", "label_weights")}
    labelled = pd.concat(parts)
    if labelled["label"].notna().all():  # merge_batch keeps labels only when the reference and every batch had them
        counts = labelled["label"].astype(int).value_counts().sort_index()
        profile["label_values"] = [int(v) for v in counts.index]
        profile["label_weights"] = [float(w) for w in counts / counts.sum()]
    return profile
