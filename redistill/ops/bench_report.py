"""The bench's report: its tables (Markdown), the goals it is judged by, the quality-against-steps plot, and its
MLflow run."""

from __future__ import annotations

from pathlib import Path

# the goals for the best student at each step count: (FID ratio to teacher@50 at most,
# recognisable share at least); every row also needs ≥ 0.8 × the step ratio in throughput speedup
GOALS = {4: (1.2, 0.90), 2: (1.5, None), 1: (2.0, 0.85)}


SPEEDUP_SHARE = 0.8


def markdown_table(result: dict) -> str:
    """The bench as a Markdown table, one row per (pipeline, steps)."""
    spaces = result.get("feature_spaces") or []
    head = (
        "| pipeline | steps | FID [95% CI] | FID ÷ teacher@{r} | FID gap in floors ({sp}) | KID | recognisable "
        "| prompt adherence | PSNR dB "
        "| SSIM | latency p50 ms (b=1) | img/s (b={b}) | speedup | params | peak MB | distil s |"
    )
    lines = [
        head.format(r=result["reference_steps"], b="64" if not result["quick"] else "16", sp=" / ".join(spaces)),
        "|" + "---|" * 16,
    ]

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in result["rows"]:
        lo, hi = r["fid_ci95"]
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['fid']:.3f} [{lo:.3f}, {hi:.3f}] | {num(r['fid_ratio'], '.2f')}× "
            f"| {' / '.join(num((r.get('fid_gap_floors') or {}).get(n), '.2f') for n in spaces)} "
            f"| {r['kid']:.4f} | {num(r['recognisable_share'], '.3f')} | {num(r.get('prompt_adherence'), '.3f')} "
            f"| {num(r['psnr_db'], '.2f')} | {r['ssim']:.3f} "
            f"| {r['latency_ms_p50']:.1f} | {r['throughput_img_s']:.0f} | ×{r['speedup']:.1f} | {r['params']:,} "
            f"| {num(r['peak_mb'], '.0f')} | {num(r['distill_wall_s'], '.0f')} |"
        )
    return "\n".join(lines)


def straightness_table(result: dict) -> str:
    """The straightness of the teacher's and the reflowed flow's paths, per rectified student (empty without one)."""
    rows = [r for r in result["rows"] if r.get("straightness")]
    if not rows:
        return ""
    lines = [
        "",
        "| rectified student | straightness of the teacher's paths | of the reflowed flow's paths |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} steps | {r['straightness']['teacher']:.4f} | {r['straightness']['reflowed']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def goals(result: dict) -> list[dict]:
    """The best student at each goal's step count against issue 11's goals, and every row's speedup goal."""
    ref = result["reference_steps"]
    out = []
    students = [r for r in result["rows"] if r["kind"] == "method" and r["fid_ratio"] is not None]
    for steps, (ratio_max, recog_min) in sorted(GOALS.items(), reverse=True):
        at = [r for r in students if r["steps"] == steps]
        if not at:
            continue
        best = min(at, key=lambda r: r["fid_ratio"])
        speedup_min = SPEEDUP_SHARE * ref / steps
        met = best["fid_ratio"] <= ratio_max and (recog_min is None or (best["recognisable_share"] or 0) >= recog_min)
        out.append(
            {
                "steps": steps,
                "best": best["method"],
                "fid_ratio": best["fid_ratio"],
                "fid_ratio_max": ratio_max,
                "recognisable_share": best["recognisable_share"],
                "recognisable_min": recog_min,
                "speedup": best["speedup"],
                "speedup_min": speedup_min,
                "met": bool(met and best["speedup"] >= speedup_min),
                "rows_below_speedup": [r["method"] for r in at if r["speedup"] < speedup_min],
            }
        )
    return out


def goals_table(result: dict) -> str:
    """The goals as Markdown: the best student per step count, and whether it meets them."""
    lines = [
        "| steps | best student | FID ratio (goal) | recognisable (goal) | speedup (goal ≥ 0.8 × step ratio) | met |",
        "|---|---|---|---|---|---|",
    ]
    for g in goals(result):
        recog = "–" if g["recognisable_share"] is None else f"{g['recognisable_share']:.3f}"
        recog_goal = "" if g["recognisable_min"] is None else f" (≥ {g['recognisable_min']:.2f})"
        slow = f"; below the speedup goal: {', '.join(g['rows_below_speedup'])}" if g["rows_below_speedup"] else ""
        lines.append(
            f"| {g['steps']} | {g['best']} | {g['fid_ratio']:.2f}× (≤ {g['fid_ratio_max']}×) | {recog}{recog_goal} "
            f"| ×{g['speedup']:.1f} (≥ ×{g['speedup_min']:.0f}) | {'yes' if g['met'] else 'NO'}{slow} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """FID against the number of network evaluations: the teacher's DDIM curve and one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in result["rows"]:
        series.setdefault(r["method"], []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["steps"])
        x = [r["steps"] for r in rs]
        y = [r["fid"] for r in rs]
        err = [[r["fid"] - r["fid_ci95"][0] for r in rs], [r["fid_ci95"][1] - r["fid"] for r in rs]]
        style = "k-o" if name.startswith("teacher") else "-s"
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (sampling steps)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title("quality against steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_bench(root: Path, result: dict, out: Path) -> str:
    """Log the bench's figures, its students and its three files to MLflow (experiment `redistill-bench`); returns
    the run id."""
    from redistill.registry.client import client, tracking_uri

    c = client(tracking_uri(root))
    exp = c.get_experiment_by_name("redistill-bench")
    exp_id = exp.experiment_id if exp else c.create_experiment("redistill-bench")
    run = c.create_run(exp_id, tags={"redistill.bench": "quick" if result["quick"] else "full"})
    rid = run.info.run_id
    for k in ("quick", "num_samples", "reference_steps", "seed", "device", "threads"):
        c.log_param(rid, k, result[k])
    c.log_param(rid, "methods", ",".join(result["methods"]))
    for r in result["rows"]:
        name = ("teacher_" + r["sampler"] if r["kind"] == "teacher" else r["method"]) + f"_{r['steps']}"
        for m in (
            "fid",
            "fid_ratio",
            "kid",
            "recognisable_share",
            "psnr_db",
            "ssim",
            "latency_ms_p50",
            "throughput_img_s",
            "speedup",
            "peak_mb",
            "distill_wall_s",
        ):
            if r[m] is not None:
                c.log_metric(rid, f"{name}.{m}", float(r[m]))
        for space, gap in (r.get("fid_gap_floors") or {}).items():
            if gap is not None:
                c.log_metric(rid, f"{name}.fid_gap_floors.{space}", float(gap))
        if r.get("student"):  # the row's student, so it can be judged again or served later
            c.log_artifacts(rid, r["student"], f"students/{Path(r['student']).name}")
    for f in ("bench.json", "bench.md", "quality_vs_nfe.png"):
        c.log_artifact(rid, str(out / f))
    c.set_terminated(rid)
    return rid
