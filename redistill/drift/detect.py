"""Drift detection: is a new batch drawn like the representative set?

Two families of tests, each at half the family-wise level `alpha`, so the union bound keeps the false-alarm
rate of "drift" at or below `alpha` (three families at `alpha`/3 each when both sides have captions, see 3.):

1. MMD two-sample permutation test (Gretton et al. 2012) on embeddings: Gaussian kernel, bandwidth by the
   median heuristic, biased MMD² as the statistic, its null distribution from random re-labellings of the
   pooled sample. p = (1 + #{null ≥ observed}) / (1 + permutations). The embedding is the caller's feature
   space (`feature_spaces`: classifier, encoder, inception:…), or `pixel_features`, which needs no weights.
2. Two-sample Kolmogorov–Smirnov tests on per-image statistics, Holm–Bonferroni corrected across the
   statistics. They hold for 1 or 3 channels at any size: per-channel mean and spread, sharpness (mean
   gradient magnitude), saturation (HSV S; only tested for colour images) and each image's colour-histogram
   distance to the reference's histogram. Grey images also get the stroke statistics made for the digits
   (ink share, centre of mass), which mean nothing for colour pictures.
3. With captions on both sides (text-to-image data): the same MMD permutation test on the prompts' text
   embeddings, with its own median bandwidth. The text feature space is the caller's `text_extractor` (the
   teacher's CLIP text encoder, say), or `word_features` ("words": hashed word unigrams and bigrams, no
   weights). A rejection here says the prompts drifted: what users ask the model for changed, even where the
   images did not. Only non-empty captions are embedded; captions on one side only are noted, not tested.

`calibrate` measures the false-alarm rate on reference-against-reference splits. The tests take
embeddings; `embed_folder` and `check_folder` read image folders through the caller's feature extractor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from redistill.drift.features import WORDS, tested_stats


@dataclass
class DriftReport:
    """The outcome for one batch: every test, its corrected p-values and the verdict.

    The `text_*` fields hold the prompts' MMD test (None when it did not run: captions missing on a side) and
    `notes` why it did not; `to_dict` leaves them out then, so an image-only report reads as it always has."""

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
    text_features: str | None = None  # the prompts' feature space: "words" (hashed word n-grams) or the caller's
    text_mmd2: float | None = None  # MMD² of the batch's and the reference's prompt embeddings
    text_mmd_p: float | None = None  # its permutation p-value, compared with alpha / 3
    text_bandwidth: float | None = None
    n_batch_captions: int = 0
    n_reference_captions: int = 0
    notes: list[str] = field(default_factory=list)  # what was not tested and why (e.g. captions on one side only)
    null_text_mmd2: list[float] = field(default_factory=list, repr=False)

    @property
    def prompts_tested(self) -> bool:
        return self.text_mmd_p is not None

    @property
    def prompts_drifted(self) -> bool:
        """The prompts' MMD test rejected at its share of alpha."""
        return self.prompts_tested and self.text_mmd_p <= self.alpha / 3

    def to_dict(self, with_null: bool = False) -> dict:
        d = asdict(self)
        if not with_null:
            d.pop("null_mmd2")
            d.pop("null_text_mmd2")
        if not self.prompts_tested:
            for k in (
                "text_features",
                "text_mmd2",
                "text_mmd_p",
                "text_bandwidth",
                "n_batch_captions",
                "n_reference_captions",
                "null_text_mmd2",
            ):
                d.pop(k, None)
        if not self.notes:
            d.pop("notes")
        return d

    def message(self) -> str:
        """One line: the verdict and why (the prompts named first when they drifted)."""
        if not self.drifted:
            tested = "images and prompts" if self.prompts_tested else "images"
            return f"{self.batch}: no drift in its {tested} (alpha {self.alpha:g})" + (
                f"; {'; '.join(self.notes)}" if self.notes else ""
            )
        return f"{self.batch}: drift: " + "; ".join(self.reasons)


def median_bandwidth(z: torch.Tensor, max_points: int = 1000, seed: int = 0) -> float:
    """The median pairwise distance (a subsample of at most `max_points` points)."""
    g = torch.Generator().manual_seed(seed)
    if len(z) > max_points:
        z = z[torch.randperm(len(z), generator=g)[:max_points]]
    d = torch.cdist(z, z)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(d.median())
    return med if med > 0 else 1.0


def mmd_permutation_test(
    x: torch.Tensor, y: torch.Tensor, permutations: int = 1000, seed: int = 0, bandwidth: float | None = None
) -> tuple[float, float, float, np.ndarray]:
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


def detect(
    batch_name: str,
    ref_features: torch.Tensor,
    ref_stats: dict[str, np.ndarray],
    batch_features: torch.Tensor,
    batch_stats: dict[str, np.ndarray],
    alpha: float = 0.05,
    permutations: int = 1000,
    seed: int = 0,
    ref_text: torch.Tensor | None = None,
    batch_text: torch.Tensor | None = None,
    text_features: str = WORDS,
) -> DriftReport:
    """Every test on one batch; drift when any family rejects at its share of alpha.

    Without prompt embeddings two families (the image MMD, the Holm-corrected KS tests) get alpha / 2 each. With
    `ref_text` and `batch_text` (the captions' embeddings in the space `text_features`) the prompts' MMD is a
    third family and each of the three gets alpha / 3, so the union bound still keeps false alarms ≤ alpha.
    """
    from scipy.stats import ks_2samp

    if not 0 < alpha < 1:
        raise ValueError(f"drift alpha must be between 0 and 1, got {alpha}")
    if len(batch_features) < 2 or len(ref_features) < 2:
        raise ValueError(
            f"drift tests need at least 2 images on each side, got {len(batch_features)} and {len(ref_features)}"
        )
    if (ref_text is None) != (batch_text is None):
        raise ValueError("the prompts' drift test needs the captions' embeddings of both the reference and the batch")
    prompts = ref_text is not None
    if prompts and (len(batch_text) < 2 or len(ref_text) < 2):
        raise ValueError(
            f"the prompts' drift test needs at least 2 captions on each side, got {len(batch_text)} and {len(ref_text)}"
        )
    ref_1d, new_1d, hist_tv = tested_stats(ref_stats, batch_stats)  # first: it names a channel-count mismatch
    mmd2, mmd_p, bw, null = mmd_permutation_test(batch_features, ref_features, permutations, seed)
    raw, ks = {}, {}
    for s in ref_1d:
        r = ks_2samp(new_1d[s], ref_1d[s])
        raw[s] = float(r.pvalue)
        ks[s] = {"statistic": float(r.statistic), "p": float(r.pvalue)}
    for s, padj in holm(raw).items():
        ks[s]["p_holm"] = padj
    level = alpha / (3 if prompts else 2)  # each family's share of the family-wise level
    reasons = []
    text = {}
    if prompts:
        t_mmd2, t_p, t_bw, t_null = mmd_permutation_test(batch_text, ref_text, permutations, seed)
        text = dict(
            text_features=text_features,
            text_mmd2=t_mmd2,
            text_mmd_p=t_p,
            text_bandwidth=t_bw,
            n_batch_captions=len(batch_text),
            n_reference_captions=len(ref_text),
            null_text_mmd2=t_null.tolist(),
        )
        if t_p <= level:
            reasons.append(
                f"the prompts drifted: MMD² {t_mmd2:.4g} on the captions' {text_features} embeddings, "
                f"permutation p {t_p:.4g} ≤ {level:g}"
            )
    if mmd_p <= level:
        reasons.append(f"MMD² {mmd2:.4g} on the embeddings, permutation p {mmd_p:.4g} ≤ {level:g}")
    for s in ks:
        if ks[s]["p_holm"] <= level:
            shift = float(np.median(new_1d[s]) - np.median(ref_1d[s]))
            reasons.append(
                f"KS on per-image {s}: D {ks[s]['statistic']:.3f}, Holm p {ks[s]['p_holm']:.3g} ≤ {level:g} "
                f"(median {'+' if shift >= 0 else '−'}{abs(shift):.3g} against the reference)"
            )
    return DriftReport(
        batch=batch_name,
        n_batch=len(batch_features),
        n_reference=len(ref_features),
        alpha=alpha,
        mmd2=mmd2,
        mmd_p=mmd_p,
        mmd_bandwidth=bw,
        ks=ks,
        drifted=bool(reasons),
        reasons=reasons,
        histogram_tv=hist_tv,
        null_mmd2=null.tolist(),
        **text,
    )


def calibrate(
    features: torch.Tensor,
    stats: dict[str, np.ndarray],
    batch_size: int,
    splits: int = 100,
    alpha: float = 0.05,
    permutations: int = 500,
    seed: int = 0,
) -> dict:
    """False-alarm rate on reference-against-reference splits.

    Each split draws `batch_size` reference images as a pseudo-batch and tests it against the disjoint
    rest, exactly as a real batch is tested. Returns the rate, its 95% Clopper–Pearson interval and the
    per-split p-values.
    """
    from scipy.stats import beta

    n = len(features)
    if batch_size >= n // 2:
        raise ValueError(
            f"calibration needs a batch ({batch_size}) smaller than half the reference ({n}); "
            "pass a smaller --batch-size or a larger reference"
        )
    rng = np.random.default_rng(seed)
    alarms, rows = 0, []
    for i in range(splits):
        order = rng.permutation(n)
        a, b = order[:batch_size], order[batch_size:]
        rep = detect(
            f"split{i}",
            features[b],
            {k: v[b] for k, v in stats.items()},
            features[a],
            {k: v[a] for k, v in stats.items()},
            alpha,
            permutations,
            seed + i,
        )
        alarms += rep.drifted
        rows.append(
            {
                "mmd_p": rep.mmd_p,
                "ks_min_p_holm": min(v["p_holm"] for v in rep.ks.values()),
                "drifted": rep.drifted,
                "reasons": rep.reasons,
            }
        )
    lo = 0.0 if alarms == 0 else float(beta.ppf(0.025, alarms, splits - alarms + 1))
    hi = 1.0 if alarms == splits else float(beta.ppf(0.975, alarms + 1, splits - alarms))
    return {
        "splits": splits,
        "batch_size": batch_size,
        "alpha": alpha,
        "permutations": permutations,
        "n_reference": n,
        "statistics": sorted(rep.ks) if splits else [],
        "false_alarms": alarms,
        "false_alarm_rate": alarms / splits,
        "false_alarm_ci95": [lo, hi],
        "per_split": rows,
    }
