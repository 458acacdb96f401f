"""A text-to-image latent transformer's parts in the PixArt-Σ layout, built from configs: a T5 (Unigram) tokenizer
whose pieces are the captions' words, a small `T5EncoderModel`, a VAE, a `PixArtTransformer2DModel` with a learned
variance and a DDPM scheduler that does not clip, in a stock `PixArtSigmaPipeline` (the layout `models/pixart.py`
serves). Untrained as built."""

from __future__ import annotations


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
    from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from redistill.data.captions import vocabulary
    from redistill.teachers.latent_parts import small_t5, small_vae, t5_tokenizer

    tok = t5_tokenizer(words or vocabulary())
    latent = image_size // 2
    if latent % patch_size:
        raise ValueError(
            f"{image_size}-pixel pictures give {latent}-pixel latents, which patch size {patch_size} does not divide"
        )
    torch.manual_seed(seed)
    text_encoder = small_t5(tok, text_width)
    vae = small_vae(image_channels, image_size, 4)
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
