"""The adapter interface every kind of pipeline implements (see `redistill.models` for what it is for), and
the errors it raises."""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedPipeline(ValueError):
    """A pipeline no adapter knows; the message lists the kinds that are supported."""


class NotOffered(NotImplementedError, AttributeError):
    """A kind asked for what only another kind offers. An AttributeError too, so `hasattr(adapter, name)` tells
    which kinds offer it."""


def text_to_image_only(fn):
    """Declare `fn` on the base as offered by text-to-image kinds only: elsewhere the attribute raises NotOffered."""

    def absent(self):
        raise NotOffered(f"a {self.kind} model has no {fn.__name__}: only a text-to-image model (prompts, a VAE) does")

    return property(absent, doc=fn.__doc__)


class ModelAdapter:
    """What every kind of pipeline offers. Subclasses set `kind` and implement `claims` and the methods below."""

    kind = "abstract"
    layouts: tuple[str, ...] = ()  # the pipeline classes (model_index.json's _class_name) a folder of this kind names
    description = ""
    family = (
        "diffusion"  # "diffusion": ε/v/x₀ on an ᾱ schedule; "flow": a velocity on the straight path (flow matching)
    )
    clips = True  # x̂₀ lives in [−1, 1] (pixels) and samplers clip it there; a latent model's x̂₀ is not clipped
    solver = "ddim"  # the deterministic sampler `ode_sample` runs; it names cached teacher pairs
    # the teacher's (noise, ODE output) pairs are what its stock pipeline samples with DDIM from the same noise, so the
    # pairs and the evaluation's samples of the teacher are one draw (methods/output.py `_pairs_from_samples`)
    pairs_from_samples = False

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # -- which pipelines this kind serves ---------------------------------------------------------------
    @classmethod
    def claims(cls, pipe: Any) -> bool:
        raise NotImplementedError

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def scheduler_config(self):
        return self.pipe.scheduler.config

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod.float()

    def noise_path(self):
        """The path methods noise on, for `prediction.alpha_sigma`: the ᾱ table (a flow model: a StraightPath)."""
        return self.alphas_cumprod

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> tuple[int, int]:
        s = self.unet.config.sample_size
        return (int(s[0]), int(s[1])) if isinstance(s, (list, tuple)) else (int(s), int(s))

    @property
    def image_channels(self) -> int:
        """The pictures' channels (the data's); the model's own `channels` differ for a latent model."""
        return self.channels

    @property
    def image_size(self) -> tuple[int, int]:
        """The pictures' size (the data's); the model's own `sample_size` differs for a latent model."""
        return self.sample_size

    @property
    def conditional(self) -> bool:
        return False

    def facts(self) -> dict:
        """What the lineage and the teacher check record about the model."""
        return {
            "kind": self.kind,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "channels": self.channels,
            "sample_size": list(self.sample_size),
            "conditional": self.conditional,
        }

    # -- data ---------------------------------------------------------------------------------------------
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Training images (N, C, H, W) in [0, 1] → what the network denoises: pixels in [−1, 1] (a latent
        model: its VAE's scaled latents)."""
        return images.float() * 2.0 - 1.0

    def conditions_at(
        self, index: torch.Tensor, n: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> Any:
        """The conditions of the training images at `index` where the model pairs them with the data (a
        text-to-image model given the data's captions); else `conditions(n, generator, device)`."""
        return self.conditions(n, generator, device)

    # -- the network ----------------------------------------------------------------------------------
    def conditions(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Any:
        """A training batch of `n` conditions (None for an unconditional model; draws nothing then)."""
        return None

    def output(self, net: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """One call of `net` (the teacher's network or a student of its shape) on noisy `z` at timesteps `t`."""
        raise NotImplementedError

    def teacher_output(self, net: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The teacher's output as its sampler uses it: with classifier-free guidance folded in where the
        teacher was trained for it (what a guided-distillation student learns); else `output`."""
        return self.output(net, z, t, cond)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t·x₀ + σ_t·ε with the model's own schedule."""
        from redistill.models.prediction import alpha_sigma

        a, s = alpha_sigma(self.alphas_cumprod.to(x0.device), t)
        return a * x0 + s * noise

    def velocity(self, net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """dx/dσ of the model's ODE on the straight path x = (1 − σ)·x₀ + σ·ε at noise levels `sigma` (one per sample).

        A diffusion model's probability-flow ODE in these coordinates (Liu et al. 2023, "Flow Straight and Fast",
        section 3.3): x is z_t / (α_t + σ_t) at the t where σ_t / (α_t + σ_t) = σ (a fractional t, interpolated in
        log-SNR), and its velocity is ε̂ − x̂₀ of the teacher's (guided) prediction there."""
        from redistill.models.prediction import to_x0_eps

        ac = self.alphas_cumprod.to(x.device).double()
        lam = torch.log(ac) - torch.log1p(-ac)  # log-SNR of each timestep, decreasing in t
        sig = sigma.to(x.device).double().clamp(1e-6, 1 - 1e-6)
        target = (2 * (torch.log1p(-sig) - torch.log(sig))).clamp(float(lam.min()), float(lam.max()))
        hi = torch.searchsorted(-lam, -target).clamp(1, len(lam) - 1)  # lam[hi − 1] ≥ target ≥ lam[hi]
        frac = (lam[hi - 1] - target) / (lam[hi - 1] - lam[hi])
        t = (hi - 1 + frac).float()
        abar = torch.sigmoid(target).float().view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        z = x * (a + s)
        x0, eps = to_x0_eps(self.teacher_output(net, z, t, cond).float(), z, a, s, self.prediction_type)
        return eps - x0

    @torch.no_grad()
    def ode_sample(self, net: torch.nn.Module, x: torch.Tensor, steps: int, cond: Any = None) -> torch.Tensor:
        """The model's deterministic sampler from noise `x` at `steps` (DDIM, η = 0, the teacher's own spacing,
        guidance folded in); its x₀, unclamped."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            # a guided teacher's clipped x̂₀ needs its ε (ClassConditionalPipeline samples so); the unconditional
            # teachers keep the stock DDIM step, so their cached pairs stay what they were
            x = sched.step(
                self.teacher_output(net, x, t.expand(len(x)).to(x.device), cond),
                t,
                x,
                use_clipped_model_output=self.conditional,
            ).prev_sample
        return x

    # -- text-to-image only: pictures ↔ latents, prompts (models/text_to_image.py) -------------------------
    @text_to_image_only
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 256) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] → the scaled latents the UNet works on."""

    @text_to_image_only
    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Scaled latents → images in [0, 1], float (N, C, H, W)."""

    @text_to_image_only
    def use_prompts(self, prompts: list[str], paired: bool = False) -> ModelAdapter:
        """Training batches and unprompted samples draw from `prompts`; `paired`: prompts[i] is image i's caption."""

    @text_to_image_only
    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """The text encoder's hidden states (N, L, D) of `prompts`: the conditions the UNet takes."""

    @text_to_image_only
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """One vector per prompt (N, D), for prompt drift and prompt-set comparisons."""

    @text_to_image_only
    def draw_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which of the prompts a batch of `n` samples drawn with `generator` was asked for."""

    @text_to_image_only
    def draw_key(self) -> str:
        """What else than the seed decides a sample (the prompt set, the guidance), for sample caches."""

    @text_to_image_only
    def unet_passes_per_step(self, guidance_scale: float | None = None) -> int:
        """UNet calls per sampling step: 2 under classifier-free guidance, else 1."""

    # -- sampling and export ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, n: int, steps: int, generator: torch.Generator, cond: Any = None, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """`n` images in [0, 1], float (N, C, H, W), from the pipeline's own sampler at `steps` (a conditional
        model: under `cond`, drawn with `generator` when None, at `guidance_scale`, default its own)."""
        raise NotImplementedError

    def export(self, unet: torch.nn.Module, scheduler) -> Any:
        """A student (a network of the teacher's kind and its sampler) as a stock diffusers pipeline."""
        raise NotImplementedError
