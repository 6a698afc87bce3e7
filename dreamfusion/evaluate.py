"""Quality of a result for a synthetic prompt, where the 3D truth is known.

- silhouette IoU and PSNR against ground truth at held-out cameras (not among the prior's photos);
- R-precision: the share of renders whose most probable prompt under the prior's Bayes classifier
  p(prompt | image) is the run's prompt (DreamFusion's protocol, this classifier in CLIP's place),
  on colour renders and on textureless renders;
- for objects with a front: Janus rate (back views classified as front views) and front recall
  (front views classified as front views);
- ``normal_error_deg``: the rendered normals against the true surface's (``dreamfusion.geometry``, which
  also scores the exported mesh in 3D: ``chamfer``, ``fscore``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from dreamfusion.cameras import CameraBatch, cameras_from_angles
from dreamfusion.config import ExportConfig
from dreamfusion.field import RadianceField
from dreamfusion.geometry import level_set_silhouettes, normal_error_from_render, truth_surface
from dreamfusion.prior.shapes import find_object
from dreamfusion.prior.synthetic import PHOTO_SHADING, SyntheticPrior, prompt_index, render_ground_truth
from dreamfusion.renderer import OccupancyGrid, RenderOutput, Shading, ViewRenderer, render_batched_shadings

EVAL_RESOLUTION = ExportConfig.eval_resolution
EVAL_SAMPLES = ExportConfig.eval_samples_per_ray
# The metrics a run reports that fall as it improves; every other one grows.
LOWER_IS_BETTER = ("loss", "sds_loss", "janus_rate", "chamfer", "normal_error_deg")


def held_out_cameras() -> CameraBatch:
    """16 fixed views on two rings, offset from each other; the prior's photos are random views."""
    azimuth = torch.cat([torch.arange(8) * 45.0 + 10.0, torch.arange(8) * 45.0 + 32.5])
    elevation = torch.cat([torch.full((8,), 10.0), torch.full((8,), 35.0)])
    count = azimuth.shape[0]
    return cameras_from_angles(azimuth, elevation, torch.full((count,), 2.2), torch.full((count,), 45.0))


def _ring(azimuths: list[float], elevation: float = 15.0) -> CameraBatch:
    count = len(azimuths)
    return cameras_from_angles(torch.tensor(azimuths), torch.full((count,), elevation),
                               torch.full((count,), 2.2), torch.full((count,), 45.0))


def front_cameras() -> CameraBatch:
    return _ring([-30.0, -15.0, 0.0, 15.0, 30.0])


def back_cameras() -> CameraBatch:
    return _ring([150.0, 165.0, 180.0, 195.0, 210.0])


def _render(views: ViewRenderer, cameras: CameraBatch, modes: tuple[str, ...], resolution: int
            ) -> list[RenderOutput]:
    """The photos' shading in each of ``modes``, from one render."""
    return views(cameras, resolution, tuple(replace(PHOTO_SHADING, mode=mode) for mode in modes))


def _downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def silhouette_iou(opacity: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> float:
    mine, theirs = opacity > threshold, truth > threshold
    union = (mine | theirs).sum()
    return float((mine & theirs).sum() / union) if union > 0 else 1.0


def evaluate_field(field: RadianceField, prompt: str, prior: SyntheticPrior,
                   occupancy: OccupancyGrid | None = None, resolution: int = EVAL_RESOLUTION,
                   samples: int = EVAL_SAMPLES) -> dict[str, float]:
    """Metrics of ``field``; an occupancy grid (the trainer's) only skips empty space, faster."""
    def views(cameras: CameraBatch, size: int, shadings: tuple[Shading, ...]) -> list[RenderOutput]:
        return render_batched_shadings(field, cameras, size, samples, shadings, occupancy)

    return evaluate_views(views, prompt, prior, resolution)


def evaluate_views(views: ViewRenderer, prompt: str, prior: SyntheticPrior, resolution: int = EVAL_RESOLUTION
                   ) -> dict[str, float]:
    """Metrics of what ``views`` renders (the field, or the refined mesh)."""
    obj = find_object(prompt)
    target = prompt_index(prompt)
    cameras = held_out_cameras()
    lit, shadeless = _render(views, cameras, ("lambertian", "textureless"), resolution)
    colour, opacity, textureless = lit.rgb.clamp(0, 1), lit.opacity, shadeless.rgb.clamp(0, 1)
    truth_colour, truth_opacity = render_ground_truth(obj, cameras, resolution, backdrop=prior.spec.backdrop)

    size = prior.resolution
    colour_guess = prior.classify_prompts(_downsample(colour, size)).argmax(-1)
    textureless_guess = prior.classify_prompts(_downsample(textureless, size), textureless=True).argmax(-1)
    metrics = {
        "silhouette_iou": silhouette_iou(opacity, truth_opacity),
        "psnr": psnr(colour, truth_colour),
        "r_precision_colour": float((colour_guess == target).float().mean()),
        "r_precision_textureless": float((textureless_guess == target).float().mean()),
        **normal_error_from_render(obj.prompt, cameras, resolution, lit.normals, opacity),
    }
    if obj.has_front:
        [back] = _render(views, back_cameras(), ("lambertian",), resolution)
        [front] = _render(views, front_cameras(), ("lambertian",), resolution)
        back_labels = prior.classify_views(_downsample(back.rgb.clamp(0, 1), size), target)
        front_labels = prior.classify_views(_downsample(front.rgb.clamp(0, 1), size), target)
        metrics["janus_rate"] = sum(label == "front" for label in back_labels) / len(back_labels)
        metrics["front_recall"] = sum(label == "front" for label in front_labels) / len(front_labels)
    return metrics


@lru_cache(maxsize=16)
def truth_silhouette_iou(prompt: str, resolution: int = EVAL_RESOLUTION) -> float:
    """The ``silhouette_iou`` of a result exactly on the true surface: the sphere-traced silhouettes against the
    ground truth's at the held-out cameras. Below 1 (0.87-0.93 on the objects here) because the ground truth
    is the volume photos' soft density, grown by ``photos_surface_offset``: a mesh's IoU is read against it."""
    cameras = held_out_cameras()
    _, opacity = render_ground_truth(find_object(prompt), cameras, resolution)
    return silhouette_iou(level_set_silhouettes(prompt, cameras, resolution, 0.0), opacity)


@lru_cache(maxsize=16)
def photos_surface_offset(prompt: str, resolution: int = EVAL_RESOLUTION, photos: str = "volume") -> float:
    """How far outside the true surface the prior's photos (drawn as ``photos`` says) show ``prompt``'s object,
    as a share of its bounding radius: the offset δ of the level set ``sdf = δ`` whose silhouettes at the
    held-out cameras cover as many pixels as the photos' (opacity above one half).

    Volume photos render a soft density around the surface (VolSDF's, ``SDFField``), opaque a few of its
    widths outside it on rays that graze it. A result that reproduced the photos exactly would lie about δ
    from the true surface, so its Chamfer (a share of the same radius) would be about δ: what learning these
    photos well gives, not the truth. Surface photos show the surface itself (δ ≈ 0)."""
    cameras = held_out_cameras()
    _, opacity = render_ground_truth(find_object(prompt), cameras, resolution, photos=photos)
    pixels = float((opacity > 0.5).sum())
    low, high = -0.1, 0.1
    for _ in range(16):  # about 3e-6 in the end; the pixel count grows with the offset
        middle = 0.5 * (low + high)
        if float(level_set_silhouettes(prompt, cameras, resolution, middle).sum()) < pixels:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high) / truth_surface(prompt).radius
