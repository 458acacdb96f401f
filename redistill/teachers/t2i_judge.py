"""How well the text-to-image teacher follows its prompts: the digits classifier's share of samples of the prompt's
class (adherence) and of recognisable digits, per guidance scale, and the figures' summary line."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def summary_line(r: dict) -> str:
    return (
        f"adherence {r['adherence']:.3f} recognisable {r['recognisable']:.3f} "
        f"adherent+recognisable {r['adherent_recognisable']:.3f}"
    )


@torch.no_grad()
def prompt_adherence(
    pipe,
    classifier,
    guidance_scale: float,
    steps: int,
    num_samples: int = 500,
    seed: int = 0,
    confidence: float = 0.9,
    batch: int = 250,
) -> dict:
    """Sample `num_samples` images for the prompts of each class (evenly over classes and templates; a
    class-conditional pipeline such as DiT's: for each class label) with `pipe`'s adapter, downsample
    them to 8×8 (area), and classify them with the digits classifier. Returns the share whose class is the
    prompt's (`adherence`), the share recognisable (a digit class at probability ≥ `confidence`), the share
    both, and the adherence per class."""
    from redistill.data.captions import TEMPLATES, class_prompt
    from redistill.evaluation.features import NOT_A_DIGIT, recognisable
    from redistill.models import adapter_for
    from redistill.models.text_to_image import TextToImageLatent

    model = adapter_for(pipe)
    model.guidance_scale = float(guidance_scale)
    labels = torch.arange(num_samples) % 10
    prompts = [class_prompt(TEMPLATES[(i // 10) % len(TEMPLATES)], int(y)) for i, y in enumerate(labels)]
    if not isinstance(model, TextToImageLatent):  # class labels, not prompts
        prompts = labels
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat(
        [
            model.sample(len(chunk), steps, gen, cond=chunk, guidance_scale=guidance_scale)
            for chunk in (prompts[i : i + batch] for i in range(0, num_samples, batch))
        ]
    )
    small = F.interpolate(images, size=(8, 8), mode="area")
    probs = F.softmax(classifier(small), dim=1)
    pred = probs[:, :NOT_A_DIGIT].argmax(1)
    hit, ok = pred == labels, recognisable(probs, confidence)
    return {
        "guidance_scale": guidance_scale,
        "steps": steps,
        "num_samples": num_samples,
        "adherence": float(hit.float().mean()),
        "recognisable": float(ok.float().mean()),
        "adherent_recognisable": float((hit & ok).float().mean()),
        "adherence_per_class": [round(float(hit[labels == c].float().mean()), 3) for c in range(10)],
    }


def choose_guidance(pipe, classifier, p, confidence: float, log) -> tuple[float, dict[str, dict]]:
    """The guidance w a trained teacher is sampled at: each w of `p.guidance_sweep` measured with the digits
    classifier (`prompt_adherence`) and the best adherent-and-recognisable share chosen (the lower w on a tie);
    `p.guidance_scale` unmeasured where there is no classifier or no sweep. Returns (w, the measurements)."""
    sweep: dict[str, dict] = {}
    if classifier is None or not p.guidance_sweep:
        return p.guidance_scale, sweep
    for scale_w in p.guidance_sweep:
        sweep[str(scale_w)] = prompt_adherence(
            pipe, classifier, scale_w, p.eval_steps, p.eval_samples, p.seed, confidence
        )
        log(f"w {scale_w}: {summary_line(sweep[str(scale_w)])}")
    w = max(p.guidance_sweep, key=lambda s: (sweep[str(s)]["adherent_recognisable"], -s))
    log(f"guidance_scale {w} (best adherent-and-recognisable share at {p.eval_steps} steps)")
    return w, sweep
