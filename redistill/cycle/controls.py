"""The gate's controls: positive and negative controls (blurred images, a dropped class), what each one's FID gap is
in floors per feature space, how far the two kinds lie apart, and the bound that separates them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

POSITIVE, NEGATIVE = "positive", "negative"


@dataclass
class Control:
    """One control: what it is, which group it belongs to, and how its samples are made."""

    name: str
    group: str  # POSITIVE (must pass) or NEGATIVE (must fail)
    what: str  # one line for the table
    draw: Callable[[], torch.Tensor] = field(repr=False)  # images (N, C, H, W) in [0, 1]
    paired: bool = True  # starts from the reference's noise, image i from noise i


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of `sigma` pixels (reflect padding), as a student that lost the teacher's detail."""
    import torch.nn.functional as F

    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out.clamp(0, 1)


def without_classes(images: torch.Tensor, labels: torch.Tensor, dropped: list[int]) -> torch.Tensor:
    """The images whose label is not in `dropped`: a student that never makes those classes (mode dropping)."""
    keep = ~torch.isin(labels, torch.as_tensor(dropped, dtype=labels.dtype))
    return images[keep]


def separation(rows: list[dict], space: str) -> dict:
    """Whether the controls separate in `space`: the largest positive gap (upper CI end), the smallest negative
    gap (lower CI end), in floors, and which controls those are."""
    pos = [(r["spaces"][space]["gap_floors_ci95"][1], r["name"]) for r in rows if r["group"] == POSITIVE]
    neg = [(r["spaces"][space]["gap_floors_ci95"][0], r["name"]) for r in rows if r["group"] == NEGATIVE]
    if not pos or not neg:
        return {"separates": False, "why": "needs at least one positive and one negative control"}
    hi, hi_name = max(pos)
    lo, lo_name = min(neg)
    out = {
        "positive_max": hi,
        "positive_max_control": hi_name,
        "negative_min": lo,
        "negative_min_control": lo_name,
        "separates": hi < lo,
    }
    if not out["separates"]:
        out["why"] = (
            f"the positive control {hi_name} reaches {hi:.3g} floors, above the negative control {lo_name} "
            f"at {lo:.3g}: no bound passes every positive control and fails every negative one"
        )
    return out


def suggest_bound(sep: dict, step: float = 0.05) -> float | None:
    """A bound between the groups: halfway between the two edges (the same margin, in floors, from the highest
    positive control and from the lowest negative one), rounded to `step` and kept strictly inside
    (positive_max, negative_min). None when the space does not separate."""
    if not sep.get("separates"):
        return None
    hi, lo = sep["positive_max"], sep["negative_min"]
    middle = (hi + lo) / 2
    bound = round(middle / step) * step
    if not hi < bound < lo:  # rounding pushed it onto an edge: the unrounded middle is inside by construction
        bound = middle
    return bound


def measure(
    controls: list[Control],
    reference: torch.Tensor,
    real_images,
    spaces: list,
    p_eval,
    log: Callable[[str], None] = lambda m: None,
    classifier=None,
    confidence: float = 0.9,
) -> list[dict]:
    """Each control's FID gap to `reference` (the teacher at the reference steps) in floors, per feature space,
    as `metrics.quality_in_space` measures a student's; with a `classifier`, its recognisable share too (the
    gate's other quality check, which mode dropping does not move: a lost class leaves digits recognisable)."""
    from redistill.evaluation.features import classify
    from redistill.evaluation.suite import quality_in_space

    rows = []
    for c in controls:
        t = time.perf_counter()
        images = c.draw()
        log(f"  {c.group} control {c.name}: {len(images)} samples in {time.perf_counter() - t:.0f} s")
        row = {
            "name": c.name,
            "group": c.group,
            "what": c.what,
            "num_samples": len(images),
            "paired": c.paired and len(images) == len(reference),
            "spaces": {},
            "recognisable_share": classify(classifier, images, confidence)["recognisable_share"]
            if classifier
            else None,
        }
        for sp in spaces:
            q = quality_in_space(sp.extractor, real_images, images, reference, False, p_eval)
            floor = q["fid_floor"]
            lo, hi = q["fid_gap_ci95"]
            row["spaces"][sp.name] = {
                "fid": q["fid"],
                "reference_fid": q["reference_fid"],
                "fid_gap": q["fid_gap"],
                "fid_floor": floor,
                "gap_floors": q["fid_gap_floors"],
                "gap_floors_ci95": [lo / floor, hi / floor],
                "fid_ratio": q.get("fid_ratio"),
            }
        rows.append(row)
    return rows


def summarise(rows: list[dict], spaces: list[str]) -> dict:
    """Per space: the separation and the suggested bound; and how much the spaces disagree (the ratio of each
    control's gap between the spaces)."""
    per_space = {}
    for s in spaces:
        sep = separation(rows, s)
        per_space[s] = {**sep, "suggested_bound": suggest_bound(sep)}
    disagreement = {}
    if len(spaces) > 1:
        a, b = spaces[0], spaces[1]
        for r in rows:
            ga, gb = r["spaces"][a]["gap_floors"], r["spaces"][b]["gap_floors"]
            disagreement[r["name"]] = {"difference_floors": ga - gb}
    return {"spaces": per_space, "disagreement": disagreement}


def table(rows: list[dict], summary: dict, bounds: dict[str, float | None]) -> str:
    """The calibration table in Markdown: each control's gap in floors [95% CI] per space, the edges, the bounds."""
    spaces = list(summary["spaces"])
    recog = any(r.get("recognisable_share") is not None for r in rows)
    head = (
        "| control | group | "
        + " | ".join(f"{s}: gap in floors [95% CI]" for s in spaces)
        + " |"
        + (" recognisable |" if recog else "")
    )
    lines = [head, "|" + "---|" * (2 + len(spaces) + recog)]
    for r in rows:
        cells = []
        for s in spaces:
            q = r["spaces"][s]
            lo, hi = q["gap_floors_ci95"]
            verdict = ""
            b = bounds.get(s)
            if b is not None:
                passes = q["gap_floors"] <= b
                ok = passes == (r["group"] == POSITIVE)
                verdict = f" {'pass' if passes else 'fail'}{'' if ok else ' (WRONG)'}"
            cells.append(f"{q['gap_floors']:+.2f} [{lo:+.2f}, {hi:+.2f}]{verdict}")
        lines.append(
            f"| {r['name']}: {r['what']} | {r['group']} | "
            + " | ".join(cells)
            + " |"
            + (
                f" {r['recognisable_share']:.1%} |"
                if recog and r.get("recognisable_share") is not None
                else " |"
                if recog
                else ""
            )
        )
    edge = []
    for s in spaces:
        sep = summary["spaces"][s]
        if "positive_max" in sep:
            edge.append(
                f"{sep['positive_max']:+.2f} / {sep['negative_min']:+.2f}" + ("" if sep["separates"] else " (overlap)")
            )
        else:
            edge.append("n/a")
    lines.append(
        "| highest positive / lowest negative (CI ends) | | " + " | ".join(edge) + " |" + (" |" if recog else "")
    )
    lines.append(
        "| bound | | "
        + " | ".join("report only" if bounds.get(s) is None else f"{bounds[s]:.2f}" for s in spaces)
        + " |"
        + (" |" if recog else "")
    )
    return "\n".join(lines) + "\n"


def class_labels(images: torch.Tensor, classifier, first_space, k: int, seed: int) -> torch.Tensor:
    """A class per image: the classifier's most likely digit where the workspace has one, else k-means clusters
    (k) of the first feature space, so label-free data gets a mode-dropping control too."""
    if classifier is not None:
        import torch.nn.functional as F

        with torch.no_grad():
            probs = torch.cat(
                [F.softmax(classifier(images[i : i + 1000].float()), 1) for i in range(0, len(images), 1000)]
            )
        return probs[:, :-1].argmax(1)  # the last class is "not a digit"
    from sklearn.cluster import KMeans

    with torch.no_grad():
        f = torch.cat([first_space.extractor(images[i : i + 1000].float()) for i in range(0, len(images), 1000)])
    return torch.as_tensor(KMeans(k, n_init=3, random_state=seed).fit_predict(f.double().numpy()))
