"""Prediction types in one place: ε, v and x₀ outputs of a diffusion UNet converted to (x₀, ε).

With z_t = α_t·x₀ + σ_t·ε (α_t = √ᾱ_t, σ_t = √(1−ᾱ_t)) and v = α_t·ε − σ_t·x₀ (Salimans & Ho 2022):
- epsilon:      x₀ = (z − σ·ε̂) / α
- v_prediction: x₀ = α·z − σ·v̂,  ε = σ·z + α·v̂
- sample:       ε = (z − α·x̂₀) / σ
Every method converts through `to_x0_eps`, so a v-prediction teacher is never read as ε.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t and σ_t shaped (B, 1, 1, 1); t = −1 means the clean end of the chain (α = 1, σ = 0)."""
    abar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(t, dtype=alphas_cumprod.dtype))
    abar = abar.view(-1, 1, 1, 1)
    return abar.sqrt(), (1.0 - abar).clamp(min=0).sqrt()


def to_x0_eps(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from a model output of the given prediction type."""
    if prediction_type == "epsilon":
        return (z - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * z - sigma * output, sigma * z + alpha * output
    if prediction_type == "sample":
        return output, (z - alpha * output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The model output of the given type that corresponds to (x₀, ε)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
