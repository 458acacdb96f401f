"""Image data: the image-folder format every stage reads and writes (PNGs, labels, captions), and its DVC hash.

Format: a folder of PNG images, grayscale or RGB, all one size, with an optional `labels.csv`
(`file,label`) and optional captions (`captions.csv` or `metadata.jsonl`, see "Captions" below) beside them.
`data/reference/` is the representative set, `data/holdout/` the images kept out of it (the classifier's test
split and the pool the incoming batches are drawn from), and `data/incoming/<batch>/` the later batches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png"}


class DataError(ValueError):
    """Image data that cannot be used; the message says what is wrong and what to do."""


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


# ---------------------------------------------------------------------------------------------------
# Captions: the prompts of a text-to-image data set
# ---------------------------------------------------------------------------------------------------
# An image folder may carry one caption per image in one of two files beside the PNGs:
# - `captions.csv` with the header `file,caption` (a caption that holds a comma is quoted, as any CSV writer does);
# - `metadata.jsonl`, the layout of Hugging Face `ImageFolder` data sets (what the diffusers text-to-image
#   training scripts read): one JSON object per line with `file_name` and the caption in the first of the columns
#   `text`, `caption`, `prompt` that the file uses. Other fields are kept (and carried by `merge_batch`), not read.
# A folder with both is refused: which one is meant would be a guess. The names in a captions file must be PNG
# images of the folder itself (no `/`, no `..`). A captions file that misses an image, or gives it an empty caption,
# still loads: that image's caption is "" and the validation names it.

CAPTIONS_CSV = "captions.csv"  # file,caption
METADATA_JSONL = "metadata.jsonl"  # Hugging Face ImageFolder: {"file_name": ..., "text": ...} per line
CAPTION_FILES = (CAPTIONS_CSV, METADATA_JSONL)
CAPTION_COLUMNS = ("text", "caption", "prompt")  # metadata.jsonl: the first of these the file uses is the caption


@dataclass
class Captions:
    """One folder's captions file as read: where from, which column, and each listed file's caption."""

    path: Path  # captions.csv or metadata.jsonl
    column: str  # "caption" for captions.csv; text, caption or prompt for metadata.jsonl
    by_file: dict[str, str | None]  # file → caption as written; None: its metadata.jsonl line has none
    extra: dict[str, dict] = field(default_factory=dict)  # metadata.jsonl: each line's other fields

    @property
    def format(self) -> str:
        """`csv` or `jsonl`: the format `merge_batch` keeps for the merged folder."""
        return "csv" if self.path.name == CAPTIONS_CSV else "jsonl"


def captions_file(folder: Path) -> Path | None:
    """The folder's captions file (captions.csv or metadata.jsonl), None without one; DataError with both."""
    folder = Path(folder)
    present = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise DataError(
            f"{folder} holds both {CAPTIONS_CSV} and {METADATA_JSONL}; keep one of them (redistill reads "
            "either, never both, so which captions are meant would be a guess)"
        )
    return present[0] if present else None


def check_caption_file_name(name: object, where: str, images: set[str], folder: Path) -> str:
    """`name` from a captions file, when it is a PNG image of `folder` (listed in `images`); else DataError.

    Only plain names are taken: a path (`/`, `\\`) or `..` could point outside the folder, so it is refused
    before anything else, even where a file of that name would exist."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: the file name {name!r} is not a file name; write the PNG's name, e.g. 00001.png")
    if "/" in name or "\\" in name or ".." in name or any(ord(ch) < 32 for ch in name):
        raise DataError(
            f"{where}: {name!r} is not a plain file name in {folder} (no '/', '\\\\', '..' or control "
            "characters: captions describe the images of this folder only); write the PNG's bare name"
        )
    if name not in images:
        raise DataError(f"{where}: {name} is not a PNG image in {folder}; remove that caption or add the image")
    return name


def _png_names(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheet exports) is not a name
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from e


def _read_csv(path: Path, images: set[str], folder: Path) -> Captions:
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["file", "caption"]:
        raise DataError(
            f"{path} must start with the header `file,caption`, got {header}; write one row per image "
            "below it, e.g. 00001.png,a handwritten digit seven"
        )
    by_file: dict[str, str | None] = {}
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if not row or row == [""]:
            continue  # a blank line, e.g. at the end
        if len(row) != 2:
            raise DataError(
                f"{where}: {len(row)} fields where `file,caption` has 2; put a caption that holds a comma "
                f'in double quotes ("a cat, sitting"), got {row[:4]}'
            )
        name = check_caption_file_name(row[0], where, images, folder)
        if name in by_file:
            raise DataError(f"{where}: {name} has a second caption; keep one row per image")
        by_file[name] = row[1]
    return Captions(path, "caption", by_file)


def _read_jsonl(path: Path, images: set[str], folder: Path) -> Captions:
    lines = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        where = f"{path} line {number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} is not valid JSON ({e.msg}, column {e.colno}); each line must be one object like "
                '{"file_name": "00001.png", "text": "a handwritten digit seven"}'
            ) from e
        if not isinstance(obj, dict):
            raise DataError(
                f"{where} is a JSON {type(obj).__name__}, not an object; each line must be one object like "
                '{"file_name": "00001.png", "text": "a handwritten digit seven"}'
            )
        if "file_name" not in obj:
            raise DataError(
                f"{where} has no `file_name` (keys: {', '.join(map(str, obj)) or 'none'}); Hugging Face "
                "ImageFolder metadata names its image in `file_name`"
            )
        lines.append((where, obj))
    used = {k for _, obj in lines for k in obj}
    column = next((c for c in CAPTION_COLUMNS if c in used), None)
    if lines and column is None:
        raise DataError(
            f"{path} has no caption column: its lines hold {', '.join(sorted(map(str, used)))}, and the "
            f"caption is read from the first of {', '.join(CAPTION_COLUMNS)}; rename the caption field"
        )
    by_file: dict[str, str | None] = {}
    extra: dict[str, dict] = {}
    for where, obj in lines:
        name = check_caption_file_name(obj["file_name"], where, images, folder)
        if name in by_file:
            raise DataError(f"{where}: {name} has a second line; keep one line per image")
        caption = obj.get(column)
        if caption is not None and not isinstance(caption, str):
            raise DataError(
                f"{where}: `{column}` of {name} is a JSON {type(caption).__name__}, not a string; write the "
                "caption as a string"
            )
        by_file[name] = caption  # None (absent or null): a missing caption, which the validation names
        rest = {k: v for k, v in obj.items() if k not in ("file_name", column)}
        if rest:
            extra[name] = rest
    return Captions(path, column or CAPTION_COLUMNS[0], by_file, extra)


def read_captions(folder: Path) -> Captions | None:
    """The folder's captions, None without a captions file; DataError (saying what to fix) for both files, a
    malformed line, a second caption for one image, or a name that is not a PNG image of the folder."""
    folder = Path(folder)
    path = captions_file(folder)
    if path is None:
        return None
    images = _png_names(folder)
    return _read_csv(path, images, folder) if path.name == CAPTIONS_CSV else _read_jsonl(path, images, folder)


def caption_list(folder: Path, files: list[str]) -> list[str] | None:
    """The caption of each of `files`, in their order ("" for an image without one); None without a captions file."""
    caps = read_captions(folder)
    if caps is None:
        return None
    return [caps.by_file.get(f) or "" for f in files]


def write_captions(
    folder: Path,
    by_file: dict[str, str | None],
    fmt: str = "csv",
    column: str = "text",
    extra: dict[str, dict] | None = None,
) -> Path:
    """Write `by_file` as captions.csv (`fmt="csv"`) or metadata.jsonl (`fmt="jsonl"`, the caption under
    `column`, each line's `extra` fields after it), rows sorted by file name; returns the file."""
    folder = Path(folder)
    if fmt == "csv":
        path = folder / CAPTIONS_CSV
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "caption"])
            w.writerows((name, by_file[name] or "") for name in sorted(by_file))
    elif fmt == "jsonl":
        if column not in CAPTION_COLUMNS:
            raise ValueError(
                f"the caption column of metadata.jsonl must be one of {', '.join(CAPTION_COLUMNS)}, got {column!r}"
            )
        path = folder / METADATA_JSONL
        extra = extra or {}
        with open(path, "w", encoding="utf-8") as f:
            for name in sorted(by_file):
                f.write(
                    json.dumps({"file_name": name, column: by_file[name], **extra.get(name, {})}, ensure_ascii=False)
                    + "\n"
                )
    else:
        raise ValueError(f"captions format must be csv (captions.csv) or jsonl (metadata.jsonl), got {fmt!r}")
    return path


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
