"""SDS guidance by the embedded synthetic prior (no weights, runs anywhere)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfusion.cameras import ViewCondition
from dreamfusion.config import Config
from dreamfusion.guidance.base import Guidance, scaled_linear_alphas_cumprod
from dreamfusion.prior.synthetic import PriorSpec, SyntheticPrior, prompt_index


class SyntheticGuidance(Guidance):
    def __init__(self, config: Config, cache_dir: Path | None = None, prior: SyntheticPrior | None = None) -> None:
        self.prompt_id = prompt_index(config.prompt)
        g = config.guidance
        spec = PriorSpec(g.prior_resolution, g.prior_views, g.front_bias, g.prior_backdrop)
        self.prior = prior or SyntheticPrior(spec, config.camera, cache_dir)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.camera_neighbours = g.prior_camera_neighbours if g.prior_conditioning == "camera" else 0
        self.mean_warmup_fraction = g.prior_mean_warmup_fraction

    def to(self, device: torch.device) -> SyntheticGuidance:
        self.prior.to(device)
        return self

    def encode(self, images: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        size = self.prior.resolution
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images * 2.0 - 1.0

    @torch.no_grad()
    def predictions(
        self, flat: torch.Tensor, alpha_bar: torch.Tensor, views: ViewCondition | None, guidance_scale: float,
        textureless: bool = False, progress: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditional, unconditional and classifier-free-guided x0 of noisy ``[B, D]`` images; during
        the mean warm-up (``progress`` below ``guidance.prior_mean_warmup_fraction``) the posterior at
        infinite noise, each condition's mean photo, whatever the render."""
        batch = flat.shape[0]
        # Colour renders are judged against colour photos, textureless renders against textureless ones:
        # otherwise a grey render matches the prompt's textureless photos and colour is never learned.
        kind = self.prior.textureless == textureless
        condition = self.prior.candidates(self.prompt_id, views, batch, kind, self.camera_neighbours)
        # A camera-conditioned model keeps the camera when the prompt is dropped (MVDream's guidance);
        # a view label is part of the prompt and goes with it.
        unconditional_views = views if self.camera_neighbours else None
        everything = self.prior.candidates(None, unconditional_views, batch, kind, self.camera_neighbours)
        if progress < self.mean_warmup_fraction:
            # A finite photo set's posterior is one-hot at every t in thousands of dimensions, so it picks
            # the photo nearest the render: early on, a blob's nearest photo is a roof-filled view from above
            # and the object follows it. A trained model's high-noise answer is the condition's mean image.
            logits = torch.zeros(batch, self.prior.flat.shape[0], device=self.prior.flat.device)
        else:
            logits = self.prior.posterior_logits(flat, alpha_bar)
        conditional = self.prior.mean_over(logits, condition)
        unconditional = self.prior.mean_over(logits, everything)
        return conditional, unconditional, unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def predict_noise(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        views: ViewCondition | None,
        guidance_scale: float,
        textureless: bool = False,
        progress: float = 1.0,
    ) -> torch.Tensor:
        batch = noisy.shape[0]
        flat = noisy.reshape(batch, -1)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()].to(noisy.device)
        _, _, x0 = self.predictions(flat, alpha_bar, views, guidance_scale, textureless, progress)
        sqrt_ab = alpha_bar.sqrt()[:, None]
        noise = (flat - sqrt_ab * x0) / (1.0 - alpha_bar).sqrt()[:, None]
        return noise.reshape_as(noisy)
