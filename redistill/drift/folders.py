"""Drift between image folders: each folder embedded through the caller's feature extractor, tested (detect), and
the report's figure."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from redistill.data.stats import image_stats
from redistill.drift.detect import DriftReport, detect
from redistill.drift.features import PIXELS, WORDS, tested_stats, text_embedding


def plot_report(
    report: DriftReport, ref_stats: dict[str, np.ndarray], batch_stats: dict[str, np.ndarray], out: Path
) -> Path:
    """One PNG: the MMD² null distribution with the observed value (the prompts' too, when tested), and the ECDFs
    of every tested statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_1d, new_1d, _ = tested_stats(ref_stats, batch_stats)
    names = list(report.ks)
    nulls = [(report.null_mmd2, report.mmd2, report.mmd_p, "MMD² on embeddings")]
    if report.prompts_tested:
        nulls.append(
            (report.null_text_mmd2, report.text_mmd2, report.text_mmd_p, f"MMD² on prompts ({report.text_features})")
        )
    fig, axes = plt.subplots(1, len(nulls) + len(names), figsize=(3.2 * (len(nulls) + len(names)), 3.0))
    for ax, (null, observed, pval, title) in zip(axes, nulls):
        ax.hist(null, bins=40, color="0.7", label="null (permutations)")
        ax.axvline(observed, color="crimson", label=f"observed, p={pval:.3g}")
        ax.set_title(title, fontsize=9 if len(nulls) > 1 else None)
        ax.legend(fontsize=7)
    for ax, s in zip(axes[len(nulls) :], names):
        for vals, label, colour in ((ref_1d[s], "reference", "0.4"), (new_1d[s], report.batch, "crimson")):
            v = np.sort(vals)
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label, color=colour)
        ax.set_title(f"{s}: D={report.ks[s]['statistic']:.2f}, p={report.ks[s]['p_holm']:.2g}", fontsize=8)
    axes[len(nulls)].legend(fontsize=7)
    fig.suptitle(f"batch {report.batch}: {'DRIFT' if report.drifted else 'no drift'} (alpha {report.alpha:g})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def embed_folder(folder: Path, extractor) -> tuple[torch.Tensor, dict[str, np.ndarray], tuple[int, tuple[int, int]]]:
    """An image folder's embeddings, its per-image statistics, and its (channels, size)."""
    from redistill.data.images import load_image_folder

    im = load_image_folder(folder)
    return (*_embed(im.images, extractor, folder), (im.channels, im.size))


def _embed(
    images: np.ndarray, extractor, folder: Path | str = "the images"
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Embeddings and per-image statistics of images (N, C, H, W) in [0, 1]."""
    try:
        features = extractor(torch.from_numpy(images))
    except RuntimeError as e:  # a conv layer made for another channel count or size
        _, c, h, w = images.shape
        raise ValueError(
            f"the feature space cannot embed {folder} ({c}-channel {h}×{w} images): {str(e)[:200]}. "
            f"Pass --features {PIXELS} (no weights), or a feature space trained on this data"
        ) from e
    return features, image_stats(images)


def check_folder(
    batch: Path,
    reference: Path,
    extractor,
    alpha: float,
    permutations: int,
    seed: int,
    out_dir: Path | None = None,
    text_extractor: Callable[[list[str]], torch.Tensor] | None = None,
    text_features: str | None = None,
) -> DriftReport:
    """Every test on the image folder `batch` against `reference`; with `out_dir`, writes drift.json and
    drift.png there. ValueError when the two folders hold images of different shapes.

    When both folders have captions, their prompts are tested too, embedded by `text_extractor` (named
    `text_features` in the report), or by the weightless `word_features` ("words") without one."""
    from redistill.data.images import load_image_folder

    ref, new = load_image_folder(reference), load_image_folder(batch)  # DataError (a ValueError) when unreadable
    if ref.images.shape[1:] != new.images.shape[1:]:
        (rc, rh, rw), (bc, bh, bw) = ref.images.shape[1:], new.images.shape[1:]
        raise ValueError(
            f"{batch} holds {bc}×{bh}×{bw} images, {reference} {rc}×{rh}×{rw}; drift is tested "
            "between sets of one shape"
        )
    (ref_f, ref_s), (new_f, new_s) = _embed(ref.images, extractor, reference), _embed(new.images, extractor, batch)
    ref_t, new_t, notes = None, None, []
    space = text_features or (WORDS if text_extractor is None else getattr(text_extractor, "name", "text_extractor"))
    if ref.captions is not None and new.captions is not None:
        ref_c, new_c = ([c.strip() for c in caps if c.strip()] for caps in (ref.captions, new.captions))
        if len(ref_c) < 2 or len(new_c) < 2:
            notes.append(
                f"prompts not tested: {len(new_c)} captions in {batch} and {len(ref_c)} in {reference}, "
                "at least 2 on each side are needed"
            )
        else:
            ref_t, new_t = (
                text_embedding(ref_c, text_extractor, reference),
                text_embedding(new_c, text_extractor, batch),
            )
    elif ref.captions is not None or new.captions is not None:
        has, hasnt = (batch, reference) if new.captions is not None else (reference, batch)
        notes.append(f"prompts not tested: {has} has captions but {hasnt} has none")
    report = detect(Path(batch).name, ref_f, ref_s, new_f, new_s, alpha, permutations, seed, ref_t, new_t, space)
    report.notes = notes
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {**report.to_dict(), "reference": str(reference), "batch_path": str(batch)}
        (out_dir / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_report(report, ref_s, new_s, out_dir / "drift.png")
    return report
