"""A text-to-image latent transformer's parts in the PixArt-Σ layout, built from configs: a T5 (Unigram) tokenizer
whose pieces are the captions' words, a small `T5EncoderModel`, a VAE, a `PixArtTransformer2DModel` with a learned
variance and a DDPM scheduler that does not clip, in a stock `PixArtSigmaPipeline` (the layout `models/pixart.py`
serves). Untrained as built."""

from __future__ import annotations


def t5_tokenizer(words: list[str]):
    """A T5 tokenizer offline: `<pad>`, `</s>`, `<unk>` first, each word one piece (marked `▁` as a word start),
    then single characters for anything else."""
    from transformers import T5Tokenizer

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") - set(words))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab + [("▁", -4.0)] + [(c, -5.0) for c in chars], extra_ids=0)


def build_pixart_pipeline(
    image_channels: int = 1,
    image_size: int = 8,
    text_width: int = 16,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    patch_size: int = 2,
    seed: int = 0,
    words: list[str] | None = None,
):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from redistill.data.captions import vocabulary

    tok = t5_tokenizer(words or vocabulary())
    latent = image_size // 2
    if latent % patch_size:
        raise ValueError(
            f"{image_size}-pixel pictures give {latent}-pixel latents, which patch size {patch_size} does not divide"
        )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=text_width,
            d_kv=text_width // 2,
            d_ff=2 * text_width,
            num_layers=1,
            num_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=False,
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        caption_channels=text_width,
        sample_size=latent,
        patch_size=patch_size,
        interpolation_scale=1,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
