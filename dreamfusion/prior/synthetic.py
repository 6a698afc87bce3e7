"""The embedded synthetic prior: a finite image set and its exact DDPM posterior-mean denoiser.

For the finite set {x_i}, the denoiser of x_t = sqrt(ab) x + sqrt(1 - ab) eps is exactly
    x0_hat(x_t) = sum_i softmax_i(-||x_t - sqrt(ab) x_i||^2 / (2 (1 - ab))) x_i,
conditional on a prompt (and a view label) by restricting i to that prompt's (and label's) images.
No training and no weights: a true score of a true distribution, which makes SDS measurable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save_file

from dreamfusion.cameras import (
    VIEW_LABELS,
    CameraBatch,
    ViewCondition,
    camera_directions,
    cameras_from_angles,
    view_label,
)
from dreamfusion.config import CameraConfig, GuidanceConfig
from dreamfusion.prior.shapes import OBJECTS, SDFField, SyntheticObject, find_object, sdf_gradient, sphere_trace
from dreamfusion.renderer import Shading, render_batched, shade

log = logging.getLogger(__name__)

# How the prior's "photos" are lit: a light at the camera. Training's default shading matches it.
PHOTO_SHADING = Shading("lambertian", ambient=0.3, diffuse=0.7, textureless_albedo=0.75)
GROUND_TRUTH_SAMPLES = 160
SURFACE_SUPERSAMPLING = 3  # rays a pixel side in the surface photos
_SURFACE_CAMERAS_AT_ONCE = 16
_CACHE_FORMAT = 1
# The prior's own camera distribution, independent of any run's camera settings: a diffusion
# model's training photos do not change with the user's config either.
PRIOR_CAMERAS = CameraConfig()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAMFUSION_CACHE", Path.home() / ".cache" / "dreamfusion"))


def render_ground_truth(
    obj: SyntheticObject, cameras: CameraBatch, resolution: int, textureless: bool = False,
    backdrop: float = GuidanceConfig.prior_backdrop, photos: str = "volume",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour (or textureless) images ``[B, 3, R, R]`` and opacity ``[B, 1, R, R]`` of an object, drawn as
    ``photos`` says (``dreamfusion.config.PRIOR_PHOTO_KINDS``)."""
    if photos == "surface":
        colour, flat, coverage = render_surface_photos(obj, cameras, resolution, backdrop)
        return (flat if textureless else colour), coverage
    shading = replace(PHOTO_SHADING, mode="textureless" if textureless else "lambertian")
    out = render_batched(SDFField(obj, background=backdrop), cameras, resolution, GROUND_TRUTH_SAMPLES, shading)
    return out.rgb.clamp(0, 1), out.opacity


@torch.no_grad()
def render_surface_photos(obj: SyntheticObject, cameras: CameraBatch, resolution: int,
                          backdrop: float = GuidanceConfig.prior_backdrop
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour and textureless images ``[B, 3, R, R]`` and coverage ``[B, 1, R, R]`` of the object's true
    surface: ``SURFACE_SUPERSAMPLING``² rays a pixel sphere-traced onto ``sdf = 0``, shaded with the SDF's
    normal and the object's albedo as the volume photos are, and averaged (a box filter: edges antialiased
    as a rasterizer's coverage is)."""
    fine = resolution * SURFACE_SUPERSAMPLING
    colours, flats, coverages = [], [], []
    for start in range(0, len(cameras), _SURFACE_CAMERAS_AT_ONCE):
        part = cameras.slice(start, start + _SURFACE_CAMERAS_AT_ONCE).to("cpu")
        points, hit = sphere_trace(obj, part, fine)
        _, gradient = sdf_gradient(obj, points[hit])
        normals = (gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
        pixels_per_camera = fine * fine
        light = part.light_directions.float().repeat_interleave(pixels_per_camera, dim=0)[hit]
        albedo = obj.albedo(points[hit].float()).float()
        for mode, out in (("lambertian", colours), ("textureless", flats)):
            shaded = shade(albedo, normals, light, replace(PHOTO_SHADING, mode=mode)).clamp(0, 1)
            out.append(_pixels(shaded, hit, backdrop, len(part), fine))
        coverages.append(_pixels(torch.ones(int(hit.sum()), 1), hit, 0.0, len(part), fine))
    device = cameras.positions.device
    return (torch.cat(colours).to(device), torch.cat(flats).to(device), torch.cat(coverages).to(device))


def _pixels(values: torch.Tensor, hit: torch.Tensor, fill: float, cameras: int, fine: int) -> torch.Tensor:
    """``[B, C, R, R]`` images from the ``values`` of the supersampled rays that ``hit``, ``fill`` elsewhere."""
    full = torch.full((len(hit), values.shape[-1]), fill)
    full[hit] = values
    full = full.reshape(cameras, fine, fine, -1).permute(0, 3, 1, 2)
    return F.avg_pool2d(full, SURFACE_SUPERSAMPLING)


def prior_cameras(object_index: int, views: int, front_bias: float) -> CameraBatch:
    """Front-biased cameras for one object's photos, deterministic per object."""
    generator = torch.Generator().manual_seed(7919 * (object_index + 1))
    cfg = PRIOR_CAMERAS

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(views, generator=generator)

    half_front = cfg.front_angle / 2
    is_front = torch.rand(views, generator=generator) < front_bias
    azimuth = torch.where(is_front, uniform(-half_front, half_front), uniform(-180.0, 180.0))
    sin_low, sin_high = (math.sin(math.radians(e)) for e in cfg.elevation_range)
    elevation = torch.rad2deg(torch.asin(uniform(sin_low, sin_high)))
    return cameras_from_angles(azimuth, elevation, uniform(*cfg.radius_range), uniform(*cfg.fov_range))


@dataclass(frozen=True)
class PriorSpec:
    resolution: int = GuidanceConfig.prior_resolution
    views: int = GuidanceConfig.prior_views
    front_bias: float = GuidanceConfig.front_bias
    backdrop: float = GuidanceConfig.prior_backdrop  # grey behind the objects in the photos and the ground truth
    photos: str = GuidanceConfig.prior_photos  # how the photos are drawn: one of PRIOR_PHOTO_KINDS

    def cache_key(self) -> str:
        spec = asdict(self)
        payload = {
            "format": _CACHE_FORMAT,
            "spec": spec,
            "cameras": asdict(PRIOR_CAMERAS),
            "shading": asdict(PHOTO_SHADING),
            "samples": GROUND_TRUTH_SAMPLES,
            "prompts": [obj.prompt for obj in OBJECTS],
        }
        if self.photos == "volume":
            del spec["photos"]  # the key volume photos had before surface photos existed: caches stay valid
        else:
            payload["supersampling"] = SURFACE_SUPERSAMPLING
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build_images(spec: PriorSpec, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The prior's photo set, from the on-disk cache or rendered (then cached) on first use."""
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"synthetic-prior-{spec.cache_key()}.safetensors"
    if path.exists():
        try:
            return load(path.read_bytes())  # read, not mmap: a file swapped underneath cannot fault
        except Exception:  # a truncated cache is rebuilt, never trusted
            log.warning("synthetic prior cache %s is unreadable; rebuilding it", path)
    log.info("rendering the synthetic prior's ground-truth views once (cached in %s)", cache_dir)
    images, prompt_ids, azimuths, elevations, textureless = [], [], [], [], []
    for index, obj in enumerate(OBJECTS):
        cameras = prior_cameras(index, spec.views, spec.front_bias)
        if spec.photos == "surface":  # one trace draws both kinds
            colour, flat_colour, _ = render_surface_photos(obj, cameras, spec.resolution, spec.backdrop)
            kinds = {False: colour, True: flat_colour}
        else:
            kinds = {flat: render_ground_truth(obj, cameras, spec.resolution, flat, spec.backdrop)[0]
                     for flat in (False, True)}
        for flat in (False, True):
            images.append(kinds[flat].to(torch.float16))
            prompt_ids.append(torch.full((spec.views,), index))
            azimuths.append(cameras.azimuth_degrees)
            elevations.append(cameras.elevation_degrees)
            textureless.append(torch.full((spec.views,), flat))
    data = {
        "images": torch.cat(images).contiguous(),
        "prompt_ids": torch.cat(prompt_ids),
        "azimuth_degrees": torch.cat(azimuths).float(),
        "elevation_degrees": torch.cat(elevations).float(),
        "textureless": torch.cat(textureless),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".partial", delete=False) as handle:
            tmp = Path(handle.name)
        save_file(data, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the synthetic prior in %s (%s); it will be rendered again next time",
                    cache_dir, exc)
    return data


class SyntheticPrior:
    """The closed-form denoiser and the Bayes classifiers over the prior's photo set."""

    def __init__(self, spec: PriorSpec = PriorSpec(), camera_config: CameraConfig | None = None,
                 cache_dir: Path | None = None) -> None:
        self.spec = spec
        data = load_or_build_images(spec, cache_dir)
        labels_config = camera_config or PRIOR_CAMERAS
        self.images = data["images"].float()
        self.flat = self.images.reshape(self.images.shape[0], -1) * 2.0 - 1.0
        self.square_norms = (self.flat * self.flat).sum(-1)
        self.prompt_ids = data["prompt_ids"].long()
        self.textureless = data["textureless"].bool()
        self.directions = camera_directions(data["azimuth_degrees"], data["elevation_degrees"])
        self.view_ids = torch.tensor(
            [
                VIEW_LABELS.index(view_label(float(a), float(e), labels_config.front_angle,
                                             labels_config.overhead_elevation))
                for a, e in zip(data["azimuth_degrees"], data["elevation_degrees"], strict=True)
            ]
        )

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    def candidates(
        self, prompt_id: int | None, views: ViewCondition | None, batch: int, kind: torch.Tensor | None = None,
        camera_neighbours: int = 0,
    ) -> torch.Tensor:
        """``[B, N]`` mask of the photos a condition ranges over: the prompt's (every prompt's for None), of
        one ``kind`` (an ``[N]`` mask: colour or textureless photos), narrowed when ``views`` are given to
        each render's view label or, with ``camera_neighbours``, to each prompt's that many photos whose
        cameras are nearest the render's."""
        allowed = self._allowed(prompt_id, kind)
        if views is None:
            return allowed.expand(batch, -1)
        if camera_neighbours:
            return self._nearest_photos(views, allowed, camera_neighbours)
        return self.label_candidates(prompt_id, views.labels, kind)

    def label_candidates(self, prompt_id: int | None, labels: list[str], kind: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """``[len(labels), N]`` mask of the photos of a condition given by view labels alone (a text such
        as "..., back view"), one row per label; see ``candidates``."""
        allowed = self._allowed(prompt_id, kind)
        rows = []
        for label in labels:
            mask = allowed & (self.view_ids == VIEW_LABELS.index(label))
            rows.append(mask if bool(mask.any()) else allowed)  # a label without photos: the whole prompt
        return torch.stack(rows)

    def _allowed(self, prompt_id: int | None, kind: torch.Tensor | None) -> torch.Tensor:
        allowed = torch.ones_like(self.prompt_ids, dtype=torch.bool) if kind is None else kind.to(self.flat.device)
        return allowed if prompt_id is None else allowed & (self.prompt_ids == prompt_id)

    def _nearest_photos(self, views: ViewCondition, allowed: torch.Tensor, count: int) -> torch.Tensor:
        cosines = views.directions().to(self.directions) @ self.directions.T
        # One sort for every prompt at once, with no host sync (this runs every step): by prompt, then
        # by nearness (cosines lie in [-1, 1], so 4 apart per prompt keeps prompts apart); a photo is
        # chosen when its rank within its prompt's allowed photos is below ``count``.
        key = (self.prompt_ids * 4.0 - cosines).masked_fill(~allowed, float("inf"))
        order = key.argsort(dim=-1)
        per_prompt = torch.zeros(len(OBJECTS), dtype=torch.long, device=allowed.device)
        per_prompt.scatter_add_(0, self.prompt_ids, allowed.long())
        first = per_prompt.cumsum(0) - per_prompt
        sorted_prompts = self.prompt_ids[order]
        rank = torch.arange(order.shape[-1], device=order.device) - first[sorted_prompts]
        return torch.zeros_like(cosines, dtype=torch.bool).scatter_(1, order, (rank < count) & allowed[order])

    def to(self, device: torch.device) -> SyntheticPrior:
        """Keep the photo set where the renders are (the GPU when training there)."""
        for name in ("images", "flat", "square_norms", "prompt_ids", "textureless", "view_ids", "directions"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def posterior_logits(self, noisy: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` log-weights of every photo as x_0 given x_t (up to a constant per row); ``noisy`` is
        ``[B, D]`` in the model's [-1, 1] space."""
        device = self.flat.device
        noisy, alpha_bar = noisy.to(device), alpha_bar.to(device)
        distance = (
            (noisy * noisy).sum(-1, keepdim=True)
            - 2.0 * alpha_bar.sqrt()[:, None] * noisy @ self.flat.T
            + alpha_bar[:, None] * self.square_norms[None]
        )
        return -distance / (2.0 * (1.0 - alpha_bar[:, None]))

    def mean_over(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The photos' mean under softmax weights ``logits`` restricted to ``mask``: one set of
        ``posterior_logits`` serves every condition (conditional and unconditional) of a step."""
        weights = torch.softmax(logits.masked_fill(~mask.to(logits.device), float("-inf")), dim=-1)
        return weights @ self.flat

    def posterior_mean(self, noisy: torch.Tensor, alpha_bar: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] over the masked images."""
        return self.mean_over(self.posterior_logits(noisy, alpha_bar), mask)

    def _log_likelihoods(self, images: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
        x = images.to(self.flat.device).reshape(images.shape[0], -1) * 2.0 - 1.0
        distance = (x * x).sum(-1, keepdim=True) - 2.0 * x @ self.flat.T + self.square_norms[None]
        logits = -distance / (2.0 * sigma * sigma)
        return logits.masked_fill(~mask[None], float("-inf"))

    def classify_prompts(self, images: torch.Tensor, textureless: bool = False, sigma: float = 0.5) -> torch.Tensor:
        """Bayes posterior p(prompt | image) ``[B, P]`` under a Gaussian kernel around each photo."""
        kind = self.textureless == textureless
        logits = self._log_likelihoods(images, kind, sigma)
        per_prompt = []
        for prompt_id in range(len(OBJECTS)):
            members = kind & (self.prompt_ids == prompt_id)
            per_prompt.append(torch.logsumexp(logits[:, members], dim=-1) - math.log(int(members.sum())))
        return torch.softmax(torch.stack(per_prompt, dim=-1), dim=-1).cpu()

    def classify_views(self, images: torch.Tensor, prompt_id: int, sigma: float = 0.5) -> list[str]:
        """Most probable view label of each colour image among one prompt's photos."""
        members = (self.prompt_ids == prompt_id) & ~self.textureless
        logits = self._log_likelihoods(images, members, sigma)
        scores = []
        for index in range(len(VIEW_LABELS)):
            label_members = members & (self.view_ids == index)
            if bool(label_members.any()):
                scores.append(torch.logsumexp(logits[:, label_members], -1) - math.log(int(label_members.sum())))
            else:
                scores.append(torch.full((images.shape[0],), float("-inf")))
        best = torch.stack(scores, dim=-1).argmax(-1)
        return [VIEW_LABELS[int(i)] for i in best]


def prompt_index(prompt: str) -> int:
    obj = find_object(prompt)
    return next(i for i, o in enumerate(OBJECTS) if o.prompt == obj.prompt)
