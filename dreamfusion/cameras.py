"""Cameras on a sphere around the object, looking at the origin, with a light near each camera.

World frame: y is up; azimuth 0 puts the camera on +z, in front of the object ("front view");
azimuth grows towards +x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dreamfusion.config import CameraConfig

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class CameraBatch:
    positions: torch.Tensor  # [B, 3]
    rotations: torch.Tensor  # [B, 3, 3], columns: right, up, forward (towards the origin)
    fov_degrees: torch.Tensor  # [B]
    azimuth_degrees: torch.Tensor  # [B]
    elevation_degrees: torch.Tensor  # [B]
    light_directions: torch.Tensor  # [B, 3], unit vectors from the object towards the light

    def __len__(self) -> int:
        return self.positions.shape[0]

    def slice(self, start: int, stop: int) -> CameraBatch:
        return CameraBatch(*(getattr(self, name)[start:stop] for name in self.__dataclass_fields__))

    def to(self, device: torch.device | str) -> CameraBatch:
        return CameraBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def view_label(azimuth: float, elevation: float, front_angle: float = 90.0, overhead_elevation: float = 60.0) -> str:
    if elevation > overhead_elevation:
        return "overhead"
    azimuth = (azimuth + 180.0) % 360.0 - 180.0
    if abs(azimuth) <= front_angle / 2:
        return "front"
    if abs(azimuth) >= 180.0 - front_angle / 2:
        return "back"
    return "side"


def camera_directions(azimuth_degrees: torch.Tensor, elevation_degrees: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` unit vectors from the origin towards each camera."""
    az, el = torch.deg2rad(azimuth_degrees), torch.deg2rad(elevation_degrees)
    return torch.stack([torch.cos(el) * torch.sin(az), torch.sin(el), torch.cos(el) * torch.cos(az)], dim=-1)


@dataclass(frozen=True)
class ViewCondition:
    """What view-dependent conditioning tells a guidance backend about each render of a batch: its view
    label (all a text-to-image model can take, as a prompt suffix) and its camera's direction (what a
    camera-conditioned prior takes instead)."""

    labels: list[str]
    azimuth_degrees: torch.Tensor  # [B]
    elevation_degrees: torch.Tensor  # [B]

    def directions(self) -> torch.Tensor:
        return camera_directions(self.azimuth_degrees, self.elevation_degrees)


def view_condition(cameras: CameraBatch, config: CameraConfig) -> ViewCondition:
    labels = [
        view_label(float(a), float(e), config.front_angle, config.overhead_elevation)
        for a, e in zip(cameras.azimuth_degrees, cameras.elevation_degrees, strict=True)
    ]
    return ViewCondition(labels, cameras.azimuth_degrees, cameras.elevation_degrees)


def cameras_from_angles(
    azimuth_degrees: torch.Tensor,
    elevation_degrees: torch.Tensor,
    radius: torch.Tensor,
    fov_degrees: torch.Tensor,
    light_directions: torch.Tensor | None = None,
) -> CameraBatch:
    direction = camera_directions(azimuth_degrees, elevation_degrees)
    positions = radius[:, None] * direction
    forward = -direction
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype).expand_as(forward)
    right = torch.linalg.cross(forward, world_up)
    # Straight overhead the up vector is undefined; any horizontal right vector will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([1.0, 0.0, 0.0], dtype=forward.dtype), right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward)
    rotations = torch.stack([right, up, forward], dim=-1)
    if light_directions is None:
        light_directions = direction
    return CameraBatch(positions, rotations, fov_degrees, azimuth_degrees, elevation_degrees, light_directions)


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64).float()


def sample_cameras(config: CameraConfig, count: int, generator: torch.Generator) -> CameraBatch:
    """Random cameras; the light is the camera direction jittered by up to ``light_jitter_degrees``."""
    azimuth = _uniform(*config.azimuth_range, count, generator)
    # Uniform on the sphere between the elevation limits, not uniform in angle (which crowds the pole).
    sin_low, sin_high = (math.sin(math.radians(e)) for e in config.elevation_range)
    elevation = torch.rad2deg(torch.asin(_uniform(sin_low, sin_high, count, generator)))
    radius = _uniform(*config.radius_range, count, generator)
    fov = _uniform(*config.fov_range, count, generator)
    cameras = cameras_from_angles(azimuth, elevation, radius, fov)
    # The light: the camera direction tilted by a uniform angle up to the jitter, about a random axis.
    direction = cameras.light_directions
    axis = torch.randn(count, 3, generator=generator)
    axis = axis - (axis * direction).sum(-1, keepdim=True) * direction
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    tilt = torch.deg2rad(_uniform(0.0, config.light_jitter_degrees, count, generator))[:, None]
    cameras.light_directions = torch.cos(tilt) * direction + torch.sin(tilt) * axis
    return cameras


def generate_rays(cameras: CameraBatch, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions, ``[B, H*W, 3]``, row-major from the top-left pixel."""
    device = cameras.positions.device
    pixel = (torch.arange(resolution, dtype=torch.float32, device=device) + 0.5) / resolution * 2.0 - 1.0
    y, x = torch.meshgrid(-pixel, pixel, indexing="ij")
    tan_half = torch.tan(torch.deg2rad(cameras.fov_degrees) / 2.0)
    ones = torch.ones(resolution * resolution, device=device)
    camera_dirs = torch.stack([x.reshape(-1), y.reshape(-1), ones], dim=-1)
    camera_dirs = camera_dirs[None] * torch.stack([tan_half, tan_half, torch.ones_like(tan_half)], dim=-1)[:, None]
    directions = torch.einsum("bij,bnj->bni", cameras.rotations, camera_dirs)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = cameras.positions[:, None, :].expand_as(directions)
    return origins, directions
