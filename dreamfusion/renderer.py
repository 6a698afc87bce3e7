"""Volume rendering inside the unit bounding sphere: sampling, occupancy skipping, shading, compositing."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dreamfusion.cameras import CameraBatch, generate_rays
from dreamfusion.field import RadianceField, density_from_log
from triton_kernels import composite, march_rays, occupancy_update
from triton_kernels import resolve as resolve_backend
from triton_kernels.composite import STOP_TRANSMITTANCE, transmittance
from triton_kernels.march import PackedSamples

SHADING_MODES = ("albedo", "lambertian", "textureless")


@dataclass
class Shading:
    mode: str = "lambertian"
    ambient: float = 0.3
    diffuse: float = 0.7
    textureless_albedo: float = 0.75

    def __post_init__(self) -> None:
        if self.mode not in SHADING_MODES:
            raise ValueError(f"unknown shading mode '{self.mode}'; choose one of {', '.join(SHADING_MODES)}")

    @property
    def needs_normals(self) -> bool:
        return self.mode != "albedo"


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B, 3, H, W] in [0, 1]
    opacity: torch.Tensor  # [B, 1, H, W]
    depth: torch.Tensor  # [B, 1, H, W]
    normals: torch.Tensor | None  # [B, 3, H, W] world-space, composited; None when not computed
    orientation_loss: torch.Tensor  # scalar
    samples_evaluated: int  # samples composited (in training: evaluated with gradients)
    samples_total: int  # the dense march's samples
    samples_probed: int = 0  # samples the density-only early-termination pass evaluated


# What exports and metrics render with: ``(cameras, resolution, shadings) -> [RenderOutput per shading]``,
# without gradients, on the CPU whatever device rendered them: a field marched (``export.field_views``) or
# the run's result (``Trainer.render_views``, its refined mesh once stage 2 has begun).
ViewRenderer = Callable[[CameraBatch, int, tuple[Shading, ...]], list[RenderOutput]]


class OccupancyGrid(nn.Module):
    """A coarse grid of density over [-1, 1]^3; samples in empty cells are never sent to the field.

    Each update takes the density at one random point per cell and keeps ``max(decay * old, new)``.
    A cell is occupied when its density exceeds a threshold that follows the field: the grid's mean
    density (as Instant-NGP and stable-dreamfusion clip it), capped at the density whose optical
    thickness over one march step is ``min_optical_thickness`` (a sample that would make the ray
    lose less light than that is not worth evaluating). The occupied set is dilated by one cell so
    surfaces stay free to grow into neighbouring space.
    """

    def __init__(self, resolution: int, min_optical_thickness: float, step_size: float, decay: float = 0.95) -> None:
        super().__init__()
        self.resolution = resolution
        self.density_cap = min_optical_thickness / step_size
        self.decay = decay
        self.register_buffer("density", torch.full((resolution,) * 3, float("inf")))
        self.register_buffer("occupied", torch.ones((resolution,) * 3, dtype=torch.bool))

    @torch.no_grad()
    def update(self, field: RadianceField, generator: torch.Generator, backend: str = "auto",
               decay: float | None = None) -> None:
        decay = self.decay if decay is None else decay
        r = self.resolution
        axis = torch.arange(r, dtype=torch.float32, device=self.density.device)
        cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        # Random numbers come from the trainer's CPU generator on every device: one seed, one run.
        points = (cells + torch.rand(cells.shape, generator=generator).to(cells.device)) / r * 2.0 - 1.0
        log_density, _ = field.log_density_and_albedo(points)
        inside = (points.norm(dim=-1) <= 1.0 + 2.0 / r).reshape(r, r, r)
        fresh = torch.where(inside, density_from_log(log_density).reshape(r, r, r), 0.0)
        previous = torch.where(torch.isinf(self.density), 0.0, self.density)
        # The threshold follows the density this update leaves: the mean over the bounding sphere's cells.
        mean = torch.maximum(previous * decay, fresh)[inside].mean()
        threshold = float(torch.clamp(mean, max=self.density_cap))
        updated, above = occupancy_update(
            self.density, fresh, decay, threshold, resolve_backend(backend, self.density.device)
        )
        self.density.copy_(updated)
        dense = above.float()[None, None]
        self.occupied.copy_(F.max_pool3d(dense, kernel_size=3, stride=1, padding=1)[0, 0] > 0)

    @torch.no_grad()
    def refresh(self, field: RadianceField, generator: torch.Generator, backend: str = "auto",
                samples: int = 4) -> None:
        """The grid as the field stands now: the most of ``samples`` random points per cell, with none of the
        decayed memory of earlier fields (which, early in training, still holds the initial blob)."""
        self.density.zero_()
        for _ in range(samples):
            self.update(field, generator, backend, decay=1.0)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Whether each of ``points`` ``[N, 3]`` lies in an occupied cell (the cell rule of ``march_rays``)."""
        r = self.resolution
        cell = ((points + 1.0) * 0.5 * r).long().clamp(0, r - 1)
        return self.occupied[cell[:, 0], cell[:, 1], cell[:, 2]]

    @property
    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or buffers) live; the CPU for one that has none (an analytic SDF)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def render(
    field: RadianceField,
    cameras: CameraBatch,
    resolution: int,
    samples_per_ray: int,
    shading: Shading,
    occupancy: OccupancyGrid | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    deferred: bool = False,
) -> RenderOutput:
    """Render a batch of cameras. With a generator, sample positions are jittered (training).

    ``backend`` picks the ray-marching and compositing kernels (``triton_kernels.resolve``).
    ``deferred`` (inference only) shades each pixel once, with the normal at its expected surface point,
    instead of each sample: one normal per pixel rather than per sample, for exports and previews.
    """
    return render_shadings(field, cameras, resolution, samples_per_ray, (shading,), occupancy, generator, backend,
                           deferred)[0]


def render_shadings(
    field: RadianceField,
    cameras: CameraBatch,
    resolution: int,
    samples_per_ray: int,
    shadings: tuple[Shading, ...],
    occupancy: OccupancyGrid | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    deferred: bool = False,
) -> list[RenderOutput]:
    """``render`` in several shadings from one march: the field is evaluated once, and only the colour each
    sample (or, ``deferred``, each pixel) composites differs between them."""
    if deferred and any(shading.needs_normals for shading in shadings):
        surface = render_surface(field, cameras, resolution, samples_per_ray, occupancy, backend)
        return [surface.shade(shading, len(cameras), resolution) if shading.needs_normals else surface.albedo
                for shading in shadings]
    batch = len(cameras)
    device = module_device(field)
    cameras = cameras.to(device)
    origins, directions = generate_rays(cameras, resolution)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    rays = origins.shape[0]
    ray_camera = torch.arange(batch, device=device).repeat_interleave(resolution * resolution)

    # Ray/unit-sphere intersection.
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - 1.0
    disc = b * b - c
    hit = disc > 0
    root = disc.clamp_min(0).sqrt()
    near = (-b - root).clamp_min(0.0)
    far = torch.where(hit, -b + root, near)

    if generator is not None:
        offsets = torch.rand(rays, samples_per_ray, generator=generator).to(device)
    else:
        offsets = torch.full((rays, samples_per_ray), 0.5, device=device)
    kernel_backend = resolve_backend(backend, origins.device)
    samples = march_rays(
        origins, directions, near, far, offsets, occupancy.occupied if occupancy is not None else None, kernel_backend
    )
    step = (far - near) / samples_per_ray
    needs_normals = any(shading.needs_normals for shading in shadings)
    probed = 0
    evaluated = None
    if occupancy is not None:
        reached, log_density, albedo, probed = _march_until_spent(field, samples, step[samples.ray])
        samples = samples.select(reached)
        if not needs_normals and not torch.is_grad_enabled():
            evaluated = log_density, albedo  # inference needs nothing more of the field
    sample_ray = samples.ray

    normals = None
    if needs_normals:
        log_density, albedo, gradient = field.log_density_albedo_and_gradient(samples.points)
        normals = -gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    elif evaluated is not None:
        log_density, albedo = evaluated
    else:
        log_density, albedo = field.log_density_and_albedo(samples.points)
    density = density_from_log(log_density)
    light = cameras.light_directions[ray_camera[sample_ray]]
    background = field.background(directions)

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, resolution, resolution, -1).permute(0, 3, 1, 2)

    # One compositing of every shading's colour side by side: the weights depend on the density alone.
    colours = torch.cat([shade(albedo, normals, light, shading) for shading in shadings], dim=-1)
    sample_weights, rgb, opacity, depth = composite(
        density, colours, step[sample_ray], samples.t, samples.start, samples.count, backend=kernel_backend,
    )
    orientation = torch.zeros((), device=device)
    normal_image = None
    if normals is not None:
        facing_away = (normals * directions[sample_ray]).sum(-1).clamp_min(0.0) ** 2
        orientation = (sample_weights.detach() * facing_away).sum() / rays
        normal_image = image(torch.zeros(rays, 3, dtype=normals.dtype, device=device).index_add(
            0, sample_ray, sample_weights[:, None] * normals
        ))
    unseen = (1.0 - opacity)[:, None] * background
    return [
        RenderOutput(
            rgb=image(shaded + unseen),
            opacity=image(opacity[:, None]),
            depth=image(depth[:, None]),
            normals=normal_image,
            orientation_loss=orientation,
            samples_evaluated=len(samples),
            samples_probed=probed,
            samples_total=rays * samples_per_ray,
        )
        for shaded in rgb.split(3, dim=-1)
    ]


@dataclass
class Surface:
    """What deferred shading needs of a render: per pixel, the composited albedo (without background) and
    opacity, the normal at the expected surface point, the background and the light."""

    albedo: RenderOutput
    surface_albedo: torch.Tensor  # [P, 3]
    opacity: torch.Tensor  # [P]
    normals: torch.Tensor  # [P, 3], zero where nothing is seen
    background: torch.Tensor  # [P, 3]
    light: torch.Tensor  # [P, 3]
    normal_points: int

    def shade(self, shading: Shading, cameras: int, resolution: int) -> RenderOutput:
        colour = shade(self.surface_albedo.clamp(0, 1), self.normals, self.light, shading)
        rgb = colour * self.opacity[:, None] + (1.0 - self.opacity)[:, None] * self.background

        def image(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(cameras, resolution, resolution, -1).permute(0, 3, 1, 2)

        return replace(self.albedo, rgb=image(rgb), normals=image(self.normals * self.opacity[:, None]),
                       samples_evaluated=self.albedo.samples_evaluated + self.normal_points)


@torch.no_grad()
def render_surface(field: RadianceField, cameras: CameraBatch, resolution: int, samples_per_ray: int,
                   occupancy: OccupancyGrid | None = None, backend: str = "auto") -> Surface:
    """An albedo render and one normal per pixel at its expected surface point: any shading of it follows
    without another march (``Surface.shade``)."""
    albedo = render(field, cameras, resolution, samples_per_ray, Shading("albedo"), occupancy, backend=backend)
    device = albedo.rgb.device
    origins, directions = generate_rays(cameras.to(device), resolution)
    opacity = albedo.opacity.permute(0, 2, 3, 1).reshape(-1)
    background = field.background(directions.reshape(-1, 3))
    # The composited albedo without the background the render blended in.
    surface_albedo = (albedo.rgb.permute(0, 2, 3, 1).reshape(-1, 3) - (1.0 - opacity)[:, None] * background) \
        / opacity.clamp_min(1e-6)[:, None]
    seen = opacity > 1e-3
    depth = albedo.depth.permute(0, 2, 3, 1).reshape(-1) / opacity.clamp_min(1e-6)
    points = origins.reshape(-1, 3)[seen] + directions.reshape(-1, 3)[seen] * depth[seen, None]
    normals = torch.zeros(opacity.shape[0], 3, device=device)
    if points.shape[0]:
        gradient = field.log_density_albedo_and_gradient(points)[2]
        normals[seen] = -gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    light = cameras.light_directions.to(device).repeat_interleave(resolution * resolution, dim=0)
    return Surface(albedo, surface_albedo, opacity, normals, background, light, int(points.shape[0]))


# Samples per ray that the termination pass evaluates at a time: past a ray's last one worth compositing it
# evaluates at most this many more.
TERMINATION_SEGMENT = 8


@torch.no_grad()
def _march_until_spent(field: RadianceField, samples: PackedSamples, delta: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Which packed samples their ray reaches with transmittance left (``STOP_TRANSMITTANCE``), the field's
    log-density and albedo at those, and how many samples it evaluated to find them.

    Early termination: a density-only pass (no gradients, no normals) walks the rays front to back,
    ``TERMINATION_SEGMENT`` samples at a time, and stops evaluating a ray once it is spent. Exact: the
    compositing gives the samples behind zero weight and no gradient, whatever the field says there.
    """
    count = len(samples)
    device = samples.t.device
    position = torch.arange(count, device=device) - samples.start[samples.ray]  # a sample's index on its ray
    reached = torch.zeros(count, dtype=torch.bool, device=device)
    log_density = torch.empty(count, device=device)
    albedo = torch.empty(count, 3, device=device)
    # Optical thickness each ray has crossed so far, in float64 as the compositing sums it.
    crossed = torch.zeros(samples.count.shape[0], dtype=torch.float64, device=device)
    spent_at = -math.log(STOP_TRANSMITTANCE)  # the optical thickness that leaves a ray spent
    longest = int(samples.count.max()) if count else 0
    probed = 0
    for first in range(0, longest, TERMINATION_SEGMENT):
        segment = (position >= first) & (position < first + TERMINATION_SEGMENT) & (crossed <= spent_at)[samples.ray]
        index = segment.nonzero().squeeze(1)
        if index.numel() == 0:
            break  # every ray is spent or out of samples
        probed += index.numel()
        segment_log_density, segment_albedo = field.log_density_and_albedo(samples.points[index])
        optical = (density_from_log(segment_log_density).double() * delta[index])
        ray = samples.ray[index]
        # Each ray's samples are contiguous in the segment and its first is at ``first``: each is a run of
        # its own for ``transmittance``, which continues from what the ray crossed before.
        opening = position[index] == first
        run = torch.cumsum(opening.long(), 0) - 1
        before = torch.exp(-crossed[ray]) * transmittance(optical, opening.nonzero().squeeze(1), run)
        keep = before >= STOP_TRANSMITTANCE
        reached[index] = keep
        log_density[index] = segment_log_density.float()
        albedo[index] = segment_albedo.float()
        crossed.index_add_(0, ray, optical)
    return reached, log_density[reached], albedo[reached], probed


def render_batched(
    field: RadianceField,
    cameras: CameraBatch,
    resolution: int,
    samples_per_ray: int,
    shading: Shading,
    occupancy: OccupancyGrid | None = None,
    max_samples: int = 2**20,
    deferred: bool = False,
) -> RenderOutput:
    """Inference rendering a few cameras at a time, to bound memory at any resolution or count
    (``deferred``: shade each pixel once, see ``render``)."""
    return render_batched_shadings(field, cameras, resolution, samples_per_ray, (shading,), occupancy, max_samples,
                                   deferred)[0]


def render_batched_shadings(
    field: RadianceField,
    cameras: CameraBatch,
    resolution: int,
    samples_per_ray: int,
    shadings: tuple[Shading, ...],
    occupancy: OccupancyGrid | None = None,
    max_samples: int = 2**20,
    deferred: bool = False,
) -> list[RenderOutput]:
    """``render_batched`` in several shadings from one march (``render_shadings``)."""
    per_camera = max(1, max_samples // (resolution * resolution * samples_per_ray))
    parts = []
    with torch.no_grad():
        for start in range(0, len(cameras), per_camera):
            part = cameras.slice(start, start + per_camera)
            parts.append(render_shadings(field, part, resolution, samples_per_ray, shadings, occupancy,
                                         deferred=deferred))
    return [concatenated_on_cpu([chunk[index] for chunk in parts]) for index in range(len(shadings))]


def concatenated_on_cpu(parts: list[RenderOutput]) -> RenderOutput:
    normals = [p.normals for p in parts]
    # Inference results feed exports and metrics on the CPU, whatever device rendered them.
    return RenderOutput(
        rgb=torch.cat([p.rgb.cpu() for p in parts]),
        opacity=torch.cat([p.opacity.cpu() for p in parts]),
        depth=torch.cat([p.depth.cpu() for p in parts]),
        normals=torch.cat([n.cpu() for n in normals]) if all(n is not None for n in normals) else None,
        orientation_loss=torch.stack([p.orientation_loss.cpu() for p in parts]).mean(),
        samples_evaluated=sum(p.samples_evaluated for p in parts),
        samples_total=sum(p.samples_total for p in parts),
        samples_probed=sum(p.samples_probed for p in parts),
    )


def shade(
    albedo: torch.Tensor, normals: torch.Tensor | None, light: torch.Tensor, shading: Shading
) -> torch.Tensor:
    if shading.mode == "albedo":
        return albedo
    assert normals is not None
    lambert = (normals * light).sum(-1, keepdim=True).clamp_min(0.0)
    intensity = shading.ambient + shading.diffuse * lambert
    if shading.mode == "textureless":
        return (shading.textureless_albedo * intensity).expand(-1, 3)
    return albedo * intensity
