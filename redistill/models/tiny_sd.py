"""Small Stable-Diffusion-layout pipelines built from configs alone, with no download: the CLIP tokenizer's
vocabulary files written here, a CLIP text encoder, an `AutoencoderKL` and a `UNet2DConditionModel`.

The tests build their text-to-image teachers with `tiny_sd_pipeline`; the embedded text-to-image teacher
(`redistill teacher text-to-image`) starts from the same builder at a larger width and is then trained.

The tokenizer is CLIP's byte-level BPE: its vocabulary holds every byte symbol (alone and word-final, `…</w>`),
and the merges build each word of `words` letter by letter into one token, so the prompts of the data are a
few tokens each and any other text still tokenises (into letters). Without merges every word would be split
into letters and overflow a short `model_max_length` (NOTES.md).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) uses for the 256 byte values, in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_clip_tokenizer(out: Path, words: list[str], model_max_length: int = 16) -> Path:
    """vocab.json, merges.txt and the tokenizer configs of a CLIP BPE tokenizer whose merges make each of
    `words` (lower case, letters of the byte alphabet) one token; returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if w}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append(f"{left} {right}")
                vocab[merged] = len(vocab)
            left = merged
    for s in SPECIAL:
        vocab[s] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": SPECIAL[0],
                "eos_token": SPECIAL[1],
                "unk_token": SPECIAL[1],
                "pad_token": SPECIAL[1],
                "do_lower_case": True,
            }
        )
    )
    return out


def tiny_sd_pipeline(
    tokenizer_dir: Path,
    image_channels: int = 3,
    image_size: int = 16,
    latent_channels: int = 4,
    width: int = 32,
    text_width: int = 32,
    text_layers: int = 2,
    time_cond_proj_dim: int | None = None,
    num_train_timesteps: int = 1000,
    seed: int = 0,
):
    """A randomly initialised `StableDiffusionPipeline` of the SD layout (no safety checker) whose tokenizer is
    the one in `tokenizer_dir` (see `write_clip_tokenizer`). Latents are `image_size // 2` square (a VAE with two
    levels); the UNet has a cross-attention level and a plain one at widths `width`, `2·width`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=text_width,
        )
    )
    groups = min(8, width // 2)
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=latent_channels,
        block_out_channels=(width // 2, width),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=groups,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        norm_num_groups=groups,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
