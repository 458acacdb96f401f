"""Captions: the prompts of a text-to-image data set, one per image, in one of two files beside the PNGs.

- `captions.csv` with the header `file,caption` (a caption that holds a comma is quoted, as any CSV writer does);
- `metadata.jsonl`, the layout of Hugging Face `ImageFolder` data sets (what the diffusers text-to-image training
  scripts read): one JSON object per line with `file_name` and the caption in the first of the columns `text`,
  `caption`, `prompt` that the file uses. Other fields are kept (and carried by `merge_batch`), not read.

A folder with both is refused: which one is meant would be a guess. The names in a captions file must be PNG images
of the folder itself (no `/`, no `..`). A captions file that misses an image, or gives it an empty caption, still
loads: that image's caption is "" and the validation names it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from redistill.data.base import IMAGE_SUFFIXES, DataError

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
