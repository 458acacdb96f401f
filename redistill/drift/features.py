"""The spaces drift is tested in: per-image statistics (data.stats, tested here), the weight-free pixel and word
features, the prompts' text embedding, and the feature spaces by name (`drift.features`)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from redistill.data.stats import HIST

HIST_TV = "hist_tv"  # each image's total-variation distance to the reference's histogram
PIXELS = "pixels"  # the feature space that needs no weights: `pixel_features`
WORDS = "words"  # the prompts' feature space that needs no weights: `word_features`
WORD_DIM = 1024  # buckets of the hashing vectoriser: few collisions for prompt vocabularies of thousands of words
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script


def tested_stats(
    ref_stats: dict[str, np.ndarray], batch_stats: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """The per-image statistics the KS family tests, as (reference, batch) 1-D arrays, and the batch's pooled
    histogram distance to the reference.

    `hist_tv` is each image's total-variation distance to the reference's mean histogram (averaged over the
    channels); a reference image is measured against the mean of the *other* reference images, so that under
    no drift both sides are measured alike. A statistic constant and equal on both sides (saturation of grey
    images) cannot drift and is left out: it would only spend the Holm budget.
    """
    if set(ref_stats) != set(batch_stats) or ref_stats[HIST].shape[1:] != batch_stats[HIST].shape[1:]:
        raise ValueError(
            f"the batch's statistics ({', '.join(sorted(batch_stats))}) are not the reference's "
            f"({', '.join(sorted(ref_stats))}): drift is tested between sets of one channel count"
        )
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


def _bucket(token: str, dim: int) -> tuple[int, float]:
    # crc32, not hash(): Python salts str hashes per process, and the features must match across processes
    h = zlib.crc32(token.encode("utf-8"))
    return h % dim, 1.0 if (h >> 31) & 1 else -1.0  # a signed hash: collisions cancel on average


def word_features(captions: list[str], dim: int = WORD_DIM) -> torch.Tensor:
    """Captions (N) → (N, dim) float32: word unigram and bigram counts (case-folded runs of letters and digits)
    hashed into `dim` signed buckets, each row L2-normalised (an empty caption is the zero vector).

    Deterministic across processes and machines; needs no weights and sees words, not meaning: paraphrases
    that share no words are far apart. A caller with a text encoder passes its own `text_extractor`."""
    out = np.zeros((len(captions), dim), dtype=np.float64)
    for i, caption in enumerate(captions):
        words = _WORD.findall((caption or "").casefold())
        grams = [f"1:{w}" for w in words] + [f"2:{a} {b}" for a, b in zip(words, words[1:])]
        for g in grams:
            j, sign = _bucket(g, dim)
            out[i, j] += sign
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return torch.from_numpy(out / np.where(norms > 0, norms, 1.0)).float()


def text_embedding(
    captions: list[str],
    text_extractor: Callable[[list[str]], torch.Tensor] | None = None,
    where: Path | str = "the captions",
) -> torch.Tensor:
    """Prompt embeddings (N, d): `text_extractor(captions)`, or the weightless `word_features` without one."""
    if text_extractor is None:
        return word_features(captions)
    try:
        z = torch.as_tensor(text_extractor(list(captions)), dtype=torch.float32)
    except Exception as e:  # a tokenizer or text encoder error: say whose prompts, and the way around it
        raise ValueError(
            f"the text feature space cannot embed the captions of {where}: {type(e).__name__}: "
            f"{str(e)[:200]}; pass no text_extractor to use the weightless {WORDS!r} features"
        ) from e
    if z.ndim != 2 or len(z) != len(captions):
        raise ValueError(
            f"the text feature space gave shape {tuple(z.shape)} for {len(captions)} captions of {where}; "
            "it must return one embedding per caption (N, d)"
        )
    return z


def embedding(name: str, features_dir: Path):
    """The MMD test's embedding `name` (drift.features): `pixels`, `auto` (the classifier where the workspace has
    one, else the label-free encoder) or a feature space; ValueError/FileNotFoundError say what is missing."""
    from redistill.evaluation import spaces as feature_spaces

    if name == PIXELS:
        return pixel_features
    return feature_spaces.load(feature_spaces.resolve([name], features_dir)[0], Path(features_dir)).extractor
