"""Procedurally drawn coloured shapes and textures: a seeded RGB (or grey) data set of any size.

The digits are one kind of data; a user's own teacher brings another. These images stand in for "your
data" in tests and in the bring-your-own-teacher example: real pictures with colour, edges, flat areas
and texture, drawn from a seed so that every run sees the same set.

Classes (the label written to `labels.csv` when asked for):
0 disc, 1 square, 2 triangle, 3 stripes (a texture over the whole image), 4 ring.

Each image: a background of one random dark colour with a faint vertical gradient, then the class's shape
in a random bright colour at a random position and size (stripes: random angle and period). Colours are
drawn in HSV so saturation and brightness vary independently of hue.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

CLASSES = ("disc", "square", "triangle", "stripes", "ring")


def _hsv(rng: np.random.Generator, v_lo: float, v_hi: float) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(v_lo, v_hi)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64)


def _mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A soft (anti-aliased) [0, 1] mask of the class's shape on a size×size grid."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres in [0, 1]
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.18, 0.3)
    soft = 1.0 / size  # one pixel of edge

    def edge(d: np.ndarray) -> np.ndarray:  # d < 0 inside
        return np.clip(0.5 - d / soft, 0.0, 1.0)

    if kind == 0:
        return edge(np.hypot(xx - cx, yy - cy) - r)
    if kind == 1:
        return edge(np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - r * 0.85)
    if kind == 2:  # an upward triangle: apex at (cx, cy - r), base at cy + 0.7 r, as wide as it is tall
        apex, base = cy - r, cy + 0.7 * r
        return edge(np.maximum(yy - base, np.abs(xx - cx) - (yy - apex) * 0.6))
    if kind == 3:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.2, 0.4)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 1)
        return 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    if kind == 4:
        return edge(np.abs(np.hypot(xx - cx, yy - cy) - r) - r * 0.3)
    raise ValueError(f"unknown shape class {kind}")


def draw(
    n: int, size: int = 16, channels: int = 3, seed: int = 0, classes: tuple[int, ...] = tuple(range(len(CLASSES)))
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images as uint8 (N, H, W, C) (C=3) or (N, H, W) (C=1) and their class labels; pure and seeded."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 4:
        raise ValueError(f"size must be ≥ 4, got {size}")
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.asarray(classes, dtype=np.int64), size=n)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    grad = np.linspace(-0.08, 0.08, size)[:, None, None]
    for i, k in enumerate(labels):
        bg = _hsv(rng, 0.05, 0.35)
        fg = _hsv(rng, 0.6, 1.0)
        m = _mask(int(k), size, rng)[..., None]
        img = np.clip(bg[None, None] + grad, 0, 1) * (1 - m) + fg[None, None] * m
        out[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if channels == 1:
        grey = out.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8), labels
    return out, labels


def write(
    out: Path,
    n: int,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    labels: bool = False,
    classes: tuple[int, ...] = tuple(range(len(CLASSES))),
) -> Path:
    """Draw `n` images into the PNG folder `out` (replaced), with `labels.csv` when `labels`."""
    from redistill.data.images import write_image_folder

    images, y = draw(n, size, channels, seed, classes)
    write_image_folder(Path(out), images, y if labels else None)
    return Path(out)
