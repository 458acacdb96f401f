"""A class-conditional DiT teacher's parts, built from configs: a small `AutoencoderKL` and a `DiTTransformer2DModel`
in a stock `DiTPipeline` (the layout `models/dit.py` serves). Untrained as built; the embedded teacher trains them."""

from __future__ import annotations

from pathlib import Path

from redistill.models.dit import DIT_NULL_CLASS  # the label table keeps 1000 rows + DiTPipeline's null class


def build_dit_pipeline(
    image_channels: int = 1,
    image_size: int = 8,
    latent_channels: int = 4,
    vae_channels: tuple[int, ...] = (16, 32),
    heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    patch_size: int = 2,
    learned_sigma: bool = True,
    seed: int = 0,
):
    """A DiTPipeline whose VAE halves the picture once per extra level and whose transformer patches the latents
    (`image_size` / 2^(levels − 1) must be a multiple of `patch_size`), with a DDPM scheduler that does not clip
    (latents are not confined to [−1, 1])."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    down = 2 ** (len(vae_channels) - 1)
    latent = image_size // down
    if image_size % down or latent % patch_size:
        raise ValueError(
            f"a {image_size}-pixel picture gives {image_size / down:g}-pixel latents with {len(vae_channels)} VAE "
            f"levels, which patch size {patch_size} does not divide; change vae_channels or patch_size"
        )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=latent_channels,
        block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1,
        norm_num_groups=min(8, vae_channels[0]),
        sample_size=image_size,
    )
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=latent_channels,
        out_channels=2 * latent_channels if learned_sigma else latent_channels,
        num_layers=layers,
        sample_size=latent,
        patch_size=patch_size,
        num_embeds_ada_norm=DIT_NULL_CLASS,
        norm_type="ada_norm_zero",
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dit(pipe, out: Path, num_classes: int, guidance_scale: float) -> Path:
    """Save a DiT pipeline with its sampling settings (`redistill_sampling.json`: the classes its labels mean and its
    guidance; `save_pretrained` keeps no `id2label`)."""
    from redistill.models.pipelines import save_pipeline

    pipe.redistill_sampling = {"num_classes": int(num_classes), "guidance_scale": float(guidance_scale)}
    save_pipeline(pipe, Path(out))
    return Path(out)
