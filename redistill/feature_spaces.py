"""The feature spaces FID and KID are measured in, by name (`evaluate.features`).

- `classifier`: the penultimate layer of the workspace's digit classifier (redistill/features.py). It needs
  labels; its "not a digit" class makes it strict on noise-like artefacts.
- `encoder`: the workspace's label-free SimCLR encoder (redistill/encoder.py). It works on any image data.
- `inception:<file.safetensors>`: Inception-v3 pool features from a local weights file (torch-fidelity).

Every space has the sha256 of the weights behind it: it is part of a cycle's idempotency key and of the
lineage, so figures measured in different spaces are never compared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from redistill.config import FEATURE_SPACES as BUILT_IN


@dataclass
class FeatureSpace:
    name: str  # as written in evaluate.features
    extractor: nn.Module  # images in [0, 1] (N, C, H, W) → (N, d) features
    weights: Path  # the file its weights come from
    sha256: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_name(name: str) -> None:
    """Refuse a name that is not a known space, with the valid forms."""
    if name in BUILT_IN or name.startswith("inception:"):
        return
    raise ValueError(f"unknown feature space {name!r} in evaluate.features; valid are: {', '.join(BUILT_IN)}, "
                     "or inception:/path/to/inception.safetensors")


def weights_file(name: str, features_dir: Path) -> Path:
    """Where the weights of space `name` live (the features stage writes the built-in ones)."""
    from redistill import encoder, features

    check_name(name)
    if name == "classifier":
        return Path(features_dir) / features.WEIGHTS_FILE
    if name == "encoder":
        return Path(features_dir) / encoder.WEIGHTS_FILE
    return Path(name.split(":", 1)[1]).expanduser()


def sha256s(names: list[str], features_dir: Path) -> dict[str, str]:
    """{name: sha256 of its weights} without loading any model (cheap: for the idempotency key)."""
    out = {}
    for name in names:
        f = weights_file(name, features_dir)
        if not f.is_file():
            raise FileNotFoundError(f"the weights of feature space {name!r} are missing ({f}); "
                                    "run `redistill features` (or `dvc repro features`) first")
        out[name] = _sha256(f)
    return out


def load(name: str, features_dir: Path) -> FeatureSpace:
    """Load one feature space (safetensors only)."""
    from redistill.encoder import EncoderFeatures, load_encoder
    from redistill.features import FeatureExtractor, InceptionFeatures, load_classifier

    f = weights_file(name, features_dir)
    if name == "classifier":
        ext = FeatureExtractor(load_classifier(features_dir))
    elif name == "encoder":
        ext = EncoderFeatures(load_encoder(features_dir))
    else:
        ext = InceptionFeatures(f)
    return FeatureSpace(name, ext, f, _sha256(f))


def load_all(names: list[str], features_dir: Path) -> list[FeatureSpace]:
    return [load(n, Path(features_dir)) for n in names]
