"""Data validation, the library half: a per-image table and the bands learnt from the reference.

The great_expectations suite that runs over this table is built in `tasks/validate.py` (GX is not imported
by the library). Every image file becomes one row, and a file that cannot be decoded still becomes a row
(`readable = False`), so one broken image fails one expectation instead of stopping the table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from redistill.config import ValidateParams
from redistill.data import IMAGE_SUFFIXES, read_label_map, read_png

TABLE_COLUMNS = ("file", "readable", "height", "width", "channels", "min", "max", "mean", "std",
                 "nan_count", "inf_count", "pixel_sha256", "label", "error")  # error: why a file was unreadable


def image_table(folder: Path):
    """One row per image file in `folder`: shape, value statistics, a pixel hash and the label."""
    import pandas as pd

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
            "nan_count": int(np.isnan(x).sum()),
            "inf_count": int(np.isinf(x).sum()),
            "pixel_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
            "label": labels.get(name) if labels else None,
            "error": "",
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def reference_profile(table, p: ValidateParams) -> dict:
    """What the reference looks like: its image shape, intensity bands, and label distribution."""
    ok = table[table["readable"]]
    if ok.empty:
        raise ValueError("the reference folder has no readable images; run `redistill prepare` or pass --data")

    def band(column: str) -> list[float]:
        lo, hi = np.quantile(ok[column].astype(float), p.band_quantiles)
        widen = p.band_widen * (hi - lo)
        return [max(0.0, float(lo - widen)), min(1.0, float(hi + widen))]

    profile = {
        "height": int(ok["height"].mode()[0]),
        "width": int(ok["width"].mode()[0]),
        "channels": int(ok["channels"].mode()[0]),
        "mean_band": band("mean"),
        "std_band": band("std"),
        "num_images": int(len(ok)),
    }
    if ok["label"].notna().all():
        counts = ok["label"].astype(int).value_counts().sort_index()
        profile["label_values"] = [int(v) for v in counts.index]
        profile["label_weights"] = [float(w) for w in counts / counts.sum()]
    return profile
