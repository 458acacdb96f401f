"""Data validation, the library half: a per-image table and the bands learnt from the reference.

The great_expectations suite that runs over this table is built in `redistill.data.expectations` (GX is
imported inside its functions only). Every image file becomes one row, and a file that cannot be decoded still becomes a row
(`readable = False`), so one broken image fails one expectation instead of stopping the table.

Which bands validate a folder (`validation_basis`): `data/reference`'s, unless the folder is a representative set
the watch grew. Such a set carries `grown_from.json` (versioned with it, part of its md5): the reference it
grew from, by md5, and the drift batches the watch accepted into it. It is validated against that reference's
bands widened to cover each accepted batch's own bands, and refused by name when `data/reference` is no
longer the reference it grew from.

A folder with captions (`captions.csv` or `metadata.jsonl`, read by `redistill.data.read_captions`) gets a second
table, one row per image file: its caption, whether it has one, its length as `caption_counter` measures it (the
teacher's own tokenizer when its folder has `tokenizer/`, the Stable Diffusion layout, else whitespace words) and
the share of the captioned images its caption labels (`caption_table`). A folder without captions has no such
table, and its validation is exactly the image-only one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redistill.config import ValidateParams
from redistill.data.base import IMAGE_SUFFIXES, DataError
from redistill.data.caption_files import read_captions
from redistill.data.images import dir_md5, read_label_map, read_png, safe_name

GROWN_FROM = "grown_from.json"  # inside a grown representative set: the reference and batches it grew from
MAX_CHANNELS = 3  # read_png gives grey (1) or RGB (3) images
CHANNEL_STATS = ("mean", "std")  # learnt per channel: columns mean_c0, std_c0, … (redistill.drift.image_stats)
TABLE_COLUMNS = (
    "file",
    "readable",
    "height",
    "width",
    "channels",
    "min",
    "max",
    "mean",
    "std",
    *(f"{s}_c{k}" for s in CHANNEL_STATS for k in range(MAX_CHANNELS)),
    "sharpness",
    "saturation",
    "nan_count",
    "inf_count",
    "pixel_sha256",
    "label",
    "error",
)  # error: why a file was unreadable


def band_columns(channels: int) -> list[str]:
    """The table columns whose bands are learnt from the reference, for images of `channels` channels:
    per-channel mean and spread, sharpness, and saturation (colour only: grey images have none)."""
    return (
        [f"{s}_c{k}" for s in CHANNEL_STATS for k in range(channels)]
        + ["sharpness"]
        + (["saturation"] if channels == 3 else [])
    )


def image_table(folder: Path):
    """One row per image file in `folder`: shape, value statistics (overall, per channel, sharpness and
    saturation, as the drift tests measure them), a pixel hash and the label (None without labels.csv)."""
    import pandas as pd

    from redistill.data.stats import image_stats

    folder = Path(folder)
    files = (
        sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if folder.is_dir()
        else []
    )
    labels = read_label_map(folder) if files else {}  # a file without a label gets None: a failing row
    rows = []
    for name in files:
        try:
            x = read_png(folder / name).astype(np.float32) / 255.0
        except Exception as e:  # any decoder error: the row records it, the expectation on `readable` fails
            rows.append(
                {
                    "file": name,
                    "readable": False,
                    **{c: None for c in TABLE_COLUMNS[2:-1]},
                    "error": f"{type(e).__name__}: {e}"[:300],
                }
            )
            continue
        finite = x[np.isfinite(x)]
        chw = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        stats = image_stats(chw[None])
        per_channel = {
            f"{c}_c{k}": float(stats[f"{c}_c{k}"][0]) if k < chw.shape[0] else None
            for c in CHANNEL_STATS
            for k in range(MAX_CHANNELS)
        }
        rows.append(
            {
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
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


CAPTION_TABLE_COLUMNS = (
    "file",
    "has_caption",
    "caption",
    "n_chars",
    "n_words",
    "n_tokens",
    "caption_key",
    "caption_share",
)


@dataclass
class CaptionCounter:
    """How caption lengths are measured: `count` maps captions to lengths, `limit` is the most one may have."""

    count: Callable[[list[str]], list[int]]
    limit: int
    name: str  # said in the report: which tokenizer (or whitespace words) and where the limit comes from
    unit: str = "tokens"  # "tokens", or "whitespace words" without a tokenizer


def caption_counter(teacher: Path | None, max_words: int) -> CaptionCounter:
    """The teacher's tokenizer (`<teacher>/tokenizer`, SD layout; the limit is its `model_max_length`, special
    tokens counted, as the pipeline pads and truncates), else whitespace words against `max_words`
    (validate.max_caption_tokens). DataError when the teacher's tokenizer folder cannot be loaded."""
    folder = Path(teacher) / "tokenizer" if teacher is not None else None
    if folder is None or not folder.is_dir():
        why = "no teacher given" if teacher is None else f"{teacher} has no tokenizer/"
        return CaptionCounter(
            lambda caps: [len(c.split()) for c in caps],
            max_words,
            f"whitespace words ({why}; limit validate.max_caption_tokens = {max_words})",
            "whitespace words",
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise DataError(
            f"the teacher's tokenizer {folder} does not load ({type(e).__name__}: {str(e)[:200]}); fix the "
            "folder: it must load with transformers.AutoTokenizer.from_pretrained"
        ) from e
    limit = int(tok.model_max_length) if 0 < tok.model_max_length < 1_000_000 else max_words  # unset: a huge sentinel
    source = "its model_max_length" if limit == tok.model_max_length else "validate.max_caption_tokens: it sets none"

    def count(caps: list[str]) -> list[int]:
        if not caps:
            return []
        # no truncation: the point is to see how long a caption really is; special tokens count, as in the pipeline
        ids = tok(list(caps), add_special_tokens=True, truncation=False, padding=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    return CaptionCounter(
        count,
        limit,
        f"the teacher's tokenizer {folder} ({type(tok).__name__}, special tokens counted; limit {limit} = {source})",
    )


def normalise_caption(caption: str) -> str:
    """The caption as duplicates are counted: case-folded, whitespace collapsed."""
    return " ".join(caption.casefold().split())


def caption_table(folder: Path, counter: CaptionCounter):
    """One row per image file in `folder` with its caption, or None when the folder has no captions file.

    `has_caption` is False for an image the captions file misses or captions with only whitespace; `n_tokens`
    is the caption's length as `counter` measures it; `caption_key` is the caption as duplicates are counted
    (case-folded, whitespace collapsed) and `caption_share` the share of the captioned images that carry that
    same caption. DataError for a malformed captions file (redistill.data.read_captions)."""
    import pandas as pd

    folder = Path(folder)
    caps = read_captions(folder)
    if caps is None:
        return None
    files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    captions = [caps.by_file.get(name) for name in files]
    present = [c is not None and bool(c.strip()) for c in captions]
    texts = [c.strip() for c, ok in zip(captions, present) if ok]
    lengths = iter(counter.count(texts))
    keys = [normalise_caption(c) if ok else None for c, ok in zip(captions, present)]
    counts = pd.Series([k for k in keys if k is not None], dtype=object).value_counts()
    n = int(sum(present))
    rows = [
        {
            "file": name,
            "has_caption": ok,
            "caption": c,
            "n_chars": len(c.strip()) if ok else None,
            "n_words": len(c.split()) if ok else None,
            "n_tokens": int(next(lengths)) if ok else None,
            "caption_key": key,
            "caption_share": float(counts[key] / n) if ok else None,
        }
        for name, c, ok, key in zip(files, captions, present, keys)
    ]
    return pd.DataFrame(rows, columns=list(CAPTION_TABLE_COLUMNS))


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
            isinstance(b["name"], str) and isinstance(b["prefix"], str) and b["prefix"] for b in record["batches"]
        )
    except (ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        raise DataError(
            f"{f} is damaged: it must name the reference {folder} grew from (md5) and the batches it "
            f"accepted. Restore it with `dvc checkout {Path(folder).name}.dvc`, or remove the folder and "
            "its .dvc file so cycles use data/reference again"
        )
    return record


def grown_from(root: Path, base: Path, batch: Path, batch_name: str) -> dict:
    """The record a representative set grown from `base` by `batch` carries (`grown_from.json`): the reference
    it grew from, by md5 (that of `base` when `base` is the reference, else the one `base` grew from), and every
    batch accepted into it since, with the file prefix its images have in the set. Validation reads it."""
    root, base = Path(root), Path(base)
    before = read_grown_from(base)
    if before is None and base.resolve() != (root / "data" / "reference").resolve():
        raise DataError(
            f"{base} has no {GROWN_FROM}: an older redistill grew it, so what it grew from is unknown and "
            f"it cannot be validated honestly. Remove it and {base.name}.dvc; the watch then grows the "
            "representative set from data/reference again"
        )
    before = before or {"reference": {"path": "data/reference", "md5": dir_md5(base)}, "batches": []}
    entry = {
        "name": safe_name(batch_name),
        "prefix": safe_name(batch_name) + "__",
        "md5": dir_md5(batch),
        "images": sum(1 for p in Path(batch).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
    }
    return {
        "reference": before["reference"],
        "batches": before["batches"] + [entry],
        "note": "written by `redistill watch` when it grew this set: validation uses the bands of this reference "
        "widened by these batches' own bands, and refuses when the reference on disk has another md5",
    }


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
    basis = {
        "reference_md5": md5,
        "batches": record["batches"],
        "problem": None,
        "bands_from": f"{path} {grew_md5} widened by the accepted batches {names} ({GROWN_FROM})",
    }
    if grew_md5 != md5:
        basis["problem"] = (
            f"{folder} grew from {path} at {grew_md5} (its {GROWN_FROM}), but {reference} is now {md5 or 'missing'}: "
            f"the bands it would be validated against are not those of the reference it grew from. Restore that "
            f"reference (`git checkout <commit> -- dvc.lock && dvc checkout {path}`), or start the representative "
            f"set again from the new one: remove {folder} and its .dvc file"
        )
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
            raise DataError(
                f"the accepted batch {b['name']} has no readable images ({b['prefix']}*) in the grown set; "
                "it was changed after the watch grew it: remove it and its .dvc file to start again"
            )
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
