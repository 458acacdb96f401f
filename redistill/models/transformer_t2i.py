"""What the text-to-image transformer kinds (SD3, PixArt-Σ, Flux; `sd3.py`, `pixart.py`, `flux.py`) share: the
denoiser is the pipeline's `transformer`, the VAE's latents are shifted then scaled (`vae_encode`), a prompt's
encodings (each kind's `_embeds`) are packed into one tensor (hidden states then the pooled vector; PixArt: then
the attention mask), the unconditional branch is
the empty prompt's, and classifier-free guidance is u + w·(c − u) over the kind's own network call (`_call`)."""

from __future__ import annotations

import torch

from redistill.models.text_to_image import TextToImageLatent, vae_decode, vae_encode

T5_TOKENS = 8  # the T5 tokens a prompt is encoded to (SD3 without T5: the zero tokens standing in for it)


class PackedPromptLatent(TextToImageLatent):
    """A text-to-image transformer whose prompt encodings the methods see as one packed tensor per prompt."""

    default_guidance = 1.0  # the pipeline's own default guidance_scale (a subclass sets it)

    def __init__(self, pipe, guidance_scale: float | None = None):
        super().__init__(pipe, guidance_scale)
        if guidance_scale is None and not self.sampling:
            self.guidance_scale = self.default_guidance  # the pipeline's default, not SD 1.x's

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (a transformer here; the name is the interface's)."""
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def max_sequence_length(self) -> int:
        """T5's tokens per prompt (or the zero tokens standing in for an absent T5): the folder's, else 8."""
        return int(self.sampling.get("max_sequence_length", T5_TOKENS))

    # -- pictures ↔ latents, prompts → one tensor each ------------------------------------------------------
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256) -> torch.Tensor:
        return vae_encode(self.pipe.vae, images, batch)

    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return vae_decode(self.pipe.vae, latents, batch)

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(N, L, D) hidden states and (N, P) pooled projections → one (N, L·D + P) tensor (SD3's, Flux's)."""
        return torch.cat([embeds.flatten(1), pooled], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, p = int(self.unet.config.joint_attention_dim), int(self.unet.config.pooled_projection_dim)
        n, width = cond.shape
        return cond[:, : width - p].reshape(n, (width - p) // d, d), cond[:, width - p :]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        cond = self.pack(*self._embeds(prompts))
        return cond.to(device if device is not None else cond.device)

    def uncond(self, n: int, device) -> torch.Tensor:
        """The empty prompt's packed encodings, `n` times (the unconditional branch of guidance)."""
        if self._uncond is None or self._uncond.device != torch.device(device):
            self._uncond = self.encode_prompts([""], device)
        return self._uncond.expand(n, -1)

    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        if guidance_scale is None:
            guidance_scale = self.sampling.get("guidance_scale", self.guidance_scale)
        return 2 if guidance_scale > 1 else 1

    # -- the network ----------------------------------------------------------------------------------
    def guidance_embedding(self, net, n, w, device, dtype):
        return None  # no LCM-style guidance embedding (Flux takes w through its own `guidance` input)

    def _call(self, net, z, t, cond) -> torch.Tensor:
        raise NotImplementedError

    def output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError(f"a {self.kind} model needs prompt embeddings for every call (adapter.conditions)")
        return self._call(net, z, t, cond)

    def teacher_output(self, net, z, t, cond=None):
        if cond is None:
            raise ValueError(f"a {self.kind} model needs prompt embeddings for every call (adapter.conditions)")
        if self.guidance_scale == 1.0:
            return self._call(net, z, t, cond)
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        both = self._call(net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, self.uncond(len(z), z.device)]))
        c, u = both.chunk(2)
        return u + self.guidance_scale * (c - u)

    def export_sampling(self) -> dict:
        """What an exported student's `redistill_sampling.json` starts from: the folder's, with the prompt length."""
        return {**self.sampling, "max_sequence_length": self.max_sequence_length}
