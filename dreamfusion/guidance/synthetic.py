"""SDS guidance by the embedded synthetic prior (no weights, runs anywhere)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfusion.cameras import VIEW_LABELS, ViewCondition
from dreamfusion.config import Config
from dreamfusion.errors import UserInputError
from dreamfusion.guidance.base import Guidance, scaled_linear_alphas_cumprod
from dreamfusion.prior.shapes import find_object
from dreamfusion.prior.synthetic import PriorSpec, SyntheticPrior, prompt_index
from dreamfusion.sds import guided, negative_text, perp_neg_views, view_weights

_VIEW_SUFFIX = re.compile(r",\s*(" + "|".join(VIEW_LABELS) + r") view$")


def prior_condition(text: str) -> tuple[int, str | None]:
    """A text the synthetic prior can condition on: one of its prompts, optionally followed by a view suffix
    (", back view"); returns the prompt's index and the view label (None without a suffix)."""
    suffix = _VIEW_SUFFIX.search(text.strip())
    label = suffix.group(1) if suffix else None
    prompt = text.strip()[: suffix.start()] if suffix else text.strip()
    try:
        return prompt_index(find_object(prompt).prompt), label
    except UserInputError as exc:
        raise UserInputError(f"sds.negative_prompt '{text}' is not a condition the synthetic prior knows ({exc}); "
                             "name one of its prompts, optionally with ', front view' (or side, back, "
                             "overhead), e.g. '{prompt}, front view'") from None


class SyntheticGuidance(Guidance):
    def __init__(self, config: Config, cache_dir: Path | None = None, prior: SyntheticPrior | None = None) -> None:
        self.prompt_id = prompt_index(config.prompt)
        g = config.guidance
        spec = PriorSpec(g.prior_resolution, g.prior_views, g.front_bias, g.prior_backdrop, g.prior_photos)
        self.prior = prior or SyntheticPrior(spec, config.camera, cache_dir)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.camera_neighbours = g.prior_camera_neighbours if g.prior_conditioning == "camera" else 0
        self.mean_warmup_fraction = g.prior_mean_warmup_fraction
        self.sds = config.sds
        self.overhead_elevation = config.camera.overhead_elevation
        negative = negative_text(config.sds.negative_prompt, config.prompt)
        self.negative = prior_condition(negative) if negative else None

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
        # Perp-Neg passes views for its negatives even without view-dependent conditioning of the positive.
        positive_views = views if self.sds.view_dependent else None
        condition = self.prior.candidates(self.prompt_id, positive_views, batch, kind, self.camera_neighbours)
        # A camera-conditioned model keeps the camera when the prompt is dropped (MVDream's guidance);
        # a view label is part of the prompt and goes with it.
        unconditional_views = positive_views if self.camera_neighbours else None
        if self.negative is not None:
            prompt_id, label = self.negative
            everything = (self.prior.candidates(prompt_id, None, batch, kind) if label is None
                          else self.prior.label_candidates(prompt_id, [label] * batch, kind))
        else:
            everything = self.prior.candidates(None, unconditional_views, batch, kind, self.camera_neighbours)
        if progress < self.mean_warmup_fraction:
            # A finite photo set's posterior is one-hot at every t in thousands of dimensions, so it picks
            # the photo nearest the render: early on, a blob's nearest photo is a roof-filled view from above
            # and the object follows it. A trained model's high-noise answer is the condition's mean image.
            logits = torch.zeros(batch, self.prior.flat.shape[0], device=self.prior.flat.device)
        else:
            logits = self.prior.posterior_logits(flat, alpha_bar)
        unconditional = self.prior.mean_over(logits, everything)
        interpolated = positive_views is not None and self.sds.view_embedding == "interpolated"
        if not (interpolated or (self.sds.perp_neg and views is not None)):
            conditional = self.prior.mean_over(logits, condition)
            return conditional, unconditional, guided(unconditional, conditional, guidance_scale)
        # The prior's analogue of blending text embeddings: blending the view labels' posterior means.
        per_label = torch.stack([self.prior.mean_over(logits, self.prior.label_candidates(
            self.prompt_id, [label] * batch, kind)) for label in VIEW_LABELS], dim=1)  # [B, 4, D]
        if interpolated:
            weights = view_weights(positive_views, True, self.overhead_elevation).to(per_label)
            conditional = torch.einsum("bl,bld->bd", weights, per_label)
        else:
            conditional = self.prior.mean_over(logits, condition)
        if not (self.sds.perp_neg and views is not None):
            return conditional, unconditional, guided(unconditional, conditional, guidance_scale)
        negatives, strengths = perp_neg_views(views, self.sds.perp_neg_weight * guidance_scale,
                                              self.sds.perp_neg_front_decay, self.sds.perp_neg_side_decay)
        negative_means = torch.einsum("bkl,bld->bkd", negatives.to(per_label), per_label)
        return conditional, unconditional, guided(unconditional, conditional, guidance_scale, negative_means,
                                                  strengths.to(per_label))

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
