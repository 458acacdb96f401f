"""Drift detection: is a new batch drawn like the representative set?

Two families of tests, each at half the family-wise level `alpha`, so the union bound keeps the false-alarm
rate of "drift" at or below `alpha`:

1. MMD two-sample permutation test (Gretton et al. 2012) on the feature extractor's embeddings: Gaussian
   kernel, bandwidth by the median heuristic, biased MMD² as the statistic, its null distribution from
   random re-labellings of the pooled sample. p = (1 + #{null ≥ observed}) / (1 + permutations).
2. Two-sample Kolmogorov–Smirnov tests on per-image statistics (mean and spread of intensity, ink share,
   centre of mass, edge energy), Holm–Bonferroni corrected across the statistics.

`calibrate` measures the false-alarm rate on reference-against-reference splits. The tests take
embeddings; `embed_folder` and `check_folder` read image folders through the caller's feature extractor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import json

import numpy as np
import torch

STATS = ("mean", "std", "ink", "row_centre", "col_centre", "edge")


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
    null_mmd2: list[float] = field(default_factory=list, repr=False)  # for the plot

    def to_dict(self, with_null: bool = False) -> dict:
        d = asdict(self)
        if not with_null:
            d.pop("null_mmd2")
        return d


def image_stats(images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of images in [0, 1], shape (N, C, H, W)."""
    x = torch.as_tensor(images, dtype=torch.float64).mean(1)  # grey: (N, H, W)
    n, h, w = x.shape
    mass = x.sum((1, 2)).clamp_min(1e-8)
    rows = torch.arange(h, dtype=torch.float64)[None, :, None]
    cols = torch.arange(w, dtype=torch.float64)[None, None, :]
    gy, gx = x[:, 1:, :] - x[:, :-1, :], x[:, :, 1:] - x[:, :, :-1]
    out = {
        "mean": x.mean((1, 2)),
        "std": x.flatten(1).std(1),
        "ink": (x > 0.5).double().mean((1, 2)),
        "row_centre": (x * rows).sum((1, 2)) / mass / max(h - 1, 1),
        "col_centre": (x * cols).sum((1, 2)) / mass / max(w - 1, 1),
        "edge": (gy.pow(2).mean((1, 2)) + gx.pow(2).mean((1, 2))).sqrt(),
    }
    return {k: v.numpy() for k, v in out.items()}


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
    mmd2, mmd_p, bw, null = mmd_permutation_test(batch_features, ref_features, permutations, seed)
    raw, ks = {}, {}
    for s in STATS:
        r = ks_2samp(batch_stats[s], ref_stats[s])
        raw[s] = float(r.pvalue)
        ks[s] = {"statistic": float(r.statistic), "p": float(r.pvalue)}
    for s, padj in holm(raw).items():
        ks[s]["p_holm"] = padj
    half = alpha / 2
    reasons = []
    if mmd_p <= half:
        reasons.append(f"MMD² {mmd2:.4g} on the embeddings, permutation p {mmd_p:.4g} ≤ {half:g}")
    for s in STATS:
        if ks[s]["p_holm"] <= half:
            reasons.append(f"KS on per-image {s}: D {ks[s]['statistic']:.3f}, Holm p {ks[s]['p_holm']:.3g} ≤ {half:g}")
    return DriftReport(batch=batch_name, n_batch=len(batch_features), n_reference=len(ref_features), alpha=alpha,
                       mmd2=mmd2, mmd_p=mmd_p, mmd_bandwidth=bw, ks=ks, drifted=bool(reasons), reasons=reasons,
                       null_mmd2=null.tolist())


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
        raise ValueError(f"calibration needs a batch ({batch_size}) smaller than half the reference ({n})")
    rng = np.random.default_rng(seed)
    alarms, rows = 0, []
    for i in range(splits):
        order = rng.permutation(n)
        a, b = order[:batch_size], order[batch_size:]
        rep = detect(f"split{i}", features[b], {k: v[b] for k, v in stats.items()}, features[a],
                     {k: v[a] for k, v in stats.items()}, alpha, permutations, seed + i)
        alarms += rep.drifted
        rows.append({"mmd_p": rep.mmd_p, "ks_min_p_holm": min(v["p_holm"] for v in rep.ks.values()),
                     "drifted": rep.drifted})
    lo = 0.0 if alarms == 0 else float(beta.ppf(0.025, alarms, splits - alarms + 1))
    hi = 1.0 if alarms == splits else float(beta.ppf(0.975, alarms + 1, splits - alarms))
    return {"splits": splits, "batch_size": batch_size, "alpha": alpha, "permutations": permutations,
            "false_alarms": alarms, "false_alarm_rate": alarms / splits, "false_alarm_ci95": [lo, hi],
            "per_split": rows}


def plot_report(report: DriftReport, ref_stats: dict[str, np.ndarray], batch_stats: dict[str, np.ndarray],
                out: Path) -> Path:
    """One PNG: the MMD² null distribution with the observed value, and the ECDFs of every statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(STATS), figsize=(3.2 * (1 + len(STATS)), 3.0))
    ax = axes[0]
    ax.hist(report.null_mmd2, bins=40, color="0.7", label="null (permutations)")
    ax.axvline(report.mmd2, color="crimson", label=f"observed, p={report.mmd_p:.3g}")
    ax.set_title("MMD² on embeddings")
    ax.legend(fontsize=7)
    for ax, s in zip(axes[1:], STATS):
        for vals, label, colour in ((ref_stats[s], "reference", "0.4"), (batch_stats[s], report.batch, "crimson")):
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
    return (*_embed(im.images, extractor), (im.channels, im.size))


def _embed(images: np.ndarray, extractor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Embeddings and per-image statistics of images (N, C, H, W) in [0, 1]."""
    return extractor(torch.from_numpy(images)), image_stats(images)


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
    (ref_f, ref_s), (new_f, new_s) = _embed(ref.images, extractor), _embed(new.images, extractor)
    report = detect(Path(batch).name, ref_f, ref_s, new_f, new_s, alpha, permutations, seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {**report.to_dict(), "reference": str(reference), "batch_path": str(batch)}
        (out_dir / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_report(report, ref_s, new_s, out_dir / "drift.png")
    return report
