"""What every guidance backend provides to Score Distillation Sampling."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dreamfusion.cameras import ViewCondition


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The DDPM noise schedule of Stable Diffusion (and of the synthetic prior)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class Guidance(ABC):
    """A frozen text-to-image diffusion model seen through the two calls SDS needs.

    ``encode`` maps renders in [0, 1] to the model's space and must stay differentiable (for a latent
    model, the VAE encoder is backpropagated). ``predict_noise`` runs under ``torch.no_grad``:
    the SDS gradient never flows through the diffusion network.
    """

    alphas_cumprod: torch.Tensor

    def to(self, device: torch.device) -> Guidance:
        """Move the model to ``device`` (where the field trains); returns ``self``."""
        return self

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @abstractmethod
    def encode(self, images: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        """``[B, 3, H, W]`` renders in [0, 1] → model inputs x_0, differentiable. ``progress`` (the
        share of the run done) lets a backend change encoding during the run."""

    @abstractmethod
    def predict_noise(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        views: ViewCondition | None,
        guidance_scale: float,
        textureless: bool = False,
        progress: float = 1.0,
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction for the run's prompt and, unless ``views`` is None (view-
        dependent conditioning off), each sample's view: a text model takes its label as a prompt suffix.

        ``textureless`` says the renders are shaded without albedo; a backend that can condition on it
        (the synthetic prior) does, others ignore it. ``progress`` (the share of the run done) is there
        for a backend that changes its answers during the run (the synthetic prior's mean warm-up).
        """
