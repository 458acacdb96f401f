"""Growing the representative set: a batch's images (and their labels and captions) merged into it, written aside
and swapped in atomically, after drift."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from redistill.core.files import swap_in
from redistill.data.base import IMAGE_SUFFIXES, DataError
from redistill.data.caption_files import read_captions, write_captions
from redistill.data.images import load_image_folder, read_label_map, safe_name


def merge_batch(base: Path, batch: Path, out: Path, batch_name: str) -> int:
    """Write `base` plus the images of `batch` to `out` (replaced atomically); returns the image count.

    Files of `base` keep their names; the batch's get the prefix `<batch_name>__`, so batches never clash.
    `labels.csv` is merged when both sides have labels, and dropped (with both sides' images kept) when
    only one has. Captions are merged when both sides have them, into one file in `base`'s format (and
    metadata.jsonl column). A batch without captions cannot grow a captioned set (DataError: the grown set
    would hold uncaptioned images); a captioned batch grows an uncaptioned set image-only, as labels do. Used
    to grow the representative set after drift.
    """
    base, batch, out = Path(base), Path(batch), Path(out)
    prefix = safe_name(batch_name) + "__"
    # both sides must read as images of one shape before anything is written: a bad batch never enters
    base_shape, batch_shape = load_image_folder(base).images.shape[1:], load_image_folder(batch).images.shape[1:]
    if base_shape != batch_shape:
        raise DataError(
            f"batch {batch} holds images of shape {tuple(batch_shape)}, the representative set "
            f"{base} {tuple(base_shape)}; it cannot grow the set. Fix or remove the batch"
        )
    base_labels, batch_labels = read_label_map(base), read_label_map(batch)
    base_caps, batch_caps = read_captions(base), read_captions(batch)  # DataError when either is malformed
    if base_caps is not None and batch_caps is None:
        raise DataError(
            f"the set {base} has captions ({base_caps.path.name}) but batch {batch} has none, so the grown "
            "set would hold uncaptioned images; add the batch's captions (captions.csv or metadata.jsonl) "
            "or remove the batch"
        )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rows = []
    try:
        for src, labels, pre in ((base, base_labels, ""), (batch, batch_labels, prefix)):
            for f in sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                if pre and f.name.startswith(prefix):
                    raise DataError(f"batch {batch} already holds prefixed file {f.name}")
                shutil.copy2(f, tmp / (pre + f.name))
                if labels and f.name in labels:
                    rows.append((pre + f.name, labels[f.name]))
        if base_labels and batch_labels:
            with open(tmp / "labels.csv", "w", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(["file", "label"])
                w.writerows(sorted(rows))
        if base_caps is not None and batch_caps is not None:
            by_file = {**base_caps.by_file, **{prefix + f: c for f, c in batch_caps.by_file.items()}}
            extra = {**base_caps.extra, **{prefix + f: e for f, e in batch_caps.extra.items()}}
            write_captions(tmp, by_file, base_caps.format, base_caps.column, extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half written under data/
        raise
    count = sum(1 for p in tmp.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    swap_in(tmp, out)
    return count
