"""Score Distillation Sampling (Poole et al. 2022), shared by every guidance backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamfusion.cameras import VIEW_LABELS, ViewCondition
from dreamfusion.config import SDSConfig
from dreamfusion.guidance.base import Guidance


@dataclass
class SDSResult:
    loss: torch.Tensor  # surrogate whose gradient w.r.t. the render is the SDS gradient
    timestep: float  # mean sampled timestep, as a fraction of the schedule
    gradient_norm: float


def negative_text(negative_prompt: str, prompt: str) -> str:
    """The negative prompt of a run: ``{prompt}`` stands for the run's prompt."""
    return negative_prompt.replace("{prompt}", prompt)


def _wrapped_azimuth(views: ViewCondition) -> torch.Tensor:
    """|azimuth| in [0, 180]: 0 in front, 90 at the side, 180 behind."""
    return ((views.azimuth_degrees.float() + 180.0) % 360.0 - 180.0).abs()


def view_weights(views: ViewCondition, interpolated: bool, overhead_elevation: float = 60.0) -> torch.Tensor:
    """``[B, 4]`` weights of each render's condition over ``VIEW_LABELS`` (front, side, back, overhead).

    With labels, one-hot on the render's own label. Interpolated (stable-dreamfusion's view embeddings):
    front and side blended linearly by azimuth up to 90°, side and back beyond; overhead blended in from 30°
    below ``overhead_elevation`` to it. At the labels' own azimuths, low down, it is the label itself.
    """
    if not interpolated:
        index = torch.tensor([VIEW_LABELS.index(label) for label in views.labels])
        return torch.nn.functional.one_hot(index, len(VIEW_LABELS)).float()
    azimuth = _wrapped_azimuth(views)
    front = (1.0 - azimuth / 90.0).clamp(min=0.0)
    back = (azimuth / 90.0 - 1.0).clamp(min=0.0)
    side = 1.0 - front - back
    up = ((views.elevation_degrees.float() - (overhead_elevation - 30.0)) / 30.0).clamp(0.0, 1.0)
    return torch.stack([front * (1 - up), side * (1 - up), back * (1 - up), up], dim=-1)


def perp_neg_views(views: ViewCondition, weight: float, front_decay: float, side_decay: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Perp-Neg's negative views for each render, as stable-dreamfusion weights them by azimuth: ``[B, 2, 4]``
    weights over ``VIEW_LABELS`` (the front view and the side view) and ``[B, 2]`` their strengths.

    In the front half, with r = 1 - |azimuth|/90 (1 in front, 0 at the side), the front view is negated
    with ``weight · exp(-r · front_decay)`` unless r > 0.8 (the render is a front view) and the side view with
    ``weight · exp(-(1 - r) · side_decay)`` unless r < 0.2; behind, with r = 2 - |azimuth|/90 (1 at the
    side, 0 behind), the front view always with ``weight`` (what keeps a second face off the back) and the
    side view with ``weight/2 · exp(-r · side_decay)`` unless r > 0.8.
    """
    azimuth = _wrapped_azimuth(views)
    front_half = azimuth < 90.0
    r = torch.where(front_half, 1.0 - azimuth / 90.0, 2.0 - azimuth / 90.0)
    front_strength = torch.where(front_half, torch.where(r > 0.8, 0.0, weight * torch.exp(-r * front_decay)),
                                 torch.full_like(r, weight))
    side_strength = torch.where(
        front_half, torch.where(r < 0.2, 0.0, weight * torch.exp(-(1.0 - r) * side_decay)),
        torch.where(r > 0.8, 0.0, weight / 2.0 * torch.exp(-r * side_decay)))
    one_hot = torch.eye(len(VIEW_LABELS))
    negatives = torch.stack([one_hot[VIEW_LABELS.index("front")], one_hot[VIEW_LABELS.index("side")]])
    return negatives.expand(len(r), -1, -1), torch.stack([front_strength, side_strength], dim=-1)


def guided(unconditional: torch.Tensor, positive: torch.Tensor, scale: float,
           negatives: torch.Tensor | None = None, strengths: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance, with Perp-Neg's negatives when given:

        ε_u + ω (ε_pos − ε_u) − Σ_i w_i · perp(ε_neg_i − ε_u, ε_pos − ε_u)

    where perp(a, b) is the part of a perpendicular to b, per sample. ``unconditional``, ``positive``:
    ``[B, ...]``; ``negatives``: ``[B, K, ...]``; ``strengths`` (the w_i): ``[B, K]``. Works on noise or on
    x̂₀ predictions alike (one is an affine map of the other, per sample).
    """
    direction = positive - unconditional
    out = unconditional + scale * direction
    if negatives is None or strengths is None:
        return out
    flat = direction.reshape(direction.shape[0], 1, -1)
    for_each = (negatives - unconditional[:, None]).reshape(flat.shape[0], negatives.shape[1], -1)
    along = (for_each * flat).sum(-1, keepdim=True) / (flat * flat).sum(-1, keepdim=True).clamp_min(1e-12)
    perpendicular = for_each - along * flat
    return out - (strengths.to(out)[..., None] * perpendicular).sum(1).reshape_as(out)


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
