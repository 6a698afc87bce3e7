"""Procedural objects of the synthetic prior: analytic signed distances with albedo functions, and sphere
tracing onto their surfaces.

Each object is a ``RadianceField`` (density from the SDF, VolSDF-style), so ground truth is drawn by
the very renderer that draws the NeRF. Objects sit inside the unit sphere, y up, front towards +z.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dreamfusion.cameras import CameraBatch, generate_rays
from dreamfusion.config import GuidanceConfig
from dreamfusion.errors import UserInputError
from dreamfusion.field import RadianceField

Tensor = torch.Tensor


def _length(x: Tensor) -> Tensor:
    return x.norm(dim=-1)


def sphere(p: Tensor, radius: float) -> Tensor:
    return _length(p) - radius


def ellipsoid(p: Tensor, radii: tuple[float, float, float]) -> Tensor:
    r = torch.tensor(radii, dtype=p.dtype)
    k0 = _length(p / r)
    k1 = _length(p / (r * r)).clamp_min(1e-6)
    return k0 * (k0 - 1.0) / k1


def box(p: Tensor, half: tuple[float, float, float], rounding: float = 0.0) -> Tensor:
    q = p.abs() - torch.tensor(half, dtype=p.dtype) + rounding
    return _length(q.clamp_min(0.0)) + q.max(dim=-1).values.clamp_max(0.0) - rounding


def cylinder(p: Tensor, radius: float, half_height: float) -> Tensor:
    d = torch.stack([_length(p[:, [0, 2]]) - radius, p[:, 1].abs() - half_height], dim=-1)
    return d.max(dim=-1).values.clamp_max(0.0) + _length(d.clamp_min(0.0))


def capped_cone(p: Tensor, half_height: float, bottom_radius: float, top_radius: float) -> Tensor:
    """Exact distance to a cone frustum along y (Quílez's formulation)."""
    qx, qy = _length(p[:, [0, 2]]), p[:, 1]
    k1 = torch.tensor([top_radius, half_height], dtype=p.dtype)
    k2 = torch.tensor([top_radius - bottom_radius, 2.0 * half_height], dtype=p.dtype)
    cap_radius = torch.where(qy < 0.0, torch.full_like(qy, bottom_radius), torch.full_like(qy, top_radius))
    ca = torch.stack([qx - torch.minimum(qx, cap_radius), qy.abs() - half_height], dim=-1)
    q = torch.stack([qx, qy], dim=-1)
    h = (((k1 - q) * k2).sum(-1) / (k2 * k2).sum()).clamp(0.0, 1.0)
    cb = q - k1 + k2 * h[:, None]
    sign = torch.where((cb[:, 0] < 0.0) & (ca[:, 1] < 0.0), -1.0, 1.0)
    return sign * torch.minimum((ca * ca).sum(-1), (cb * cb).sum(-1)).clamp_min(1e-12).sqrt()


def torus(p: Tensor, major: float, minor: float, axis: str = "y") -> Tensor:
    if axis == "y":
        ring, along = p[:, [0, 2]], p[:, 1]
    else:  # ring in the x-y plane: a handle seen from the side
        ring, along = p[:, [0, 1]], p[:, 2]
    q = torch.stack([_length(ring) - major, along], dim=-1)
    return _length(q) - minor


def _shift(p: Tensor, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Tensor:
    return p - torch.tensor([x, y, z], dtype=p.dtype)


def _paint(base: tuple[float, float, float], count: int) -> Tensor:
    return torch.tensor(base).expand(count, 3).clone()


def _apply(colour: Tensor, mask: Tensor, value: tuple[float, float, float]) -> Tensor:
    return torch.where(mask[:, None], torch.tensor(value, dtype=colour.dtype), colour)


@dataclass(frozen=True)
class SyntheticObject:
    prompt: str
    sdf: Callable[[Tensor], Tensor]
    albedo: Callable[[Tensor], Tensor]
    has_front: bool = False
    # The SDF is the exact Euclidean distance to the surface (not a bound, as unions, intersections and the
    # ellipsoid are): 3D accuracy reads distances to the truth straight from it.
    exact_sdf: bool = False


def _uniform(colour: tuple[float, float, float]) -> Callable[[Tensor], Tensor]:
    return lambda p: _paint(colour, p.shape[0])


def _snowman_sdf(p: Tensor) -> Tensor:
    return torch.minimum(sphere(_shift(p, y=-0.3), 0.38), sphere(_shift(p, y=0.3), 0.26))


def _head_sdf(p: Tensor) -> Tensor:
    skull = ellipsoid(p, (0.45, 0.55, 0.45))
    nose = sphere(_shift(p, y=-0.02, z=0.44), 0.09)
    return torch.minimum(skull, nose)


def _head_albedo(p: Tensor) -> Tensor:
    colour = _paint((0.93, 0.74, 0.6), p.shape[0])
    x, y, z = p.unbind(-1)
    hair = (y > 0.3) | ((z < -0.05) & (y > -0.25))
    colour = _apply(colour, hair, (0.3, 0.18, 0.08))
    front = z > 0.25
    eyes = front & ((x.abs() - 0.16).abs() < 0.07) & ((y - 0.13).abs() < 0.06)
    colour = _apply(colour, eyes, (0.05, 0.05, 0.1))
    mouth = front & (x.abs() < 0.15) & ((y + 0.25).abs() < 0.04)
    return _apply(colour, mouth, (0.8, 0.1, 0.15))


def _house_sdf(p: Tensor) -> Tensor:
    body = box(_shift(p, y=-0.25), (0.42, 0.32, 0.42))
    x, y, _ = p.unbind(-1)
    slopes = x.abs() * 0.6 + (y - 0.07) * 0.8 - 0.3
    roof = torch.maximum(box(_shift(p, y=0.25), (0.5, 0.25, 0.46)), slopes)
    return torch.minimum(body, roof)


def _house_albedo(p: Tensor) -> Tensor:
    x, y, z = p.unbind(-1)
    colour = _paint((0.92, 0.86, 0.7), p.shape[0])
    colour = _apply(colour, y > 0.075, (0.45, 0.2, 0.12))
    door = (z > 0.36) & (x.abs() < 0.13) & (y < 0.0)
    return _apply(colour, door, (0.85, 0.05, 0.05))


def _mug_sdf(p: Tensor) -> Tensor:
    outer = cylinder(_shift(p, y=-0.05), 0.38, 0.45)
    inner = cylinder(_shift(p, y=0.1), 0.31, 0.45)
    cup = torch.maximum(outer, -inner)
    handle = torus(_shift(p, x=0.42, y=-0.05), 0.2, 0.06, axis="z")
    return torch.minimum(cup, handle)


def _mug_albedo(p: Tensor) -> Tensor:
    x, y, z = p.unbind(-1)
    colour = _paint((0.95, 0.95, 0.92), p.shape[0])
    logo = (z > 0.3) & (x.abs() < 0.17) & ((y + 0.05).abs() < 0.2)
    return _apply(colour, logo, (0.1, 0.25, 0.9))


def _tv_sdf(p: Tensor) -> Tensor:
    screen_box = box(_shift(p, y=0.1), (0.62, 0.4, 0.14), rounding=0.03)
    stand = box(_shift(p, y=-0.42), (0.22, 0.12, 0.12))
    return torch.minimum(screen_box, stand)


def _tv_albedo(p: Tensor) -> Tensor:
    x, y, z = p.unbind(-1)
    colour = _paint((0.12, 0.12, 0.14), p.shape[0])
    screen = (z > 0.1) & (x.abs() < 0.54) & ((y - 0.1).abs() < 0.32)
    return _apply(colour, screen, (0.35, 0.75, 0.95))


OBJECTS: tuple[SyntheticObject, ...] = (
    SyntheticObject("a red ball", lambda p: sphere(p, 0.55), _uniform((0.85, 0.12, 0.1)), exact_sdf=True),
    SyntheticObject("a blue cube", lambda p: box(p, (0.42, 0.42, 0.42), 0.03), _uniform((0.15, 0.3, 0.85)),
                    exact_sdf=True),
    SyntheticObject("a green cylinder", lambda p: cylinder(p, 0.38, 0.55), _uniform((0.15, 0.7, 0.25)), exact_sdf=True),
    SyntheticObject("an orange cone", lambda p: capped_cone(p, 0.55, 0.5, 0.02), _uniform((0.95, 0.55, 0.1)),
                    exact_sdf=True),
    SyntheticObject("a purple donut", lambda p: torus(p, 0.45, 0.2), _uniform((0.6, 0.25, 0.75)), exact_sdf=True),
    SyntheticObject("a white snowman", _snowman_sdf, _uniform((0.93, 0.93, 0.96))),
    SyntheticObject("a head with a face", _head_sdf, _head_albedo, has_front=True),
    SyntheticObject("a house with a red door", _house_sdf, _house_albedo, has_front=True),
    SyntheticObject("a coffee mug with a logo", _mug_sdf, _mug_albedo, has_front=True),
    SyntheticObject("a television with a screen", _tv_sdf, _tv_albedo, has_front=True),
)


def normalize_prompt(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip().strip(".").strip().lower()


def known_prompts() -> list[str]:
    return [obj.prompt for obj in OBJECTS]


def find_object(prompt: str) -> SyntheticObject:
    wanted = normalize_prompt(prompt)
    for obj in OBJECTS:
        if obj.prompt == wanted:
            return obj
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    raise UserInputError(
        f"unknown prompt {shown!r} for the synthetic prior; known prompts: {'; '.join(known_prompts())} "
        "(or use a real guidance backend)"
    )


class SDFField(RadianceField):
    """An analytic object as a radiance field: VolSDF density ``(1/β) Ψ_β(−sdf)`` on a uniform grey backdrop."""

    def __init__(self, obj: SyntheticObject, beta: float = 0.012,
                 background: float = GuidanceConfig.prior_backdrop) -> None:
        super().__init__()
        self.obj = obj
        self.beta = beta
        self.background_value = background

    def log_density_and_albedo(self, points: Tensor) -> tuple[Tensor, Tensor]:
        s = self.obj.sdf(points) / self.beta
        # log of the Laplace CDF, each branch clamped so the unused one cannot produce NaN gradients.
        outside = math.log(0.5) - s.clamp_min(0.0)
        inside = torch.log1p(-0.5 * torch.exp(s.clamp_max(0.0)))
        log_density = torch.where(s > 0, outside, inside) - math.log(self.beta)
        return log_density, self.obj.albedo(points).to(points.dtype)

    def background(self, directions: Tensor) -> Tensor:
        return torch.full_like(directions, self.background_value)


def sdf_gradient(obj: SyntheticObject, points: torch.Tensor, step: float = 1e-5
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDF and its gradient by central differences: some SDFs here clamp a square under a square root,
    so autograd gives a zero gradient within 1e-6 of their surface, where the normals are wanted."""
    with torch.no_grad():
        offsets = torch.eye(3, dtype=points.dtype) * step
        ahead = torch.stack([obj.sdf(points + offsets[axis]) for axis in range(3)], dim=-1)
        behind = torch.stack([obj.sdf(points - offsets[axis]) for axis in range(3)], dim=-1)
        return obj.sdf(points), (ahead - behind) / (2.0 * step)


def sphere_trace(obj: SyntheticObject, cameras: CameraBatch, resolution: int, offset: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's ray marched onto the level set ``sdf = offset``: the rays' points ``[P, 3]`` where they
    stopped and which of them hit ``[P]``."""
    origins, directions = generate_rays(cameras.to("cpu"), resolution)
    o, d = origins.reshape(-1, 3).double(), directions.reshape(-1, 3).double()
    # Start where the ray enters the sphere that holds every object (the unit sphere) and the offset.
    reach = 1.0 + max(offset, 0.0)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - reach * reach)
    root = disc.clamp_min(0.0).sqrt()
    t, far = (-b - root).clamp_min(0.0), -b + root
    active = disc > 0
    hit = torch.zeros_like(active)
    with torch.no_grad():
        for _ in range(512):
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            distance = obj.sdf(o[index] + t[index, None] * d[index]) - offset
            arrived = distance < 1e-5
            hit[index[arrived]] = True
            # 0.9: some SDFs here (the ellipsoid, intersections) are bounds, not exact distances.
            t[index] += 0.9 * distance.clamp_min(0.0)
            active[index[arrived | (t[index] > far[index])]] = False
    return o + t[:, None] * d, hit
