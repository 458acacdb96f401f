"""Image data: the image-folder format every stage reads and writes (PNGs, labels, captions), and its DVC hash.

Format: a folder of PNG images, grayscale or RGB, all one size, with an optional `labels.csv`
(`file,label`) and optional captions (`captions.csv` or `metadata.jsonl`, see "Captions" below) beside them.
`data/reference/` is the representative set, `data/holdout/` the images kept out of it (the classifier's test
split and the pool the incoming batches are drawn from), and `data/incoming/<batch>/` the later batches.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from redistill.data.base import IMAGE_SUFFIXES, DataError
from redistill.data.caption_files import caption_list, write_captions


@dataclass
class ImageSet:
    """Images as float32 (N, C, H, W) in [0, 1], optional integer labels, their file names, and optional captions."""

    images: np.ndarray
    labels: np.ndarray | None
    files: list[str]
    captions: list[str] | None = None  # in file order; None without a captions file, "" for an image it misses

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------------------------------------------
# The image-folder format
# ---------------------------------------------------------------------------------------------------


def write_image_folder(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    captions: list[str] | None = None,
    captions_format: str = "csv",
) -> None:
    """Write uint8 images (N×H×W or N×H×W×C) as PNGs plus `labels.csv`, replacing the folder; with `captions`
    (one per image) also `captions.csv` (`captions_format="csv"`) or `metadata.jsonl` (`"jsonl"`, column `text`)."""
    if captions is not None and len(captions) != len(images):
        raise DataError(f"{len(captions)} captions for {len(images)} images; pass one caption per image")
    if captions_format not in ("csv", "jsonl"):
        raise DataError(
            f"captions_format must be csv (captions.csv) or jsonl (metadata.jsonl), got {captions_format!r}"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    width = max(5, len(str(len(images))))
    rows = []
    for i, img in enumerate(images):
        name = f"{i:0{width}d}.png"
        # optimize=False and no metadata: the same pixels always give the same bytes (stable DVC md5)
        Image.fromarray(img).save(out / name, format="PNG", optimize=False)
        if labels is not None:
            rows.append((name, int(labels[i])))
    if labels is not None:
        with open(out / "labels.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "label"])
            w.writerows(rows)
    if captions is not None:
        write_captions(out, {f"{i:0{width}d}.png": c for i, c in enumerate(captions)}, captions_format)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def safe_name(name: str) -> str:
    """A file-system name made safe for use as a path component or an MLflow/Prefect name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"
    return cleaned[:100]


MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)


def read_png(path: Path) -> np.ndarray:
    """One image as uint8 (H, W) for grayscale or (H, W, 3) for colour; PIL errors propagate.

    Only 8-bit images are read (16-bit or float would be clipped silently), and the size in the header
    is checked before any pixel is decoded."""
    with Image.open(path) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}×{h} pixels is more than the {MAX_PIXELS} redistill decodes (a decompression bomb?)")
        if im.mode not in ("L", "1", "RGB", "RGBA", "P", "LA"):
            raise ValueError(f"mode {im.mode!r} is not 8-bit; save it as 8-bit grayscale (L) or RGB")
        mode = "L" if im.mode in ("L", "1", "LA") else "RGB"
        return np.asarray(im.convert(mode))


def load_image_folder(folder: Path, min_count: int = 1) -> ImageSet:
    """Read an image folder (PNG, one size, optional labels.csv and captions) into float32 (N, C, H, W) in [0, 1].

    A malformed captions file (both formats, a caption for no image of the folder, a bad line) is a DataError;
    an image the captions file misses gets the caption "", which the validation names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; run `redistill prepare` or pass --data DIR")
    files = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if len(files) < min_count:
        raise DataError(f"data folder {folder} holds {len(files)} PNG images, at least {min_count} are needed")
    arrays = []
    first_shape = None
    for name in files:
        try:
            arr = read_png(folder / name)
        except Exception as e:  # PIL raises many types for a broken file
            raise DataError(f"{folder / name} is not a readable PNG image ({e}); remove or replace it") from e
        if first_shape is None:
            first_shape = arr.shape
        elif arr.shape != first_shape:
            raise DataError(
                f"{folder / name} has shape {arr.shape} but {folder / files[0]} has {first_shape}; "
                "every image in a data folder must have one size and one channel count"
            )
        arrays.append(arr)
    x = np.stack(arrays).astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    labels = _read_labels(folder, files)
    return ImageSet(images=x, labels=labels, files=files, captions=caption_list(folder, files))


def read_label_map(folder: Path) -> dict[str, int]:
    """`labels.csv` as {file: label} ({} without the file); rejects names that are not plain file names."""
    path = Path(folder) / "labels.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != {"file", "label"}:
        raise DataError(f"{path} must have the header `file,label`, got {list(rows[0])}")
    by_file = {}
    for r in rows:
        name = r["file"]
        if not _SAFE_NAME.match(name):  # a label row must name a file in this folder, nothing else
            raise DataError(f"{path} names {name!r}, which is not a plain file name in {folder}")
        try:
            by_file[name] = int(r["label"])
        except ValueError as e:
            raise DataError(f"{path}: label {r['label']!r} of {name} is not an integer") from e
    unknown = sorted(
        n for n in by_file if Path(n).suffix.lower() not in IMAGE_SUFFIXES or not (Path(folder) / n).is_file()
    )
    if unknown:  # a label for an image that is not there: the labels belong to another folder
        raise DataError(
            f"{path} labels {unknown[0]}, which is not an image in {folder} "
            f"(and {len(unknown) - 1} more); remove those rows"
        )
    return by_file


def _read_labels(folder: Path, files: list[str]) -> np.ndarray | None:
    if not (folder / "labels.csv").exists():
        return None
    by_file = read_label_map(folder)
    missing = [f for f in files if f not in by_file]
    if missing:
        raise DataError(
            f"{folder / 'labels.csv'} has no label for {missing[0]} (and {len(missing) - 1} more); "
            "add them or delete labels.csv"
        )
    return np.array([by_file[f] for f in files], dtype=np.int64)


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(folder: Path) -> str:
    """The DVC 3 hash of a folder (`<md5>.dir`): md5 of the sorted JSON list of (relpath, md5)."""
    folder = Path(folder)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
