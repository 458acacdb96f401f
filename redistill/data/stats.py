"""Per-image statistics of any channels and size: what the validation profile bands and the drift tests compare."""

from __future__ import annotations

import numpy as np
import torch

HIST = "hist"  # per-image colour histograms (N, C, HIST_BINS): not tested itself, but through HIST_TV
HIST_BINS = 8  # per channel: coarse enough that a 16×16 image fills its histogram
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601, as `shapes` and PIL turn colour into grey


def image_stats(images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of images in [0, 1], shape (N, C, H, W) with C = 1 or 3, any size.

    `mean_c{k}`, `std_c{k}` per channel; `sharpness` (mean gradient magnitude of the luma); `saturation`
    (mean HSV saturation, 0 for grey); `hist` (N, C, HIST_BINS), each channel's share of pixels per bin.
    Grey images also get `ink` (share of pixels above ½) and `row_centre`, `col_centre` (centre of mass).
    """
    x = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image statistics need images (N, C, H, W) with 1 or 3 channels, got shape {x.shape}")
    n, c, h, w = x.shape
    out = {}
    for k in range(c):
        out[f"mean_c{k}"] = x[:, k].mean((1, 2))
        out[f"std_c{k}"] = x[:, k].reshape(n, -1).std(1, ddof=1) if h * w > 1 else np.zeros(n)
    luma = x[:, 0] if c == 1 else np.einsum("nchw,c->nhw", x, LUMA)
    gy, gx = np.diff(luma, axis=1)[:, :, : w - 1], np.diff(luma, axis=2)[:, : h - 1, :]
    out["sharpness"] = np.sqrt(gy**2 + gx**2).mean((1, 2)) if h > 1 and w > 1 else np.zeros(n)
    if c == 3:
        hi, lo = x.max(1), x.min(1)
        out["saturation"] = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0).mean((1, 2))
    else:
        out["saturation"] = np.zeros(n)
    bins = np.clip((x * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)  # (N, C, H, W) bin of every pixel
    flat = (np.arange(n * c).reshape(n, c, 1, 1) * HIST_BINS + bins).ravel()
    out[HIST] = np.bincount(flat, minlength=n * c * HIST_BINS).reshape(n, c, HIST_BINS) / (h * w)
    if c == 1:  # the digits' stroke statistics: meaningful for ink on a plain background only
        g = x[:, 0]
        mass = np.maximum(g.sum((1, 2)), 1e-8)
        out["ink"] = (g > 0.5).mean((1, 2))
        out["row_centre"] = (g * np.arange(h)[None, :, None]).sum((1, 2)) / mass / max(h - 1, 1)
        out["col_centre"] = (g * np.arange(w)[None, None, :]).sum((1, 2)) / mass / max(w - 1, 1)
    return out
