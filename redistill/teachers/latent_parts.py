"""Parts the tiny transformer teachers share, built from configs (`sd3_parts.py`, `pixart_parts.py`,
`flux_parts.py`): a T5 tokenizer and encoder offline, and a two-level VAE for small pictures."""

from __future__ import annotations


def t5_tokenizer(words: list[str]):
    """A T5 tokenizer offline: `<pad>`, `</s>`, `<unk>` first, each word one piece (marked `▁` as a word start),
    then single characters for anything else."""
    from transformers import T5Tokenizer

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") - set(words))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab + [("▁", -4.0)] + [(c, -5.0) for c in chars], extra_ids=0)


def small_t5(tokenizer, width: int):
    """A one-layer `T5EncoderModel` of `width` over `tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // 2,
            d_ff=2 * width,
            num_layers=1,
            num_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def small_vae(image_channels: int, image_size: int, latent_channels: int, **scaling):
    """An `AutoencoderKL` with two levels (latents half the picture's size) and no mid-block attention; `scaling`:
    its `shift_factor` and `scaling_factor` where the layout has its own."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        latent_channels=latent_channels,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=False,
        **scaling,
    )
