"""A label-free image encoder for FID/KID on any data: SimCLR (Chen et al. 2020, "A Simple Framework
for Contrastive Learning of Visual Representations", arXiv:2002.05709), trained on the reference set.

The project's digit classifier needs labels and knows only digits; a user's own data has neither. This
encoder learns from the images alone:
1. Two random views of each image: a small rotation, scaling and shift, an intensity jitter and a little
   pixel noise. The views of one image are positives; every other image in the batch is a negative.
2. A small CNN (GroupNorm and SiLU, so no unit is dead) maps a view to a `dim`-d representation, and an
   MLP projection head maps that to the space of the contrastive (NT-Xent) loss, at temperature `tau`.
3. After training, the representation (before the head) is the feature space. It is standardised per
   unit on the reference, so every unit weighs the same in a Fréchet distance and KID's cubic kernel
   sees features of unit scale.

Because the views differ by pixel noise and intensity, the space is more tolerant of faint speckle than
the classifier's, whose "not a digit" class was trained on noisy images: the two spaces judge different
failures, which is why the gate measures both (README, "The gate").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "encoder.json"


class Encoder(nn.Module):
    """conv-conv(stride 2)-conv → 2×2 average pool → linear `dim` (the representation), plus the SimCLR head."""

    def __init__(self, channels: int = 1, dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.GroupNorm(8, 128),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(512, dim),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 64))
        self.channels, self.dim = channels, dim
        # per-unit standardisation on the reference, fixed after training
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised representation of images in [0, 1], shape (N, C, H, W)."""
        return (self.representation(x) - self.mean) / self.std


class EncoderFeatures(nn.Module):
    """The encoder as a torchmetrics-style feature module (images in [0, 1])."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder.eval()
        self.num_features = encoder.dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x.float())


def views(
    x: torch.Tensor,
    gen: torch.Generator,
    rotation_deg: float = 12.0,
    scale: float = 0.1,
    shift_px: float = 1.0,
    noise: float = 0.05,
) -> torch.Tensor:
    """Step 1: one random view of each image in [0, 1] (rotation, scale, shift, intensity, noise)."""
    n, _, h, w = x.shape
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rotation_deg)
    sc = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * torch.tensor([2 * shift_px / w, 2 * shift_px / h])
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    y = y * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)) + noise * torch.randn(y.shape, generator=gen)
    return y.clamp(0.0, 1.0)


def nt_xent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss for 2n projections where rows i and i+n are two views of one image."""
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / tau
    sim = sim - torch.eye(len(z), device=z.device) * 1e9  # an image is not its own positive
    n = len(z) // 2
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def train_encoder(
    images: np.ndarray,
    epochs: int = 150,
    dim: int = 128,
    batch_size: int = 256,
    lr: float = 2e-3,
    tau: float = 0.2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Encoder, dict]:
    """Steps 1–3 on images (N, C, H, W) in [0, 1]; returns the encoder and its training figures."""
    if len(images) < 16:
        raise ValueError(f"the encoder needs at least 16 reference images, got {len(images)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).float()
    model = Encoder(x.shape[1], dim)
    batch = min(batch_size, len(x))
    per_epoch = len(x) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            b = x[perm[i * batch : (i + 1) * batch]]
            z = model.head(model.representation(torch.cat([views(b, gen), views(b, gen)])))
            loss = nt_xent(z, tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 25 == 0 or epoch + 1 == epochs:
            log(f"encoder epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        f = model.representation(x)
        model.mean.copy_(f.mean(0))
        model.std.copy_(f.std(0).clamp(min=1e-6))
    return model, {
        "final_loss": loss.item(),
        "epochs": epochs,
        "dim": dim,
        "train_s": round(time.perf_counter() - t0, 1),
        "num_train": len(x),
    }


def save_encoder(model: Encoder, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"channels": model.channels, "dim": model.dim, **meta}, indent=2) + "\n")


def load_encoder(folder: Path) -> Encoder:
    """Load the encoder the features stage wrote (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no feature encoder in {folder}; run `redistill features` (or `dvc repro features`) first"
        )
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    model = Encoder(cfg["channels"], cfg["dim"])
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.eval()


def train_feature_spaces(root: Path, p, log=print) -> dict:
    """Train and save a workspace's feature spaces (the `features` stage): the digit classifier, tested on
    data/holdout, and the label-free encoder, both in data/features; returns their metrics."""
    from redistill.data.images import load_image_folder
    from redistill.evaluation.features import save_classifier, train_classifier

    reference = load_image_folder(root / "data" / "reference")
    model, metrics = train_classifier(p.features, reference, load_image_folder(root / "data" / "holdout"), log=log)
    save_classifier(model, root / "data" / "features", {"params": vars(p.features), "metrics": metrics})
    encoder, enc_metrics = train_encoder(
        reference.images, epochs=p.features.encoder_epochs, dim=p.features.encoder_dim, seed=p.features.seed, log=log
    )
    save_encoder(encoder, root / "data" / "features", {"params": vars(p.features), "metrics": enc_metrics})
    return {**metrics, "encoder": enc_metrics}
