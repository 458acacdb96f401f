"""A text-to-image flow-matching transformer's parts in the Stable Diffusion 3 layout, built from configs: two CLIP
text encoders with projection over one tokenizer of the captions' words, a 16-channel VAE with a shift factor, an
`SD3Transformer2DModel` and a `FlowMatchEulerDiscreteScheduler`, in a stock `StableDiffusion3Pipeline` without T5
(the layout `models/sd3.py` serves). Untrained as built."""

from __future__ import annotations

from pathlib import Path


def build_sd3_pipeline(
    tokenizer_dir: Path,
    image_channels: int = 1,
    image_size: int = 8,
    text_width: int = 16,
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    patch_size: int = 2,
    shift: float = 3.0,
    model_max_length: int = 16,
    seed: int = 0,
    words: list[str] | None = None,
    text_layers: int = 1,
    vae=None,
):
    """The pipeline; its tokenizer is written to `tokenizer_dir` (each of `words`, by default the digits' class
    prompts' words, one token). The
    transformer's dimensions follow SD3's rules: joint_attention_dim ≥ both CLIPs' widths together, the caption
    projection = heads × head_dim, the pooled projection = both CLIPs' projections together. `vae`: a trained one
    instead of a new one (its `shift_factor` must be set)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from redistill.data.captions import vocabulary
    from redistill.models.tiny_sd import write_clip_tokenizer
    from redistill.teachers.latent_parts import small_vae

    write_clip_tokenizer(Path(tokenizer_dir), words or vocabulary(), model_max_length)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(seed)

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                max_position_embeddings=model_max_length,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                projection_dim=text_width,
            )
        )

    if vae is None:
        vae = small_vae(image_channels, image_size, 16, shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE's
    latent_channels = int(vae.config.latent_channels)
    latent = image_size // 2
    if latent % patch_size:
        raise ValueError(
            f"{image_size}-pixel pictures give {latent}-pixel latents, which patch size {patch_size} does not divide"
        )
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=max(2 * text_width, heads * head_dim),
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=max(8, latent // patch_size * 2),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=clip(),
        tokenizer=tok,
        text_encoder_2=clip(),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
