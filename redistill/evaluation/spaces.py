"""The feature spaces FID and KID are measured in, by name (`evaluate.features`).

- `classifier`: the penultimate layer of the workspace's digit classifier (redistill/features.py). It needs
  labels; its "not a digit" class makes it strict on noise-like artefacts.
- `encoder`: the workspace's label-free SimCLR encoder (redistill/encoder.py). It works on any image data.
- `inception:<file.safetensors>`: Inception-v3 pool features from a local weights file (torch-fidelity).
- `clip:<folder>`: CLIP image embeddings from a local `save_pretrained` folder (config.json +
  model.safetensors) of transformers' `CLIPVisionModelWithProjection` (or a whole `CLIPModel`): its
  `image_embeds`; a `CLIPVisionModel` folder gives its pooled output instead.
- `dinov2:<folder>`: the CLS token of a local transformers `Dinov2Model`'s last hidden state, the space of
  FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their unfair
  treatment of diffusion models").

The folders are never downloaded and only their safetensors weights are read: redistill never unpickles a
file it did not write. Images (N, C, H, W) in [0, 1], grey or RGB, are resized (bicubic, antialiased) to
the model's `config.image_size` and normalised as the model was trained (CLIP's or ImageNet's mean/std).
Hugging Face's DINOv2 configs say 518; dgm-eval's FD-DINOv2 feeds 224, so set `image_size` to 224 in the
folder's config.json to match its figures (the sha256 below then changes with it, as it should).

Every space has the sha256 of the weights behind it (for a folder: of its config and safetensors files): it
is part of a cycle's idempotency key and of the lineage, it is recorded with every evaluation
(`feature_spaces` in metrics.json), and the gate refuses to compare figures measured in different spaces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from redistill.config import FEATURE_SPACE_KINDS
from redistill.config import FEATURE_SPACES as BUILT_IN

FOLDER_KINDS = ("clip", "dinov2")  # spaces read from a transformers save_pretrained folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# what each folder kind must hold, for the messages: (model_type values accepted, the class to save)
_EXPECTED = {
    "clip": (("clip_vision_model", "clip"), "CLIPVisionModelWithProjection"),
    "dinov2": (("dinov2",), "Dinov2Model"),
}


@dataclass
class FeatureSpace:
    name: str  # as written in evaluate.features
    extractor: nn.Module  # images in [0, 1] (N, C, H, W) → (N, d) features
    weights: Path  # the file its weights come from (for clip: and dinov2:, the folder)
    sha256: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    """The files that define a folder space: its config and safetensors weights (with a sharded index)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and (p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))
    )


def _folder_sha256(folder: Path) -> str:
    """sha256 over the files of `_folder_files`, each with its name (as `teacher.pipeline_sha256` does).

    Only what decides the features is hashed: a README or a stray pickle beside the weights is not."""
    h = hashlib.sha256()
    for p in _folder_files(folder):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def check_name(name: str) -> None:
    """Refuse a name that is not a known space, with the valid forms."""
    kind, colon, path = name.partition(":")  # inception: as it always was; a folder space needs its folder
    if name in BUILT_IN or (kind in FEATURE_SPACE_KINDS and colon and (path or kind == "inception")):
        return
    raise ValueError(
        f"unknown feature space {name!r} in evaluate.features; valid are: {', '.join(BUILT_IN)}, "
        "inception:/path/to/inception.safetensors, clip:/path/to/clip-folder or "
        "dinov2:/path/to/dinov2-folder"
    )


def check_folder(name: str, folder: Path) -> dict:
    """Refuse a clip:/dinov2: folder that cannot give that space; returns its config.json.

    It must exist, hold config.json and safetensors weights (never only pickles), and its config must be of
    the kind the name says."""
    kind, folder = name.split(":", 1)[0], Path(folder)
    model_types, cls = _EXPECTED[kind]
    how = (
        f"pass a folder written by transformers' {cls}.save_pretrained(folder, safe_serialization=True) "
        f"(config.json + model.safetensors); make one where the model can be downloaded, e.g. "
        f"{cls}.from_pretrained('{'openai/clip-vit-base-patch32' if kind == 'clip' else 'facebook/dinov2-base'}')"
        ".save_pretrained(folder), and copy the folder here"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"feature space {name!r}: folder {folder} does not exist; {how}")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(
            f"feature space {name!r}: {folder} has no config.json, so it is not a save_pretrained folder; {how}"
        )
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"feature space {name!r}: {folder} has only pickle weights ({', '.join(pickles)}); redistill never "
                f"unpickles files it did not write. Convert them once in a trusted environment: "
                f"{cls}.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True), and pass "
                f"{kind}:new_folder"
            )
        raise ValueError(f"feature space {name!r}: {folder} has no model.safetensors; {how}")
    cfg = json.loads(config.read_text())
    model_type = cfg.get("model_type")
    if model_type not in model_types:
        other = next((k for k, (types, _) in _EXPECTED.items() if model_type in types), None)
        hint = f"pass it as {other}:{folder}" if other else f"evaluate.features takes {cls} folders after {kind}:"
        raise ValueError(
            f"feature space {name!r}: {folder} holds a {model_type!r} model "
            f"({', '.join(cfg.get('architectures') or ['no architectures'])}), not a "
            f"{'CLIP vision' if kind == 'clip' else 'DINOv2'} model; {hint}"
        )
    return cfg


def weights_file(name: str, features_dir: Path) -> Path:
    """Where the weights of space `name` live (the features stage writes the built-in ones): a file, or
    for clip: and dinov2: the folder."""
    from redistill.evaluation import encoder, features

    check_name(name)
    if name == "classifier":
        return Path(features_dir) / features.WEIGHTS_FILE
    if name == "encoder":
        return Path(features_dir) / encoder.WEIGHTS_FILE
    if ":" not in name:  # a built-in name that stands for another space: resolve it before asking for weights
        raise ValueError(
            f"feature space {name!r} has no weights of its own; resolve it to one of classifier or encoder first"
        )
    return Path(name.split(":", 1)[1]).expanduser()


def resolve(names: list[str], features_dir: Path) -> list[str]:
    """`evaluate.features` with `auto` expanded: the classifier where the workspace has one (it needs labelled
    data: `redistill features`), then the label-free encoder. Order kept, duplicates dropped."""
    from redistill.evaluation import features

    out: list[str] = []
    for name in names:
        expanded = [name]
        if name == "auto":
            has_classifier = (Path(features_dir) / features.WEIGHTS_FILE).is_file()
            expanded = (["classifier"] if has_classifier else []) + ["encoder"]
        out += [n for n in expanded if n not in out]
    return out


def classifier_for(names: list[str], features_dir: Path):
    """The workspace's classifier when `names` (resolved) measure in it, for recognisability; else None."""
    if "classifier" not in resolve(names, features_dir):
        return None
    from redistill.evaluation.features import load_classifier

    return load_classifier(Path(features_dir))


def sha256s(names: list[str], features_dir: Path) -> dict[str, str]:
    """{name: sha256 of its weights} without loading any model (cheap: for the idempotency key)."""
    out = {}
    for name in resolve(names, features_dir):
        f = weights_file(name, features_dir)
        if name.split(":", 1)[0] in FOLDER_KINDS:
            check_folder(name, f)
            out[name] = _folder_sha256(f)
            continue
        if not f.is_file():
            raise FileNotFoundError(
                f"the weights of feature space {name!r} are missing ({f}); "
                "run `redistill features` (or `dvc repro features`) first"
            )
        out[name] = _sha256(f)
    return out


class PretrainedImageFeatures(nn.Module):
    """CLIP image embeddings or the DINOv2 CLS token from a local transformers folder (safetensors only).

    The model's own preprocessing is done here, on tensors: grey repeated to RGB, a bicubic antialiased
    resize to `config.image_size`, the model's mean/std. Features come in batches of `batch` images, since
    DINOv2 at 518 px holds 1,369 tokens per image."""

    def __init__(self, name: str, folder: Path, batch: int = 64):
        super().__init__()
        kind = name.split(":", 1)[0]
        cfg = check_folder(name, Path(folder))
        import transformers  # heavy: only when such a space is used

        if kind == "dinov2":
            cls, mean, std = transformers.Dinov2Model, IMAGENET_MEAN, IMAGENET_STD
        elif "CLIPVisionModel" in (cfg.get("architectures") or []):
            cls, mean, std = transformers.CLIPVisionModel, CLIP_MEAN, CLIP_STD
        else:  # CLIPVisionModelWithProjection, or a whole CLIPModel whose vision tower and projection it reads
            cls, mean, std = transformers.CLIPVisionModelWithProjection, CLIP_MEAN, CLIP_STD
        model, info = cls.from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, output_loading_info=True
        )
        if info["missing_keys"]:
            # from_pretrained fills missing weights with random ones: features from those mean nothing
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"feature space {name!r}: the weights in {folder} do not fill a {cls.__name__} "
                f"({len(missing)} missing, e.g. {', '.join(missing[:3])}); pass a folder saved from "
                f"that class (or a whole CLIPModel for clip:)"
            )
        self.model = model.float().eval().requires_grad_(False)
        self.kind, self.batch = kind, batch
        self.image_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.num_features = (
            model.config.projection_dim
            if cls is transformers.CLIPVisionModelWithProjection
            else model.config.hidden_size
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 1 or 3, H, W) → the model's normalised (N, 3, image_size, image_size)."""
        if x.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind} features take grey or RGB images, got {x.shape[1]} channels")
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        s = self.image_size
        # bicubic overshoots at edges; the clamp keeps the range an 8-bit image resized with PIL would have
        x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), self.batch):
            px = self.preprocess(x[i : i + self.batch].to(self.mean.device))
            o = self.model(pixel_values=px)
            if self.kind == "dinov2":
                out.append(o.last_hidden_state[:, 0])
            else:
                out.append(o.image_embeds if hasattr(o, "image_embeds") else o.pooler_output)
        return torch.cat(out).to(x.device)


def load(name: str, features_dir: Path) -> FeatureSpace:
    """Load one feature space (safetensors only)."""
    from redistill.evaluation.encoder import EncoderFeatures, load_encoder
    from redistill.evaluation.features import FeatureExtractor, InceptionFeatures, load_classifier

    f = weights_file(name, features_dir)
    if name == "classifier":
        ext = FeatureExtractor(load_classifier(features_dir))
    elif name == "encoder":
        ext = EncoderFeatures(load_encoder(features_dir))
    elif name.split(":", 1)[0] in FOLDER_KINDS:
        ext = PretrainedImageFeatures(name, f)
        return FeatureSpace(name, ext, f, _folder_sha256(f))
    else:
        ext = InceptionFeatures(f)
    return FeatureSpace(name, ext, f, _sha256(f))


def load_all(names: list[str], features_dir: Path) -> list[FeatureSpace]:
    return [load(n, Path(features_dir)) for n in resolve(names, features_dir)]


class CLIPScore(nn.Module):
    """CLIP score of images against their prompts (Hessel et al. 2021; torchmetrics' scale): 100·max(cos, 0) of the
    image and text embeddings of a whole `CLIPModel` in a local folder (safetensors only) with its tokenizer. The
    image side is preprocessed as the `clip:` feature space does."""

    def __init__(self, folder: Path, batch: int = 64):
        super().__init__()
        import transformers

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if "text_config" not in cfg or not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise ValueError(
                f"{folder} is not a whole CLIPModel with its tokenizer (config.json with text_config, "
                "tokenizer files), so it gives no CLIP score"
            )
        self.model = (
            transformers.CLIPModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
            .float()
            .eval()
            .requires_grad_(False)
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.image_size, self.batch = int(self.model.config.vision_config.image_size), batch
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    preprocess = PretrainedImageFeatures.preprocess

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """One score per image, against its own prompt."""
        out = []
        for i in range(0, len(images), self.batch):
            px = self.preprocess(images[i : i + self.batch].to(self.mean.device))
            ids = self.tokenizer(list(prompts[i : i + self.batch]), padding=True, truncation=True, return_tensors="pt")
            img = F.normalize(_projected(self.model.get_image_features(pixel_values=px)), dim=-1)
            txt = F.normalize(_projected(self.model.get_text_features(**ids)), dim=-1)
            out.append(100 * (img * txt).sum(-1).clamp(min=0))
        return torch.cat(out)


def _projected(out) -> torch.Tensor:
    """The projected embedding: a tensor (transformers 4), or the output's pooler_output (transformers 5 puts the
    projection there)."""
    return out if torch.is_tensor(out) else out.pooler_output


def clip_scorer(names: list[str], features_dir: Path) -> CLIPScore | None:
    """The CLIP score model of the first `clip:DIR` space whose folder is a whole CLIPModel with its tokenizer."""
    for name in resolve(names, features_dir):
        if name.startswith("clip:"):
            try:
                return CLIPScore(weights_file(name, features_dir))
            except ValueError:
                continue
    return None
