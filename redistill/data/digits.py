"""The embedded default data: sklearn's digits, split into a reference, a holdout and incoming batches, two of them
drifted, all deterministically from `prepare.seed` (the `prepare` stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from redistill.config import PrepareParams
from redistill.data.base import DataError
from redistill.data.images import write_image_folder

DIGITS_MAX = 16.0  # sklearn's digits are 4-bit intensities 0..16


def to_uint8(images16: np.ndarray, image_size: int) -> np.ndarray:
    """Digits intensities (0..16, N×8×8) → uint8 (N×S×S), nearest-upsampled to `image_size`."""
    if image_size % 8:
        raise DataError(f"prepare.image_size must be a multiple of 8 (native digits are 8×8), got {image_size}")
    img = np.clip(np.rint(images16 * (255.0 / DIGITS_MAX)), 0, 255).astype(np.uint8)
    k = image_size // 8
    return np.kron(img, np.ones((1, k, k), dtype=np.uint8)) if k > 1 else img


def style_shift(images16: np.ndarray, rng: np.random.Generator, rotation_deg: float, dilation: int) -> np.ndarray:
    """The `style` drift: thicker strokes (grey dilation) and a small rotation of random sign."""
    from scipy import ndimage

    out = np.empty_like(images16)
    for i, img in enumerate(images16):
        if dilation > 1:
            img = ndimage.grey_dilation(img, size=(dilation, dilation))
        angle = float(rng.choice([-1.0, 1.0]) * rotation_deg)
        out[i] = ndimage.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, DIGITS_MAX)


def build_digits(p: PrepareParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split sklearn's digits into reference, holdout and incoming batches; pure and seeded.

    Returns {name: (uint8 images N×S×S, labels)} for `reference`, `holdout`, and the incoming batches
    `nodrift` (drawn like the reference), `class_mix` (class proportions shifted) and `style` (strokes
    thickened and rotated).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x16 = digits.images.astype(np.float64)  # (1797, 8, 8) in 0..16
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(p.seed)
    if not 0 < p.holdout < len(y) // 2:
        raise DataError(f"prepare.holdout must be between 1 and {len(y) // 2 - 1}, got {p.holdout}")
    if p.batch_size > p.holdout:
        raise DataError(f"prepare.batch_size ({p.batch_size}) cannot exceed prepare.holdout ({p.holdout})")

    # 1. Stratified holdout: the same class mix as the reference, so `nodrift` really is "no drift".
    order = rng.permutation(len(y))
    holdout_idx: list[int] = []
    for c in range(10):
        members = order[y[order] == c]
        holdout_idx.extend(members[: round(p.holdout * len(members) / len(y))].tolist())
    holdout_idx = np.array(sorted(holdout_idx))
    ref_idx = np.setdiff1d(np.arange(len(y)), holdout_idx)

    # 2. Incoming batches are drawn from the holdout pool, never from the reference.
    nodrift = rng.choice(holdout_idx, size=p.batch_size, replace=False)

    favoured = np.isin(y[holdout_idx], p.class_mix_classes)
    n_fav = round(p.batch_size * p.class_mix_share)
    if n_fav > favoured.sum() or p.batch_size - n_fav > (~favoured).sum():
        raise DataError(
            f"the holdout has {favoured.sum()} images of classes {p.class_mix_classes}, too few for "
            f"class_mix_share={p.class_mix_share} of batch_size={p.batch_size}; raise prepare.holdout "
            "or lower prepare.class_mix_share"
        )
    class_mix = np.concatenate(
        [
            rng.choice(holdout_idx[favoured], size=n_fav, replace=False),
            rng.choice(holdout_idx[~favoured], size=p.batch_size - n_fav, replace=False),
        ]
    )
    rng.shuffle(class_mix)

    style_idx = rng.choice(holdout_idx, size=p.batch_size, replace=False)
    style16 = style_shift(x16[style_idx], rng, p.style_rotation_deg, p.style_dilation)

    def pack(images16: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return to_uint8(images16, p.image_size), y[idx]

    return {
        "reference": pack(x16[ref_idx], ref_idx),
        "holdout": pack(x16[holdout_idx], holdout_idx),
        "nodrift": pack(x16[nodrift], nodrift),
        "class_mix": pack(x16[class_mix], class_mix),
        "style": pack(style16, style_idx),
    }


def prepare(p: PrepareParams, data_dir: Path) -> dict[str, int]:
    """Write the embedded data set under `data_dir`; returns the image count of each folder."""
    splits = build_digits(p)
    counts = {}
    for name, (images, labels) in splits.items():
        out = data_dir / name if name in ("reference", "holdout") else data_dir / "incoming" / name
        write_image_folder(out, images, labels)
        counts[str(out.relative_to(data_dir))] = len(images)
    return counts
