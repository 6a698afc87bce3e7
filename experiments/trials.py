"""Trial changes to the SDS engine for one `dreamfusion` command, without changing the library.

The failure analysis in docs/benchmarks/README.md tries ideas that no setting expresses; each is a
patch here, so every number there comes from a command anyone can rerun:

    python experiments/trials.py clamp-x0 -- run "a house with a red door" --out DIR

Those numbers were measured under the defaults of their sessions, DreamFusion's view labels with
guidance 7.5 and a learned background; to rerun one as then, add ``--set
guidance.prior_conditioning=view_label --set sds.guidance_scale=7.5 --set field.background=learned``.

Trials (combine several by separating them with spaces before ``--``; those that patch the density
take their normals by autograd through the patch, as every run did before the analytic normals):

- ``camera-kernel``: a soft camera conditioning (``guidance.prior_conditioning=camera`` is the hard
  one): photo weights times a von Mises-Fisher kernel on the angle between cameras, width
  ``TRIAL_KERNEL_DEGREES`` (20), on top of the view labels.
- ``clamp-x0``: the guided x0 is clipped to the image range before it becomes a noise prediction.
- ``frozen-density``: the density gets no gradient for the first ``TRIAL_FROZEN_FRACTION`` (0.25) of
  the steps; pair it with ``--set render.albedo_warmup_fraction`` of the same value (normals need
  the density's gradient).
- ``blob-floor``: the blob's log-density bias is floored at ``-TRIAL_BLOB_FLOOR`` (1) instead of
  falling to -blob_density at the bounding sphere.
- ``true-shape``: the density is the ground truth's (synthetic prompts only); only colour learns.
- ``shaded-normals-only``: in lambertian and textureless steps the density reaches the loss through
  the normals only, not through the opacity (the compositing weights are detached there).
- ``posterior-temperature``: the denoiser's softmax over photos is tempered, its log-weights divided
  by ``TRIAL_TEMPERATURE`` (4) for the first ``TRIAL_TEMPERATURE_UNTIL`` (1) of the steps: a less
  peaked posterior, an average of several photos at every t (a huge temperature: the mean photo).
- ``local-posterior``: each pixel's x0 is its own posterior mean over the photos' pixels there, with
  weights from the ``TRIAL_PATCH`` x ``TRIAL_PATCH`` (9) patch around it (a locally consistent
  denoiser, Kamb & Ganguli 2024: what trained convolutional denoisers are found to compute, and
  how they make images no training photo holds).
- ``guidance-after-warmup``: the guidance scale drops to ``TRIAL_GUIDANCE_AFTER`` (1) once the
  synthetic prior's mean warm-up (``guidance.prior_mean_warmup_fraction``) is over.
- ``coarse-to-fine``: the hash grid starts with its ``TRIAL_START_LEVELS`` (2) coarsest levels; the
  others switch on one by one, evenly, until ``TRIAL_ALL_LEVELS_AT`` (0.5) of the steps.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

import dreamfusion.encoding as encoding_module
import dreamfusion.field as field_module
import dreamfusion.renderer as renderer_module
import dreamfusion.trainer as trainer_module
from dreamfusion.cli import main
from dreamfusion.guidance.synthetic import SyntheticGuidance
from dreamfusion.prior.shapes import SDFField, find_object
from dreamfusion.prior.synthetic import SyntheticPrior


def _normals_through_patches() -> None:
    """Normals by autograd through ``log_density_and_albedo``: the default analytic normals compute
    the density and its derivative on their own path, which would bypass a trial's patch of the density."""
    field_module.NeRFField.log_density_albedo_and_gradient = field_module.RadianceField.log_density_albedo_and_gradient


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _following_progress() -> dict[str, float]:
    """``{"now": share of the run done}`` during each training step, 1 outside them (evaluation and
    export after training see the finished run)."""
    progress = {"now": 1.0}
    train_step = trainer_module.Trainer._train_step

    def step(self):
        progress["now"] = self.progress
        try:
            return train_step(self)
        finally:
            progress["now"] = 1.0

    trainer_module.Trainer._train_step = step
    return progress


def camera_kernel() -> None:
    width = math.radians(_setting("TRIAL_KERNEL_DEGREES", 20.0))

    @torch.no_grad()
    def predict_noise(self, noisy, timesteps, views, guidance_scale, textureless=False, progress=1.0):
        prior, batch = self.prior, noisy.shape[0]
        flat = noisy.reshape(batch, -1)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()]
        kind = prior.textureless == textureless
        logits = prior.posterior_logits(flat, alpha_bar)
        if views is not None:  # with view-dependent conditioning off there is no camera either
            logits = logits + (views.directions() @ prior.directions.T - 1.0) / width**2
        condition = prior.candidates(self.prompt_id, views, batch, kind)
        conditional = prior.mean_over(logits, condition)
        unconditional = prior.mean_over(logits, kind.expand(batch, -1))
        x0 = unconditional + guidance_scale * (conditional - unconditional)
        noise = (flat - alpha_bar.sqrt()[:, None] * x0) / (1.0 - alpha_bar).sqrt()[:, None]
        return noise.reshape_as(noisy)

    SyntheticGuidance.predict_noise = predict_noise


def clamp_x0() -> None:
    predict_noise = SyntheticGuidance.predict_noise

    def clamped(self, noisy, timesteps, views, guidance_scale, textureless=False, progress=1.0):
        noise = predict_noise(self, noisy, timesteps, views, guidance_scale, textureless, progress)
        shape = (-1,) + (1,) * (noisy.dim() - 1)
        alpha_bar = self.alphas_cumprod[timesteps.cpu()].to(noisy).reshape(shape)
        x0 = ((noisy - (1.0 - alpha_bar).sqrt() * noise) / alpha_bar.sqrt()).clamp(-1.0, 1.0)
        return (noisy - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()

    SyntheticGuidance.predict_noise = clamped


def frozen_density() -> None:
    _normals_through_patches()
    fraction = _setting("TRIAL_FROZEN_FRACTION", 0.25)
    progress = _following_progress()
    log_density_and_albedo = field_module.NeRFField.log_density_and_albedo

    def patched(self, points):
        log_density, albedo = log_density_and_albedo(self, points)
        return (log_density.detach() if progress["now"] < fraction else log_density), albedo

    field_module.NeRFField.log_density_and_albedo = patched


def blob_floor() -> None:
    _normals_through_patches()
    floor = _setting("TRIAL_BLOB_FLOOR", 1.0)
    blob = field_module.NeRFField.blob
    field_module.NeRFField.blob = lambda self, points: blob(self, points).clamp_min(-floor)


def true_shape() -> None:
    _normals_through_patches()
    log_density_and_albedo = field_module.NeRFField.log_density_and_albedo
    truths: dict[str, SDFField] = {}
    trainer_init = trainer_module.Trainer.__init__

    def init(self, config, *args, **kwargs):
        truths["field"] = SDFField(find_object(config.prompt))
        trainer_init(self, config, *args, **kwargs)

    def patched(self, points):
        _, albedo = log_density_and_albedo(self, points)
        return truths["field"].log_density_and_albedo(points)[0], albedo

    trainer_module.Trainer.__init__ = init
    field_module.NeRFField.log_density_and_albedo = patched


def coarse_to_fine() -> None:
    _normals_through_patches()
    start, all_at = int(_setting("TRIAL_START_LEVELS", 2)), _setting("TRIAL_ALL_LEVELS_AT", 0.5)
    forward = encoding_module.HashGridEncoding.forward
    progress = _following_progress()

    def masked(self, points):
        features = forward(self, points)
        share = min(progress["now"] / all_at, 1.0)
        active = start + math.floor(share * (self.levels - start))
        mask = (torch.arange(self.levels, device=points.device) < active).to(features.dtype)
        return (features.reshape(-1, self.levels, self.features_per_level) * mask[:, None]).reshape(features.shape)

    encoding_module.HashGridEncoding.forward = masked


def shaded_normals_only() -> None:
    render = trainer_module.render
    density_from_log = renderer_module.density_from_log
    shaded = {"now": False}

    def patched_render(field, cameras, resolution, samples_per_ray, shading, *args, **kwargs):
        shaded["now"] = shading.needs_normals and torch.is_grad_enabled()
        try:
            return render(field, cameras, resolution, samples_per_ray, shading, *args, **kwargs)
        finally:
            shaded["now"] = False

    def density(log_density):
        sigma = density_from_log(log_density)
        return sigma.detach() if shaded["now"] else sigma

    trainer_module.render = patched_render
    renderer_module.density_from_log = density


def posterior_temperature() -> None:
    temperature, until = _setting("TRIAL_TEMPERATURE", 4.0), _setting("TRIAL_TEMPERATURE_UNTIL", 1.0)
    progress = _following_progress()
    posterior_logits = SyntheticPrior.posterior_logits

    def tempered(self, noisy, alpha_bar):
        logits = posterior_logits(self, noisy, alpha_bar)
        return logits / temperature if progress["now"] < until else logits

    SyntheticPrior.posterior_logits = tempered


def local_posterior() -> None:
    patch = int(_setting("TRIAL_PATCH", 9))

    def patch_sums(values: torch.Tensor) -> torch.Tensor:
        shape = values.shape
        summed = F.avg_pool2d(values.reshape(-1, 1, *shape[-2:]), patch, 1, patch // 2, count_include_pad=True)
        return summed.reshape(shape) * patch * patch

    exact = SyntheticGuidance.predictions

    @torch.no_grad()
    def predictions(self, flat, alpha_bar, views, guidance_scale, textureless=False, progress=1.0):
        if progress < self.mean_warmup_fraction:  # the mean photos: no patch changes a uniform posterior
            return exact(self, flat, alpha_bar, views, guidance_scale, textureless, progress)
        prior, batch, size = self.prior, flat.shape[0], self.prior.resolution
        kind = prior.textureless == textureless
        condition = prior.candidates(self.prompt_id, views, batch, kind, self.camera_neighbours)
        everything = prior.candidates(None, views if self.camera_neighbours else None, batch, kind,
                                      self.camera_neighbours)
        used = kind.nonzero().squeeze(1)
        photos = prior.flat[used].reshape(-1, 3, size, size)
        noisy = flat.reshape(batch, 3, size, size)
        cross = patch_sums(torch.einsum("bchw,nchw->bnhw", noisy, photos))
        energy = patch_sums((photos * photos).sum(1))
        sqrt_ab, ab = alpha_bar.sqrt()[:, None, None, None], alpha_bar[:, None, None, None]
        logits = (2.0 * sqrt_ab * cross - ab * energy[None]) / (2.0 * (1.0 - ab))

        def mean(mask):
            masked = logits.masked_fill(~mask[:, used, None, None], float("-inf"))
            return torch.einsum("bnhw,nchw->bchw", torch.softmax(masked, dim=1), photos).reshape(batch, -1)

        conditional, unconditional = mean(condition), mean(everything)
        return conditional, unconditional, unconditional + guidance_scale * (conditional - unconditional)

    SyntheticGuidance.predictions = predictions


def guidance_after_warmup() -> None:
    after = _setting("TRIAL_GUIDANCE_AFTER", 1.0)
    predict_noise = SyntheticGuidance.predict_noise

    def scheduled(self, noisy, timesteps, views, guidance_scale, textureless=False, progress=1.0):
        scale = guidance_scale if progress < self.mean_warmup_fraction else after
        return predict_noise(self, noisy, timesteps, views, scale, textureless, progress)

    SyntheticGuidance.predict_noise = scheduled


TRIALS = {
    "camera-kernel": camera_kernel,
    "clamp-x0": clamp_x0,
    "frozen-density": frozen_density,
    "blob-floor": blob_floor,
    "true-shape": true_shape,
    "coarse-to-fine": coarse_to_fine,
    "shaded-normals-only": shaded_normals_only,
    "posterior-temperature": posterior_temperature,
    "local-posterior": local_posterior,
    "guidance-after-warmup": guidance_after_warmup,
}


def run(argv: list[str]) -> int:
    if "--" not in argv:
        sys.exit(f"usage: python {sys.argv[0]} TRIAL [TRIAL ...] -- DREAMFUSION_ARGS; trials: {', '.join(TRIALS)}")
    split = argv.index("--")
    unknown = [name for name in argv[:split] if name not in TRIALS]
    if unknown or split == 0:
        sys.exit(f"unknown or missing trial {unknown}; choose from {', '.join(TRIALS)}")
    for name in argv[:split]:
        TRIALS[name]()
    return main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
