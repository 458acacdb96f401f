"""Tier 2: the evaluation suite on tiny, locally built diffusers pipelines and the real digits data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from redistill.config import load_params
from redistill.data.images import load_image_folder
from redistill.evaluation.features import FeatureExtractor, load_classifier
from redistill.evaluation.sampling import sample
from redistill.evaluation.suite import Side, evaluate
from redistill.models.pipelines import PipelineError, load_pipeline


@pytest.fixture(scope="module")
def suite(digits_ws):
    p = load_params(digits_ws / "params.yaml")
    clf = load_classifier(digits_ws / "data" / "features")
    data = load_image_folder(digits_ws / "data" / "reference")
    return p, clf, data


def run(suite, cand, ref, out=None):
    p, clf, data = suite
    return evaluate(cand, ref, data, FeatureExtractor(clf), p.evaluate, classifier=clf, out_dir=out)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_suite_reports_every_figure(suite, tiny_pipeline, tmp_path):
    r = run(suite, Side(tiny_pipeline, 2), Side(tiny_pipeline, 8), tmp_path / "run")
    q, f, s, m = r["quality"], r["fidelity"], r["speed"], r["memory"]
    assert r["steps"] == 2 and r["reference"]["steps"] == 8
    assert r["scheduler"] == "DDIMScheduler"  # a DDPM pipeline asked for 2 of its 1,000 steps samples with DDIM
    assert f["fresh_noise"] is None  # DDIM (eta 0): the samples are a function of the initial noise
    assert r["num_samples"] == suite[0].evaluate.num_samples
    for key in ("fid", "kid", "reference_fid", "recognisable_share", "fid_ratio"):
        assert finite(q[key]), key
    assert q["fid_ci95"][0] < q["fid_ci95"][1] and q["kid_ci95"][0] < q["kid_ci95"][1]
    assert q["fid"] > 0  # an untrained pipeline is far from the digits
    assert finite(f["psnr_db"]) and 0 < f["ssim"] < 1 and not f["identical_to_reference"]
    for key in ("latency_ms_p50", "latency_ms_p95", "throughput_img_s", "speedup_latency", "speedup_throughput"):
        assert finite(s[key]) and s[key] > 0, key
    assert s["latency_ms_p95"] >= s["latency_ms_p50"]
    assert m["params"] == sum(x.numel() for x in load_pipeline(tiny_pipeline).unet.parameters())
    assert m["checkpoint_mb"] > 0 and m["peak_sampling_mb"] >= 0
    # one JSON object, written to the run folder, with the grid next to it
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["quality"]["fid"] == q["fid"]
    grid = Image.open(r["grid"])
    assert grid.size == (16 * 8 * 4, (4 * 8 + 2) * 4)  # 2 rows candidate, separator, 2 rows reference


def test_fewer_steps_are_faster_when_timed_interleaved(suite, tiny_pipeline):
    # 1 step against 16: the candidate's side of the timing must really be the cheaper one
    r = run(suite, Side(tiny_pipeline, 1), Side(tiny_pipeline, 16))
    assert r["speed"]["speedup_throughput"] > 1.5
    assert r["speed"]["speedup_latency"] > 1.5


def test_a_pipeline_against_itself_is_identical(suite, tiny_pipeline):
    r = run(suite, Side(tiny_pipeline, 3), Side(tiny_pipeline, 3))
    assert r["fidelity"]["identical_to_reference"] and r["fidelity"]["psnr_db"] is None
    assert r["fidelity"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert r["quality"]["fid_ratio"] == pytest.approx(1.0)


def test_candidate_and_reference_share_initial_noise(tiny_pipeline, tmp_path):
    from helpers import make_tiny_pipeline

    a = load_pipeline(tiny_pipeline)
    b = load_pipeline(make_tiny_pipeline(tmp_path / "other", seed=1))
    for pipe in (a, b):
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    # same seeds → same draws; with 1 DDIM step from t=999 the outputs differ only through the UNets,
    # so the same pipeline twice is bitwise equal and a different one is not
    x1, x2 = sample(a, 10, 1, seed=5, batch=4), sample(a, 10, 1, seed=5, batch=4)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, sample(b, 10, 1, seed=5, batch=4))
    assert not torch.equal(x1, sample(a, 10, 1, seed=6, batch=4))


def test_pipeline_that_does_not_fit_the_data_is_refused(suite, tmp_path):
    from helpers import make_tiny_pipeline

    rgb = make_tiny_pipeline(tmp_path / "rgb", channels=3)
    with pytest.raises(PipelineError, match="has 3 input channels but .* has 1"):
        run(suite, Side(rgb, 2), Side(rgb, 2))
    big = make_tiny_pipeline(tmp_path / "big", size=16)
    with pytest.raises(PipelineError, match="makes 16×16 images but .* is 8×8"):
        run(suite, Side(big, 2), Side(big, 2))


def test_reference_samples_are_cached_by_content(suite, tiny_pipeline, tmp_path):
    import shutil

    from helpers import make_tiny_pipeline

    p, clf, data = suite
    cache = tmp_path / "cache"

    def go(ref):
        return evaluate(
            Side(tiny_pipeline, 1),
            Side(ref, 4),
            data,
            FeatureExtractor(clf),
            p.evaluate,
            classifier=clf,
            cache_dir=cache,
        )

    batches = -(-p.evaluate.num_samples // p.evaluate.sample_batch_size)  # one cache file per generation batch
    ref = tmp_path / "ref"
    shutil.copytree(tiny_pipeline, ref)
    first = go(ref)
    assert len(list(cache.glob("*.safetensors"))) == batches
    second = go(ref)  # same bytes, same draw: the cached samples give the same figures
    assert (
        second["fidelity"] == first["fidelity"]
        and second["quality"]["reference_fid"] == first["quality"]["reference_fid"]
    )
    assert len(list(cache.glob("*.safetensors"))) == batches
    shutil.rmtree(ref)
    make_tiny_pipeline(ref, seed=7)  # new weights under the same path: sampled afresh
    third = go(ref)
    assert len(list(cache.glob("*.safetensors"))) == 2 * batches
    assert third["quality"]["reference_fid"] != first["quality"]["reference_fid"]


def test_a_reference_evaluated_as_candidate_fills_the_cache(suite, tiny_pipeline, tmp_path):
    p, clf, data = suite
    cache = tmp_path / "cache"
    first = evaluate(
        Side(tiny_pipeline, 4),
        Side(tiny_pipeline, 4),
        data,
        FeatureExtractor(clf),
        p.evaluate,
        classifier=clf,
        cache_dir=cache,
    )
    assert len(list(cache.glob("*.safetensors"))) == -(-p.evaluate.num_samples // p.evaluate.sample_batch_size)
    later = evaluate(
        Side(tiny_pipeline, 1),
        Side(tiny_pipeline, 4),
        data,
        FeatureExtractor(clf),
        p.evaluate,
        classifier=clf,
        cache_dir=cache,
    )
    assert later["quality"]["reference_fid"] == first["quality"]["fid"]
    assert later["memory"]["reference_peak_sampling_mb"] is None  # reused, so not re-measured


def test_every_feature_space_reports_a_floor_aware_gap(suite, tiny_pipeline, digits_ws):
    import hashlib

    from redistill.evaluation import spaces as feature_spaces

    p, clf, data = suite
    spaces = feature_spaces.load_all(["classifier", "encoder"], digits_ws / "data" / "features")
    r = evaluate(Side(tiny_pipeline, 2), Side(tiny_pipeline, 8), data, spaces, p.evaluate, classifier=clf)
    q = r["quality"]
    assert q["feature_space"] == "classifier" and list(q["spaces"]) == ["classifier", "encoder"]
    assert q["fid"] == q["spaces"]["classifier"]["fid"]  # the first space's figures head the report
    for name, sq in q["spaces"].items():
        weights = (digits_ws / "data" / "features" / f"{name}.safetensors").read_bytes()
        assert r["feature_spaces"][name] == hashlib.sha256(weights).hexdigest()
        assert sq["fid_floor"] > 0 and sq["fid_gap"] == pytest.approx(sq["fid"] - sq["reference_fid"])
        assert sq["fid_gap_floors"] == pytest.approx(sq["fid_gap"] / sq["fid_floor"])
        lo, hi = sq["fid_gap_ci95"]
        assert lo <= sq["fid_gap"] <= hi and sq["fid_gap_halfwidth"] == pytest.approx((hi - lo) / 2)
    assert q["spaces"]["encoder"]["dead_features"] == 0


def test_the_sample_grows_until_the_gap_is_clear_of_the_gates_bound(suite, tiny_pipeline, tmp_path):
    # a bound far from the gap stops at evaluate.num_samples; a bound inside the gap's interval grows the sample to
    # evaluate.max_samples and says the verdict is not decided. The reference batches drawn first are cached and
    # reused by the larger sample.
    p, clf, data = suite
    loose = evaluate(
        Side(tiny_pipeline, 2),
        Side(tiny_pipeline, 8),
        data,
        FeatureExtractor(clf),
        p.evaluate,
        classifier=clf,
        cache_dir=tmp_path / "cache",
        bounds=1e9,
    )
    assert loose["num_samples"] == p.evaluate.num_samples and loose["decided"]
    cached = len(list((tmp_path / "cache").glob("*.safetensors")))
    q = loose["quality"]["spaces"]["features"]
    inside = q["fid_gap_floors"]  # the point estimate itself: inside the interval at any sample size
    tight = evaluate(
        Side(tiny_pipeline, 2),
        Side(tiny_pipeline, 8),
        data,
        FeatureExtractor(clf),
        p.evaluate,
        classifier=clf,
        cache_dir=tmp_path / "cache",
        bounds={"default": 1e9, "features": inside},
    )
    assert tight["num_samples"] == p.evaluate.max_samples > p.evaluate.num_samples and not tight["decided"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2 * cached  # only the new batches were added
    assert tight["memory"]["reference_peak_sampling_mb"] is None  # the first reference batches came from the cache
