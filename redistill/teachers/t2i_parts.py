"""The embedded text-to-image teacher's parts, built from configs (tokenizer, CLIP text encoder, VAE, conditional
UNet, scheduler), and the small pieces of its recipe's maths (the VAE loss, the latent scaling, caption dropout)."""

from __future__ import annotations

from pathlib import Path

import torch

from redistill.config import T2ITeacherParams

EMPTY_PROMPT = ""  # the unconditional branch of guidance, as StableDiffusionPipeline encodes it


# ---------------------------------------------------------------------------------------------------
# The components, from configs
# ---------------------------------------------------------------------------------------------------


def build_tokenizer(p: T2ITeacherParams, out: Path):
    """Step 1: a CLIP tokenizer whose merges make each word of the class prompts one token."""
    from transformers import CLIPTokenizer

    from redistill.data.captions import vocabulary
    from redistill.models.tiny_sd import write_clip_tokenizer

    write_clip_tokenizer(out, vocabulary(), p.model_max_length)
    return CLIPTokenizer.from_pretrained(str(out), local_files_only=True)


def build_text_encoder(p: T2ITeacherParams, tokenizer):
    """Step 2: a small CLIP text transformer, its positions as long as the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=p.text_width,
            intermediate_size=2 * p.text_width,
            num_hidden_layers=p.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=p.text_width,
        )
    )


def build_vae(p: T2ITeacherParams, channels: int):
    """Step 3: an AutoencoderKL with two levels (f = 2); no mid-block attention, which 8×8 latents do not need."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=p.latent_channels,
        block_out_channels=tuple(p.vae_block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=min(8, p.vae_block_out_channels[0]),
        sample_size=p.image_size,
        mid_block_add_attention=False,
    )


def build_unet(p: T2ITeacherParams):
    """Step 4: the UNet on 8×8 latents: cross-attention at full latent resolution, a plain level below, and
    (`text_time_embedding`) the pooled prompt added to the time embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=p.image_size // 2,
        in_channels=p.latent_channels,
        out_channels=p.latent_channels,
        block_out_channels=tuple(p.block_out_channels),
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=p.text_width,
        attention_head_dim=p.attention_heads,
        # the prompt, attention-pooled, also joins the time embedding that every ResNet block is modulated by
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if p.text_time_embedding else {}),
    )


def build_scheduler(p: T2ITeacherParams):
    """The DDIM sampler of the SD layout on the training schedule (ε-prediction, latents unclipped)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=p.num_train_timesteps,
        beta_schedule=p.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel L1 of the reconstruction from a posterior sample, plus `kl_weight` × KL(q(z|x) ‖ N(0, I)) summed
    over the latent and divided by the pixels; returns (loss, L1)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=generator)).sample
    l1 = (rec - x).abs().mean()
    return l1 + kl_weight * post.kl().mean() / x[0].numel(), l1


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the unscaled latents: the SD convention that gives the UNet unit-variance latents."""
    return float(1.0 / latents.float().std())


def drop_captions(
    ids: torch.Tensor, empty_ids: torch.Tensor, dropout: float, generator: torch.Generator
) -> torch.Tensor:
    """Classifier-free guidance training: each row of token ids replaced by the empty prompt's with probability `dropout`."""
    drop = torch.rand((len(ids),), generator=generator) < dropout
    return torch.where(drop[:, None], empty_ids.expand_as(ids), ids)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, L) padded to the tokenizer's length, as StableDiffusionPipeline tokenizes prompts."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
