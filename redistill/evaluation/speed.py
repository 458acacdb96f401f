"""Speed and memory of a pipeline: peak memory while sampling, and batch-1 latency and batch throughput of a
candidate and its reference, timed interleaved in one process."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from redistill.config import EvaluateParams


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above the start while the block runs: CUDA allocator stats, else RSS polled every 1 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = (peak - self._base) / 2**20
        return False


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure_speed(cand, cand_steps: int, ref, ref_steps: int, p: EvaluateParams, warmup: int = 2) -> dict:
    """Latency at batch 1 and throughput at batch `p.throughput_batch`, candidate and reference interleaved."""
    dev = cand.device

    from redistill.models import adapter_for

    def run(pipe, steps, b, seed):
        g = torch.Generator(device=pipe.device).manual_seed(seed)
        model = adapter_for(pipe)
        return lambda: model.sample(b, steps, g)

    lat_c, lat_r, thr_c, thr_r = [], [], [], []
    for i in range(warmup + p.latency_repeats):
        tc = _timed(run(cand, cand_steps, 1, i), dev)
        tr = _timed(run(ref, ref_steps, 1, i), dev)
        if i >= warmup:
            lat_c.append(tc)
            lat_r.append(tr)
    for i in range(1 + p.throughput_repeats):
        tc = _timed(run(cand, cand_steps, p.throughput_batch, i), dev)
        tr = _timed(run(ref, ref_steps, p.throughput_batch, i), dev)
        if i >= 1:
            thr_c.append(tc)
            thr_r.append(tr)
    b = p.throughput_batch
    c50, r50 = np.median(lat_c), np.median(lat_r)
    return {
        "latency_ms_p50": 1000 * float(c50),
        "latency_ms_p95": 1000 * float(np.percentile(lat_c, 95)),
        "throughput_img_s": float(b / np.median(thr_c)),
        "reference_latency_ms_p50": 1000 * float(r50),
        "reference_latency_ms_p95": 1000 * float(np.percentile(lat_r, 95)),
        "reference_throughput_img_s": float(b / np.median(thr_r)),
        "speedup_latency": float(r50 / c50),
        "speedup_throughput": float(np.median(thr_r) / np.median(thr_c)),
        "throughput_batch": b,
        "latency_repeats": p.latency_repeats,
        "throughput_repeats": p.throughput_repeats,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        **_latent_costs(cand, ref, dev, p.latency_repeats),
    }


def _latent_costs(cand, ref, dev, repeats: int) -> dict:
    """For text-to-image pipelines: UNet passes per step (2 under classifier-free guidance: the doubled batch
    the teacher pays and a distilled student does not) and the VAE decode's latency at batch 1, which the
    latencies above include."""
    from redistill.models import adapter_for

    mc, mr = adapter_for(cand), adapter_for(ref)
    if not hasattr(mc, "decode"):
        return {}
    z = torch.randn((1, mc.channels, *mc.sample_size), generator=torch.Generator().manual_seed(0)).to(dev)
    mc.decode(z)  # warm-up
    decode = sorted(_timed(lambda: mc.decode(z), dev) for _ in range(max(1, repeats)))
    return {
        "unet_passes_per_step": mc.unet_passes_per_step(),
        "reference_unet_passes_per_step": mr.unet_passes_per_step(),
        "vae_decode_ms_p50": 1000 * float(np.median(decode)),
        "vae_decode_included": True,
    }
