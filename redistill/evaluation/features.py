"""The `features` stage: a small digit classifier whose penultimate layer is the FID/KID feature space.

Inception weights cannot be downloaded here, so FID and KID use features of a classifier trained on the
reference data itself (users with a local Inception weights file pass it instead: `InceptionFeatures`).
The classifier has an 11th class, "not a digit", trained on noise, shuffled pixels, two-digit blends and
heavily noised digits. A sample counts as recognisable only when one of the ten digit classes gets
probability ≥ `confidence`. Without that class a classifier is confident on noise and blends, and the
teacher's recognisability figure would be inflated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redistill.config import FeaturesParams
from redistill.data.images import ImageSet

NOT_A_DIGIT = 10
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


class DigitClassifier(nn.Module):
    """conv-conv-pool-conv → `feature_dim` (penultimate, the feature space) → 11 logits."""

    def __init__(self, channels: int = 1, feature_dim: int = 64, num_classes: int = 11):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # any input size ≥ 8 maps to 4×4
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.channels = channels
        self.feature_dim = feature_dim
        # Fixed after training so the reference features have mean ‖f‖²/d = 1: KID's cubic kernel
        # (x·y/d + 1)³ is made for that scale, and on raw activations (‖f‖²/d ≈ 15) it is all noise.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations for images in [0, 1], shape (N, C, H, W), in the fixed scale."""
        return self.body(x * 2.0 - 1.0) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x * 2.0 - 1.0))


class FeatureExtractor(nn.Module):
    """The classifier's penultimate layer as a torchmetrics feature module (images in [0, 1])."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


def not_a_digit_examples(digits: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` images that are not digits: noise, shuffled digit pixels, two-digit blends, heavily noised digits."""
    shape = digits.shape[1:]
    kinds = torch.randint(0, 5, (n,), generator=gen)
    out = torch.empty((n, *shape))
    a = digits[torch.randint(0, len(digits), (n,), generator=gen)]
    b = digits[torch.randint(0, len(digits), (n,), generator=gen)]
    for i in range(n):
        k = int(kinds[i])
        if k == 0:  # Gaussian noise around a random grey level
            out[i] = (
                torch.rand(1, generator=gen) * 0.6
                + torch.randn(shape, generator=gen) * torch.rand(1, generator=gen) * 0.5
            )
        elif k == 1:  # uniform noise, sparse like ink
            out[i] = torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.35)
        elif k == 2:  # a digit's own pixels in random places: right intensities, no shape
            flat = a[i].flatten()
            out[i] = flat[torch.randperm(flat.numel(), generator=gen)].view(shape)
        elif k == 3:  # two digits blended: each stroke half-visible
            w = 0.35 + 0.3 * torch.rand(1, generator=gen)
            out[i] = w * a[i] + (1 - w) * b[i]
        else:  # a digit drowned in noise
            out[i] = a[i] + torch.randn(shape, generator=gen) * (0.35 + 0.4 * torch.rand(1, generator=gen))
    return out.clamp(0.0, 1.0)


def train_classifier(p: FeaturesParams, train: ImageSet, test: ImageSet, log=print) -> tuple[DigitClassifier, dict]:
    """Train on `train` (labels 0..9) plus generated not-a-digit examples; evaluate on `test`."""
    if train.labels is None or test.labels is None:
        raise ValueError("the features stage needs labels.csv in the reference and holdout folders")
    torch.manual_seed(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    x = torch.from_numpy(train.images)
    y = torch.from_numpy(train.labels)
    model = DigitClassifier(train.channels, p.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=p.lr, total_steps=p.epochs * (int(len(x) * (1 + p.not_digit_ratio)) // p.batch_size + 1)
    )
    n_neg = int(len(x) * p.not_digit_ratio)
    for epoch in range(p.epochs):
        model.train()
        # fresh negatives every epoch, so the classifier cannot memorise a fixed set of them
        xe = torch.cat([x, not_a_digit_examples(x, n_neg, gen)])
        ye = torch.cat([y, torch.full((n_neg,), NOT_A_DIGIT)])
        perm = torch.randperm(len(xe), generator=gen)
        for i in range(0, len(xe), p.batch_size):
            idx = perm[i : i + p.batch_size]
            loss = F.cross_entropy(model(xe[idx]), ye[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
        if (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{p.epochs} loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        f = model.body(x * 2.0 - 1.0)
        model.feature_scale.fill_(float((f.pow(2).sum(1) / f.shape[1]).mean().sqrt()))

    # Held-out figures: digit accuracy, and how often fresh not-a-digit examples are flagged as such.
    xt = torch.from_numpy(test.images)
    with torch.no_grad():
        probs = F.softmax(model(xt), dim=1)
        neg = not_a_digit_examples(xt, len(xt), torch.Generator().manual_seed(p.seed + 1))
        neg_probs = F.softmax(model(neg), dim=1)
    pred = probs.argmax(1).numpy()
    metrics = {
        "heldout_accuracy": float((pred == test.labels).mean()),
        "heldout_recognisable": float(recognisable(probs, p.confidence).float().mean()),
        "not_digit_rejected": float((~recognisable(neg_probs, p.confidence)).float().mean()),
        "num_train": len(train),
        "num_test": len(test),
        "confidence": p.confidence,
    }
    return model, metrics


def recognisable(probs: torch.Tensor, confidence: float) -> torch.Tensor:
    """True where a digit class (not 'not a digit') has probability ≥ confidence."""
    digit_probs = probs[:, :NOT_A_DIGIT]
    return (digit_probs.max(dim=1).values >= confidence) & (probs.argmax(dim=1) != NOT_A_DIGIT)


def save_classifier(model: DigitClassifier, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(
        json.dumps({"channels": model.channels, "feature_dim": model.feature_dim, **meta}, indent=2) + "\n"
    )


def load_classifier(folder: Path) -> DigitClassifier:
    """Load the classifier written by the features stage (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no feature classifier in {folder}; run `redistill features` (or `dvc repro features`) first"
        )
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    model = DigitClassifier(cfg["channels"], cfg["feature_dim"])
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, confidence: float, batch: int = 1000) -> dict:
    """Recognisability of generated images: share recognisable, and the class histogram of those."""
    probs = torch.cat([F.softmax(model(images[i : i + batch].float()), dim=1) for i in range(0, len(images), batch)])
    ok = recognisable(probs, confidence)
    classes = probs[:, :NOT_A_DIGIT].argmax(1)[ok]
    counts = np.bincount(classes.numpy(), minlength=NOT_A_DIGIT)
    return {
        "recognisable_share": float(ok.float().mean()),
        "class_counts": counts.tolist(),
        "all_classes_present": bool((counts > 0).all()),
        "not_a_digit_share": float((probs.argmax(1) == NOT_A_DIGIT).float().mean()),
    }


@torch.no_grad()
def adherence(model: DigitClassifier, images: torch.Tensor, prompted: torch.Tensor, batch: int = 1000) -> dict:
    """Prompt adherence with the data's own classifier: the share of images whose most likely digit class is
    the class their prompt asked for (and that the classifier does not call "not a digit"), overall and per class."""
    probs = torch.cat([F.softmax(model(images[i : i + batch].float()), dim=1) for i in range(0, len(images), batch)])
    hit = (probs[:, :NOT_A_DIGIT].argmax(1) == prompted.cpu()) & (probs.argmax(1) != NOT_A_DIGIT)
    per_class = {int(k): float(hit[prompted == k].float().mean()) for k in prompted.unique().tolist()}
    return {"prompt_adherence": float(hit.float().mean()), "prompt_adherence_per_class": per_class}


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (torch-fidelity) from a local `.safetensors` weights file.

    For users with real Inception weights. Only safetensors are accepted: a pickle is never loaded.
    Grey images are repeated to 3 channels and passed as uint8, as the FID Inception expects.
    """

    def __init__(self, weights: Path):
        super().__init__()
        from safetensors.torch import load_file

        weights = Path(weights)
        if weights.suffix != ".safetensors":
            raise ValueError(
                f"{weights} is not a .safetensors file; redistill never unpickles weights. Convert it once "
                "in a trusted environment with safetensors.torch.save_file(torch.load(f), 'inception.safetensors')"
            )
        if not weights.is_file():
            raise ValueError(f"Inception weights file {weights} does not exist")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ValueError("Inception features need torch-fidelity: pip install 'redistill[inception]'") from e
        state = load_file(weights)
        with tempfile.TemporaryDirectory() as tmp:
            # torch-fidelity reads a torch.save file; this one is written here from the safetensors tensors
            path = Path(tmp) / "inception.pth"
            torch.save(state, path)
            try:
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
                )
            except ModuleNotFoundError as e:
                raise ValueError("Inception features need torch-fidelity: pip install 'redistill[inception]'") from e
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net((x.clamp(0, 1) * 255).to(torch.uint8))
