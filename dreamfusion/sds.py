"""Score Distillation Sampling (Poole et al. 2022), shared by every guidance backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamfusion.cameras import ViewCondition
from dreamfusion.config import SDSConfig
from dreamfusion.guidance.base import Guidance


@dataclass
class SDSResult:
    loss: torch.Tensor  # surrogate whose gradient w.r.t. the render is the SDS gradient
    timestep: float  # mean sampled timestep, as a fraction of the schedule
    gradient_norm: float


def timestep_bounds(config: SDSConfig, progress: float) -> tuple[float, float]:
    """``t_max`` anneals linearly to ``t_max_final``: large noise shapes, small noise refines."""
    progress = min(max(progress, 0.0), 1.0)
    return config.t_min, config.t_max + (config.t_max_final - config.t_max) * progress


def weighting(config: SDSConfig, alpha_bar: torch.Tensor) -> torch.Tensor:
    if config.weighting == "sds":
        return 1.0 - alpha_bar
    if config.weighting == "sqrt":
        return (alpha_bar * (1.0 - alpha_bar)).sqrt()
    return torch.ones_like(alpha_bar)


def sds_loss(
    guidance: Guidance,
    images: torch.Tensor,
    views: ViewCondition | None,
    config: SDSConfig,
    progress: float,
    generator: torch.Generator,
    textureless: bool = False,
) -> SDSResult:
    latents = guidance.encode(images, progress)
    batch = latents.shape[0]
    steps = guidance.num_train_timesteps
    low, high = timestep_bounds(config, progress)
    timesteps = (low + (high - low) * torch.rand(batch, generator=generator)) * (steps - 1)
    timesteps = timesteps.round().long().clamp(0, steps - 1)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    alpha_bar = guidance.alphas_cumprod[timesteps].to(latents)
    shape = (batch,) + (1,) * (latents.dim() - 1)
    noisy = alpha_bar.sqrt().reshape(shape) * latents.detach() + (1.0 - alpha_bar).sqrt().reshape(shape) * noise
    with torch.no_grad():
        predicted = guidance.predict_noise(noisy, timesteps, views, config.guidance_scale, textureless, progress)
    gradient = weighting(config, alpha_bar).reshape(shape) * (predicted.to(latents) - noise)
    gradient = torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0)
    # d(loss)/d(latents) == gradient, and nothing reaches the diffusion network.
    target = (latents - gradient).detach()
    loss = 0.5 * ((latents - target) ** 2).sum() / batch
    return SDSResult(loss, float(timesteps.float().mean()) / (steps - 1), float(gradient.norm()) / batch)
