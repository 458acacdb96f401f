"""A text-to-image flow-matching transformer's parts in the Flux layout, built from configs: a CLIP text encoder (its
pooled output) and a T5 encoder (its sequence) over tokenizers of the captions' words, a VAE with a shift factor,
a `FluxTransformer2DModel` with a guidance embedding, and a dynamically shifted `FlowMatchEulerDiscreteScheduler`,
in a stock `FluxPipeline` (the layout `models/flux.py` serves). Untrained as built."""

from __future__ import annotations

from pathlib import Path


def build_flux_pipeline(
    tokenizer_dir: Path,
    image_channels: int = 1,
    image_size: int = 8,
    text_width: int = 16,
    heads: int = 2,
    head_dim: int = 16,
    seed: int = 0,
    words: list[str] | None = None,
):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from redistill.data.captions import vocabulary
    from redistill.models.tiny_sd import write_clip_tokenizer
    from redistill.teachers.latent_parts import small_t5, small_vae, t5_tokenizer

    words = words or vocabulary()
    write_clip_tokenizer(Path(tokenizer_dir), words, 16)
    clip_tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    t5_tok = t5_tokenizer(words)
    if (image_size // 2) % 2:
        raise ValueError(f"{image_size}-pixel pictures give latents Flux cannot pack 2×2; use a multiple of 4")
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = small_t5(t5_tok, text_width)
    vae = small_vae(image_channels, image_size, 4, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE's
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # the VAE's 4 channels packed 2×2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=text_width,
        guidance_embeds=True,
        axes_dims_rope=(head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
