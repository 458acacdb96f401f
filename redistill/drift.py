"""Drift detection: is a new batch drawn like the representative set?

Two families of tests, each at half the family-wise level `alpha`, so the union bound keeps the false-alarm
rate of "drift" at or below `alpha`:

1. MMD two-sample permutation test (Gretton et al. 2012) on embeddings: Gaussian kernel, bandwidth by the
   median heuristic, biased MMD² as the statistic, its null distribution from random re-labellings of the
   pooled sample. p = (1 + #{null ≥ observed}) / (1 + permutations). The embedding is the caller's feature
   space (`feature_spaces`: classifier, encoder, inception:…), or `pixel_features`, which needs no weights.
2. Two-sample Kolmogorov–Smirnov tests on per-image statistics, Holm–Bonferroni corrected across the
   statistics. They hold for 1 or 3 channels at any size: per-channel mean and spread, sharpness (mean
   gradient magnitude), saturation (HSV S; only tested for colour images) and each image's colour-histogram
   distance to the reference's histogram. Grey images also get the stroke statistics made for the digits
   (ink share, centre of mass), which mean nothing for colour pictures.

`calibrate` measures the false-alarm rate on reference-against-reference splits. The tests take
embeddings; `embed_folder` and `check_folder` read image folders through the caller's feature extractor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import json

import numpy as np
import torch

HIST = "hist"  # per-image colour histograms (N, C, HIST_BINS): not tested itself, but through HIST_TV
HIST_BINS = 8  # per channel: coarse enough that a 16×16 image fills its histogram
HIST_TV = "hist_tv"  # each image's total-variation distance to the reference's histogram
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601, as `shapes` and PIL turn colour into grey
PIXELS = "pixels"  # the feature space that needs no weights: `pixel_features`


@dataclass
class DriftReport:
    """The outcome for one batch: both tests, their corrected p-values and the verdict."""

    batch: str
    n_batch: int
    n_reference: int
    alpha: float
    mmd2: float
    mmd_p: float
    mmd_bandwidth: float
    ks: dict[str, dict[str, float]] = field(default_factory=dict)  # stat → {statistic, p, p_holm}
    drifted: bool = False
    reasons: list[str] = field(default_factory=list)
    histogram_tv: float = 0.0  # total-variation distance of the batch's pooled colour histogram to the reference's
    null_mmd2: list[float] = field(default_factory=list, repr=False)  # for the plot

    def to_dict(self, with_null: bool = False) -> dict:
        d = asdict(self)
        if not with_null:
            d.pop("null_mmd2")
        return d


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
    out["sharpness"] = np.sqrt(gy ** 2 + gx ** 2).mean((1, 2)) if h > 1 and w > 1 else np.zeros(n)
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


def tested_stats(ref_stats: dict[str, np.ndarray], batch_stats: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """The per-image statistics the KS family tests, as (reference, batch) 1-D arrays, and the batch's pooled
    histogram distance to the reference.

    `hist_tv` is each image's total-variation distance to the reference's mean histogram (averaged over the
    channels); a reference image is measured against the mean of the *other* reference images, so that under
    no drift both sides are measured alike. A statistic constant and equal on both sides (saturation of grey
    images) cannot drift and is left out: it would only spend the Holm budget.
    """
    if set(ref_stats) != set(batch_stats) or ref_stats[HIST].shape[1:] != batch_stats[HIST].shape[1:]:
        raise ValueError(f"the batch's statistics ({', '.join(sorted(batch_stats))}) are not the reference's "
                         f"({', '.join(sorted(ref_stats))}): drift is tested between sets of one channel count")
    ref = {k: v for k, v in ref_stats.items() if k != HIST}
    new = {k: v for k, v in batch_stats.items() if k != HIST}
    for k in list(ref):
        both = np.concatenate([ref[k], new[k]])
        if np.all(both == both[0]):
            del ref[k], new[k]
    rh, bh = ref_stats[HIST], batch_stats[HIST]
    n, total = len(rh), rh.sum(0)
    leave_one_out = (total[None] - rh) / max(n - 1, 1)
    ref[HIST_TV] = 0.5 * np.abs(rh - leave_one_out).sum(2).mean(1)
    new[HIST_TV] = 0.5 * np.abs(bh - total[None] / n).sum(2).mean(1)
    pooled = float(0.5 * np.abs(bh.mean(0) - total / n).sum(1).mean())
    return ref, new, pooled


def pixel_features(images: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """An embedding that needs no weights: each channel averaged over a grid×grid of cells (C·grid² numbers)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    return torch.nn.functional.adaptive_avg_pool2d(x, min(grid, x.shape[-2], x.shape[-1])).flatten(1)


def embedding(name: str, features_dir: Path):
    """The MMD test's embedding `name` (drift.features): `pixels`, `auto` (the classifier where the workspace has
    one, else the label-free encoder) or a feature space; ValueError/FileNotFoundError say what is missing."""
    from redistill import feature_spaces

    if name == PIXELS:
        return pixel_features
    return feature_spaces.load(feature_spaces.resolve([name], features_dir)[0], Path(features_dir)).extractor


def median_bandwidth(z: torch.Tensor, max_points: int = 1000, seed: int = 0) -> float:
    """The median pairwise distance (a subsample of at most `max_points` points)."""
    g = torch.Generator().manual_seed(seed)
    if len(z) > max_points:
        z = z[torch.randperm(len(z), generator=g)[:max_points]]
    d = torch.cdist(z, z)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(d.median())
    return med if med > 0 else 1.0


def mmd_permutation_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 1000, seed: int = 0,
                         bandwidth: float | None = None) -> tuple[float, float, float, np.ndarray]:
    """MMD² of samples x (n, d) and y (m, d) with a Gaussian kernel; returns (mmd², p, bandwidth, null).

    The statistic for a labelling w (1/n on one side, −1/m on the other) is wᵀKw; all permutations are
    evaluated at once as one matrix product.
    """
    x, y = x.double(), y.double()
    z = torch.cat([x, y])
    n, N = len(x), len(x) + len(y)
    bw = bandwidth or median_bandwidth(z, seed=seed)
    k = torch.exp(-torch.cdist(z, z).pow(2) / (2 * bw * bw))

    def weights(is_x: torch.Tensor) -> torch.Tensor:  # (N, P) boolean → signed weights
        return torch.where(is_x, 1.0 / n, -1.0 / (N - n)).double()

    observed = torch.zeros(N, 1, dtype=torch.bool)
    observed[:n] = True
    w = weights(observed)
    mmd2 = float((w * (k @ w)).sum())
    g = torch.Generator().manual_seed(seed)
    null = []
    for start in range(0, permutations, 250):
        p = min(250, permutations - start)
        order = torch.argsort(torch.rand(p, N, generator=g), dim=1)  # p random permutations
        is_x = (order < n).T  # (N, p): who lands in the first n
        wp = weights(is_x)
        null.append((wp * (k @ wp)).sum(0))
    null = torch.cat(null).numpy()
    pval = (1 + int((null >= mmd2 - 1e-15).sum())) / (1 + permutations)
    return mmd2, pval, bw, null


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control, any dependence)."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, running, out = len(items), 0.0, {}
    for i, (name, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = running
    return out


def detect(batch_name: str, ref_features: torch.Tensor, ref_stats: dict[str, np.ndarray],
           batch_features: torch.Tensor, batch_stats: dict[str, np.ndarray], alpha: float = 0.05,
           permutations: int = 1000, seed: int = 0) -> DriftReport:
    """Both tests on one batch; drift when either family rejects at level alpha / 2."""
    from scipy.stats import ks_2samp

    if not 0 < alpha < 1:
        raise ValueError(f"drift alpha must be between 0 and 1, got {alpha}")
    if len(batch_features) < 2 or len(ref_features) < 2:
        raise ValueError(f"drift tests need at least 2 images on each side, got {len(batch_features)} and "
                         f"{len(ref_features)}")
    ref_1d, new_1d, hist_tv = tested_stats(ref_stats, batch_stats)  # first: it names a channel-count mismatch
    mmd2, mmd_p, bw, null = mmd_permutation_test(batch_features, ref_features, permutations, seed)
    raw, ks = {}, {}
    for s in ref_1d:
        r = ks_2samp(new_1d[s], ref_1d[s])
        raw[s] = float(r.pvalue)
        ks[s] = {"statistic": float(r.statistic), "p": float(r.pvalue)}
    for s, padj in holm(raw).items():
        ks[s]["p_holm"] = padj
    half = alpha / 2
    reasons = []
    if mmd_p <= half:
        reasons.append(f"MMD² {mmd2:.4g} on the embeddings, permutation p {mmd_p:.4g} ≤ {half:g}")
    for s in ks:
        if ks[s]["p_holm"] <= half:
            shift = float(np.median(new_1d[s]) - np.median(ref_1d[s]))
            reasons.append(f"KS on per-image {s}: D {ks[s]['statistic']:.3f}, Holm p {ks[s]['p_holm']:.3g} ≤ {half:g} "
                           f"(median {'+' if shift >= 0 else '−'}{abs(shift):.3g} against the reference)")
    return DriftReport(batch=batch_name, n_batch=len(batch_features), n_reference=len(ref_features), alpha=alpha,
                       mmd2=mmd2, mmd_p=mmd_p, mmd_bandwidth=bw, ks=ks, drifted=bool(reasons), reasons=reasons,
                       histogram_tv=hist_tv, null_mmd2=null.tolist())


def calibrate(features: torch.Tensor, stats: dict[str, np.ndarray], batch_size: int, splits: int = 100,
              alpha: float = 0.05, permutations: int = 500, seed: int = 0) -> dict:
    """False-alarm rate on reference-against-reference splits.

    Each split draws `batch_size` reference images as a pseudo-batch and tests it against the disjoint
    rest, exactly as a real batch is tested. Returns the rate, its 95% Clopper–Pearson interval and the
    per-split p-values.
    """
    from scipy.stats import beta

    n = len(features)
    if batch_size >= n // 2:
        raise ValueError(f"calibration needs a batch ({batch_size}) smaller than half the reference ({n}); "
                         "pass a smaller --batch-size or a larger reference")
    rng = np.random.default_rng(seed)
    alarms, rows = 0, []
    for i in range(splits):
        order = rng.permutation(n)
        a, b = order[:batch_size], order[batch_size:]
        rep = detect(f"split{i}", features[b], {k: v[b] for k, v in stats.items()}, features[a],
                     {k: v[a] for k, v in stats.items()}, alpha, permutations, seed + i)
        alarms += rep.drifted
        rows.append({"mmd_p": rep.mmd_p, "ks_min_p_holm": min(v["p_holm"] for v in rep.ks.values()),
                     "drifted": rep.drifted, "reasons": rep.reasons})
    lo = 0.0 if alarms == 0 else float(beta.ppf(0.025, alarms, splits - alarms + 1))
    hi = 1.0 if alarms == splits else float(beta.ppf(0.975, alarms + 1, splits - alarms))
    return {"splits": splits, "batch_size": batch_size, "alpha": alpha, "permutations": permutations,
            "n_reference": n, "statistics": sorted(rep.ks) if splits else [], "false_alarms": alarms,
            "false_alarm_rate": alarms / splits, "false_alarm_ci95": [lo, hi], "per_split": rows}


def plot_report(report: DriftReport, ref_stats: dict[str, np.ndarray], batch_stats: dict[str, np.ndarray],
                out: Path) -> Path:
    """One PNG: the MMD² null distribution with the observed value, and the ECDFs of every tested statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_1d, new_1d, _ = tested_stats(ref_stats, batch_stats)
    names = list(report.ks)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3.0))
    ax = axes[0]
    ax.hist(report.null_mmd2, bins=40, color="0.7", label="null (permutations)")
    ax.axvline(report.mmd2, color="crimson", label=f"observed, p={report.mmd_p:.3g}")
    ax.set_title("MMD² on embeddings")
    ax.legend(fontsize=7)
    for ax, s in zip(axes[1:], names):
        for vals, label, colour in ((ref_1d[s], "reference", "0.4"), (new_1d[s], report.batch, "crimson")):
            v = np.sort(vals)
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label, color=colour)
        ax.set_title(f"{s}: D={report.ks[s]['statistic']:.2f}, p={report.ks[s]['p_holm']:.2g}", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"batch {report.batch}: {'DRIFT' if report.drifted else 'no drift'} (alpha {report.alpha:g})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def embed_folder(folder: Path, extractor) -> tuple[torch.Tensor, dict[str, np.ndarray], tuple[int, tuple[int, int]]]:
    """An image folder's embeddings, its per-image statistics, and its (channels, size)."""
    from redistill.data import load_image_folder

    im = load_image_folder(folder)
    return (*_embed(im.images, extractor, folder), (im.channels, im.size))


def _embed(images: np.ndarray, extractor, folder: Path | str = "the images") -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Embeddings and per-image statistics of images (N, C, H, W) in [0, 1]."""
    try:
        features = extractor(torch.from_numpy(images))
    except RuntimeError as e:  # a conv layer made for another channel count or size
        _, c, h, w = images.shape
        raise ValueError(f"the feature space cannot embed {folder} ({c}-channel {h}×{w} images): {str(e)[:200]}. "
                         f"Pass --features {PIXELS} (no weights), or a feature space trained on this data") from e
    return features, image_stats(images)


def check_folder(batch: Path, reference: Path, extractor, alpha: float, permutations: int, seed: int,
                 out_dir: Path | None = None) -> DriftReport:
    """Both tests on the image folder `batch` against `reference`; with `out_dir`, writes drift.json and
    drift.png there. ValueError when the two folders hold images of different shapes."""
    from redistill.data import load_image_folder

    ref, new = load_image_folder(reference), load_image_folder(batch)  # DataError (a ValueError) when unreadable
    if ref.images.shape[1:] != new.images.shape[1:]:
        (rc, rh, rw), (bc, bh, bw) = ref.images.shape[1:], new.images.shape[1:]
        raise ValueError(f"{batch} holds {bc}×{bh}×{bw} images, {reference} {rc}×{rh}×{rw}; drift is tested "
                         "between sets of one shape")
    (ref_f, ref_s), (new_f, new_s) = _embed(ref.images, extractor, reference), _embed(new.images, extractor, batch)
    report = detect(Path(batch).name, ref_f, ref_s, new_f, new_s, alpha, permutations, seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {**report.to_dict(), "reference": str(reference), "batch_path": str(batch)}
        (out_dir / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_report(report, ref_s, new_s, out_dir / "drift.png")
    return report
