"""The embedded text-to-image data: sklearn's digits at 16×16, each image captioned with a class prompt.

The split is `prepare`'s (`build_digits` with the workspace's `prepare` settings, only the image size changed),
so the images the digits classifier is tested on (`holdout`) are never trained on here either, and the
classifier can judge the text-to-image teacher's prompt adherence. Each image gets one caption: a paraphrase
of its class drawn from `TEMPLATES` (the class as a word in some, as a numeral in others), assigned
deterministically by seed and balanced over the templates within each folder.

Layout (under e.g. data/t2i/): `reference/`, `holdout/` and `incoming/<batch>/`, as `prepare` writes them, each
with `labels.csv` (`file,label`) and `captions.csv` (`file,caption`).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np

from redistill.config import PrepareParams

IMAGE_SIZE = 16  # the digits nearest-upsampled ×2: a VAE with f = 2 makes 8×8 latents of them
CAPTIONS_FILE = "captions.csv"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (  # {word}: the class as a word ("seven"), {numeral}: as a figure ("7")
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a drawing of the digit {word}",
    "a hand-drawn {numeral}",
    "a handwritten {numeral}",
    "the handwritten number {numeral}",
)
# CLIP's pre-tokenisation: runs of letters, single figures, runs of other symbols (the "-" of "hand-drawn")
_PIECE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def class_prompt(template: str, label: int) -> str:
    """The prompt of class `label` (0–9) in one template."""
    return template.format(word=NUMBER_WORDS[label], numeral=str(label))


def class_prompts(label: int) -> list[str]:
    """Every paraphrase of class `label`, in template order."""
    return [class_prompt(t, label) for t in TEMPLATES]


def vocabulary() -> list[str]:
    """Every word (pre-tokenised piece) of every prompt, sorted: the words the tokenizer makes one token each."""
    return sorted({w for label in range(10) for prompt in class_prompts(label) for w in _PIECE.findall(prompt)})


def caption_labels(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label: the templates dealt out evenly (each used ⌊N/T⌋ or ⌈N/T⌉ times), in an order `rng`
    shuffles, so caption style and class are independent."""
    which = rng.permutation(np.arange(len(labels)) % len(TEMPLATES))
    return [class_prompt(TEMPLATES[k], int(y)) for k, y in zip(which, labels)]


def write_captions_csv(folder: Path, captions: list[str]) -> None:
    """`captions.csv` (`file,caption`) for the images `write_image_folder` named, in its order."""
    width = max(5, len(str(len(captions))))
    with open(Path(folder) / CAPTIONS_FILE, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "caption"])
        w.writerows((f"{i:0{width}d}.png", c) for i, c in enumerate(captions))


def prepare_t2i(p: PrepareParams, data_dir: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> dict[str, int]:
    """Write the captioned digits under `data_dir` (reference, holdout, incoming/<batch>), split as `prepare`
    splits them with `p`; captions drawn with `seed`. Returns the image count of each folder."""
    from redistill.data.digits import build_digits
    from redistill.data.images import write_image_folder

    splits = build_digits(dataclasses.replace(p, image_size=image_size))
    rng = np.random.default_rng(seed)
    counts = {}
    for name, (images, labels) in splits.items():  # a fixed order: reference, holdout, then the batches
        out = Path(data_dir) / (name if name in ("reference", "holdout") else f"incoming/{name}")
        write_image_folder(out, images, labels)
        write_captions_csv(out, caption_labels(labels, rng))
        counts[str(out.relative_to(data_dir))] = len(images)
    return counts
