"""The evaluation suite: quality, fidelity to a reference pipeline, speed and memory, measured together.

- Quality: FID and KID (torchmetrics) in the feature space of the project's classifier (or a local
  Inception), ≥ 2,000 generated samples against the reference set, each with a bootstrap 95% CI; plus the
  share of samples recognisable as a digit.
- Fidelity: PSNR and SSIM (torchmetrics) between the candidate and the reference pipeline started from
  the same initial noise.
- Speed: latency per image at batch 1 (p50, p95) and throughput at batch 64, candidate and reference
  timed in the same process, interleaved, after warm-up; speedups as ratios.
- Memory: peak memory while sampling, parameter count, checkpoint size on disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from redistill.config import EvaluateParams
from redistill.data.images import ImageSet
from redistill.evaluation.fid import fid_floor, kid_ci, kid_subsets, paired_fid, psnr_ssim
from redistill.evaluation.gate import decided, gap_bound
from redistill.evaluation.sampling import (
    _batches,
    cache_samples,
    configure_scheduler,
    fresh_noise,
    sample,
    sample_cached,
    use_data_prompts,
)
from redistill.evaluation.speed import PeakMemory, measure_speed
from redistill.models.pipelines import (
    PipelineError,
    check_fits,
    folder_size_bytes,
    load_pipeline,
    pipeline_sha256,
)


@dataclass
class Side:
    """One pipeline under evaluation: where it is, how many steps, which sampler."""

    path: Path
    steps: int
    scheduler: str = "auto"


@dataclass
class _Unnamed:
    """A bare feature module passed to `evaluate` (tests, one-off checks): one space named "features"."""

    extractor: nn.Module
    name: str = "features"
    sha256: str = ""


def quality_in_space(
    extractor: nn.Module,
    real_images: np.ndarray,
    fake: torch.Tensor,
    ref_fake: torch.Tensor,
    identical: bool,
    p: EvaluateParams,
) -> dict:
    """FID of candidate and reference, their gap and ratio (paired bootstrap CIs), KID, and the split-half
    floor, all in one feature space."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([extractor(x[i : i + 1000].float()) for i in range(0, len(x), 1000)]).double()

    real_f = embed(torch.from_numpy(real_images))
    fake_f = embed(fake)
    ref_f = fake_f if identical else embed(ref_fake)
    q = paired_fid(real_f, fake_f, ref_f, p.bootstrap, p.seed)
    kids = kid_subsets(real_f, fake_f, p.kid_subset_size, p.bootstrap, p.seed)
    ref_kids = kids if identical else kid_subsets(real_f, ref_f, p.kid_subset_size, p.bootstrap, p.seed)
    floor, floor_sd = fid_floor(real_f, p.floor_splits, p.seed)
    lo, hi = q["fid_gap_ci95"]
    q.update(
        {
            "kid": float(np.mean(kids)),
            "kid_ci95": list(kid_ci(kids)),
            "reference_kid": float(np.mean(ref_kids)),
            "reference_kid_ci95": list(kid_ci(ref_kids)),
            "fid_floor": floor,
            "fid_floor_sd": floor_sd,
            # the gated figure: how much further from the data than the teacher, in units of the floor
            "fid_gap_floors": q["fid_gap"] / floor if floor > 0 else None,
            "fid_gap_halfwidth": (hi - lo) / 2,
            "fid_gap_halfwidth_floors": (hi - lo) / 2 / floor if floor > 0 else None,
            "num_features": int(real_f.shape[1]),
            "dead_features": int((real_f.std(0) < 1e-8).sum()),
        }
    )
    return q


def _load_pair(candidate: Side, reference: Side, data: ImageSet, data_path: Path | None, dev: torch.device):
    """The candidate's and the reference's pipelines, each checked to fit the data; one object where both are the
    same folder at the same step count."""
    cand = load_pipeline(candidate.path, dev)
    check_fits(cand, candidate.path, data.channels, data.size, data_path)
    same = Path(candidate.path).resolve() == Path(reference.path).resolve()
    ref = cand if same else load_pipeline(reference.path, dev)
    check_fits(ref, reference.path, data.channels, data.size, data_path)
    if same and candidate.steps != reference.steps:
        ref = load_pipeline(reference.path, dev)  # a second copy: each may need its own scheduler
    return cand, ref


def _recognisability(
    fake: torch.Tensor,
    ref_fake: torch.Tensor,
    identical: bool,
    data: ImageSet,
    asked: torch.Tensor | None,
    classifier: nn.Module | None,
    confidence: float,
    clip_score,
) -> dict:
    """The share of the candidate's and the reference's samples recognised as a digit; with prompts (`asked`: which
    caption each sample was asked for), prompt adherence and the CLIP score of each image against its own prompt."""
    from redistill.evaluation.features import classify

    recog = {}
    if classifier is not None:
        c = classify(classifier, fake, confidence)
        r = c if identical else classify(classifier, ref_fake, confidence)
        recog = {**c, "reference_recognisable_share": r["recognisable_share"]}
        if asked is not None and data.labels is not None:
            # prompt adherence: does each image show the class its prompt asked for (the label of the image the
            # caption came from)?
            from redistill.evaluation.features import adherence

            labels = torch.as_tensor(np.asarray(data.labels))[asked]
            a, ra = adherence(classifier, fake, labels), adherence(classifier, ref_fake, labels)
            recog.update(
                a,
                reference_prompt_adherence=ra["prompt_adherence"],
                prompt_adherence_gap_points=100 * (ra["prompt_adherence"] - a["prompt_adherence"]),
            )
    if asked is not None and clip_score is not None:  # CLIP score of each image against its own prompt
        words = [data.captions[i] for i in asked.tolist()]
        cs, rcs = float(clip_score(fake, words).mean()), float(clip_score(ref_fake, words).mean())
        recog.update(clip_score=cs, reference_clip_score=rcs)
    return recog


def evaluate(
    candidate: Side,
    reference: Side,
    data: ImageSet,
    extractor,
    p: EvaluateParams,
    classifier: nn.Module | None = None,
    confidence: float = 0.9,
    out_dir: Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda m: None,
    data_path: Path | None = None,
    cache_dir: Path | None = None,
    bounds: dict[str, float | None] | float | None = None,
    clip_score=None,
) -> dict:
    """Run the whole suite on `candidate` against `reference` and `data`; returns one JSON-able dict.

    `extractor` is a list of `feature_spaces.FeatureSpace` (the first one's figures also sit at the top of
    `quality`), or one bare feature module. With `cache_dir`, the reference's samples are reused across runs
    (same bytes, same draw), so evaluating many candidates against the teacher at 50 steps samples the
    teacher once.
    """
    from redistill.models import adapter_for

    if candidate.steps <= 0 or reference.steps <= 0:
        raise ValueError(f"step counts must be ≥ 1, got {candidate.steps} and {reference.steps}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    cand, ref = _load_pair(candidate, reference, data, data_path, dev)
    prompted = use_data_prompts([cand, ref], data)  # a text-to-image pair draws the data's captions, the same for both
    cand_sha, ref_sha = pipeline_sha256(candidate.path), pipeline_sha256(reference.path)  # once: folders are large
    cand_sched = configure_scheduler(cand, candidate.steps, candidate.scheduler)
    ref_sched = configure_scheduler(ref, reference.steps, reference.scheduler) if ref is not cand else cand_sched
    identical = ref is cand

    # 1. Samples from the same initial noise; memory measured while the candidate samples.
    # 2. Quality in each feature space: FIDs with a paired bootstrap (gap, ratio), KID, the real-data floor.
    #    With the gate's `bounds` (in floors, per space), the sample grows (doubling, up to evaluate.max_samples)
    #    until no space's FID-gap interval contains its bound, so the verdict is not left to sampling noise: a
    #    student far from its bound (either side) is decided at evaluate.num_samples, a deterministic student paired
    #    with its teacher narrows fast, one near its bound or a stochastic sampler needs more.
    spaces = list(extractor) if isinstance(extractor, (list, tuple)) else [_Unnamed(extractor)]
    n, fake, ref_cached, ref_fake, ref_mem = p.num_samples, None, False, None, None
    while True:
        log(f"sampling {n} images from the candidate at {candidate.steps} steps ({cand_sched})")
        if fake is None:
            with PeakMemory(dev) as mem:
                fake = sample(cand, n, candidate.steps, p.seed, p.sample_batch_size)
        else:  # the first len(fake) images are the same draw: only the new batches are sampled
            more = _batches(n, p.seed, p.sample_batch_size)[len(_batches(len(fake), p.seed, p.sample_batch_size)) :]
            fake = torch.cat([fake] + [sample(cand, size, candidate.steps, b_seed, size) for b_seed, size in more])
        if not torch.isfinite(fake).all():
            raise PipelineError(f"pipeline at {candidate.path} produced non-finite images; its weights are broken")
        if identical:
            ref_fake, ref_mem = fake, mem
            cache_samples(
                fake,
                cache_dir,
                cand,
                candidate.path,
                cand_sched,
                n,
                candidate.steps,
                p.seed,
                p.sample_batch_size,
                sha256=cand_sha,
            )
        else:
            log(f"sampling {n} images from the reference at {reference.steps} steps ({ref_sched})")
            first = ref_fake is None
            with PeakMemory(dev) as measured:
                ref_fake, ref_cached = sample_cached(
                    ref,
                    reference.path,
                    ref_sched,
                    n,
                    reference.steps,
                    p.seed,
                    p.sample_batch_size,
                    cache_dir,
                    sha256=ref_sha,
                )
            if first:  # the peak of the first draw, unless it came from the cache (then not measured)
                ref_mem = None if ref_cached else measured
            if ref_cached:
                log("  (reused cached reference samples; reference peak memory not re-measured)")
        log("computing FID/KID with paired bootstrap CIs")
        per_space = {
            sp.name: quality_in_space(sp.extractor, data.images, fake, ref_fake, identical, p) for sp in spaces
        }
        open_ = {s: b for s, q in per_space.items() if not decided(q, b := gap_bound(bounds, s))}
        if not open_ or n >= p.max_samples:
            break
        log(
            "  the FID-gap CI contains the gate's bound ("
            + ", ".join(
                f"{s}: {per_space[s]['fid_gap_floors']:+.3f} ±{per_space[s]['fid_gap_halfwidth_floors']:.3f} floors, bound {b}"
                for s, b in open_.items()
            )
            + "): more samples"
        )
        n = min(2 * n, p.max_samples)
    primary = spaces[0].name
    # 2b. recognisability, prompt adherence and CLIP score of what the candidate and the reference drew
    asked = prompted(cand, n, p.seed, p.sample_batch_size) if prompted is not None else None
    recog = _recognisability(fake, ref_fake, identical, data, asked, classifier, confidence, clip_score)

    # 3. Fidelity to the reference on the same noise.
    psnr, ssim = psnr_ssim(fake, ref_fake)

    # 4. Speed, interleaved in this process.
    log("timing latency and throughput (interleaved)")
    speed = measure_speed(cand, candidate.steps, ref, reference.steps, p)

    cand_params = sum(x.numel() for x in adapter_for(cand).unet.parameters())
    result = {
        "pipeline": str(candidate.path),
        "sha256": cand_sha,
        "steps": candidate.steps,
        "scheduler": cand_sched,
        "reference": {
            "pipeline": str(reference.path),
            "sha256": ref_sha,
            "steps": reference.steps,
            "scheduler": ref_sched,
        },
        "num_samples": n,
        "num_real": len(data),
        "gap_bounds_floors": {s: gap_bound(bounds, s) for s in per_space},
        "decided": all(decided(q, gap_bound(bounds, s)) for s, q in per_space.items()),
        "seed": p.seed,
        "feature_spaces": {sp.name: sp.sha256 for sp in spaces},
        # the first space's figures at the top level (the bench's FID ratio), every space's under "spaces"
        "quality": {**per_space[primary], "feature_space": primary, **recog, "spaces": per_space},
        "fidelity": {
            "psnr_db": psnr,
            "ssim": ssim,
            "identical_to_reference": psnr is None,
            "fresh_noise": None if identical else fresh_noise(cand.scheduler, candidate.steps),
        },
        "speed": speed,
        "memory": {
            "peak_sampling_mb": mem.peak_mb,
            "reference_peak_sampling_mb": ref_mem.peak_mb if ref_mem is not None else None,
            "sampling_batch": p.sample_batch_size,
            "params": cand_params,
            "reference_params": sum(x.numel() for x in adapter_for(ref).unet.parameters()),
            "checkpoint_mb": folder_size_bytes(candidate.path) / 2**20,
            "reference_checkpoint_mb": folder_size_bytes(reference.path) / 2**20,
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_grid(fake, ref_fake, out_dir / "grid.png")
        result["grid"] = str(out_dir / "grid.png")
    result["wall_time_s"] = time.perf_counter() - t0
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_student(
    student: Path,
    steps: int,
    teacher: Path,
    data: Path,
    features: Path,
    p,
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """The suite on a student folder (its saved scheduler, `steps`) against its teacher at
    `evaluate.reference_steps`, in the `evaluate.features` spaces; `p` is the whole `Params`.

    The one way a cycle, the champion's fit check and `reproduce` evaluate a student, so their figures
    stay comparable.
    """
    from redistill.data.images import load_image_folder
    from redistill.evaluation import spaces as feature_spaces

    classifier = feature_spaces.classifier_for(p.evaluate.features, features)  # recognisability: labelled data only
    data_set = load_image_folder(data)
    clip = feature_spaces.clip_scorer(p.evaluate.features, features) if data_set.captions else None
    return evaluate(
        Side(student, steps, "saved"),
        Side(teacher, p.evaluate.reference_steps),
        data_set,
        feature_spaces.load_all(p.evaluate.features, features),
        p.evaluate,
        classifier=classifier,
        confidence=p.features.confidence,
        out_dir=out_dir,
        cache_dir=cache_dir,
        log=log,
        bounds=p.gate.fid_gap_max,
        clip_score=clip,
    )


def save_grid(
    candidate: torch.Tensor,
    reference: torch.Tensor,
    path: Path,
    per_row: int = 16,
    scale: int = 4,
    max_width: int = 1024,
    max_tile: int = 256,
) -> None:
    """PNG: the candidate's samples (top rows) above the reference's on the same noise (bottom rows).

    A readable size at any resolution: tiles larger than `max_tile` are shrunk (area average), fewer tiles go
    in a row as they grow, and small images are enlarged by up to `scale` (nearest), all within `max_width`."""
    import torch.nn.functional as F
    from PIL import Image

    h, w = candidate.shape[-2:]
    shrink = max(h, w) / max_tile
    if shrink > 1:
        size = (max(1, round(h / shrink)), max(1, round(w / shrink)))
        candidate, reference = (F.interpolate(x.float(), size=size, mode="area") for x in (candidate, reference))
        h, w = size
    per_row = max(1, min(per_row, max_width // w, len(candidate)))
    scale = max(1, min(scale, max_width // (per_row * w)))

    def rows(x: torch.Tensor) -> np.ndarray:
        x = x[: 2 * per_row]
        img = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (N, C, H, W)
        n, c, hh, ww = img.shape
        pad = -n % per_row  # a last row that is not full is padded black
        img = np.concatenate([img, np.zeros((pad, c, hh, ww), np.uint8)]) if pad else img
        return img.reshape(-1, per_row, c, hh, ww).transpose(0, 3, 1, 4, 2).reshape(-1, per_row * ww, c)

    top, bottom = rows(candidate), rows(reference)
    sep = np.full((2, top.shape[1], top.shape[2]), 128, dtype=np.uint8)
    grid = np.concatenate([top, sep, bottom])
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
