"""Stage 2, the mesh (Magic3D's fine stage; stable-dreamfusion's ``--dmtet``, threestudio's ``*-refine``).

The surface where the stage-1 field's renders show it (or its density's isosurface at ``refine.sdf_threshold``)
sets the initial SDF of a deformable tetrahedral grid (``dreamfusion.dmtet``); each step extracts the mesh by marching
tetrahedra, rasterizes it (``dreamfusion.rasterizer``) at ``refine.resolution``, colours it with the field's
albedo at the surface points (the hash grid carries on as the texture), shades it as stage 1 does, and applies
the same SDS loss, plus normal-consistency and Laplacian regularisers on the mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from torch import nn

from dreamfusion.cameras import CameraBatch, cameras_from_angles, generate_rays
from dreamfusion.config import RefineConfig
from dreamfusion.dmtet import (
    TetGrid,
    TetMesh,
    face_adjacency,
    face_neighbours,
    laplacian_smoothness,
    marching_tetrahedra,
    normal_consistency,
    tet_grid,
    vertex_normals,
)
from dreamfusion.field import RadianceField, density_from_log
from dreamfusion.geometry import distance_to_mesh
from dreamfusion.rasterizer import antialias, project, rasterize
from dreamfusion.renderer import RenderOutput, Shading, module_device, shade

# How far a grid vertex may move, in cells (DMTet's tanh-bounded offsets; half a cell keeps tets valid).
MAX_OFFSET_CELLS = 0.5
# The initial SDF is a true signed distance (in cells) out to this many cells from the surface, constant beyond:
# only vertices next to the surface get gradients, and a surface that has to move a few cells crosses them at
# the same speed as the first.
SDF_BAND_CELLS = 3.0
_CHUNK = 2**18
# The depth maps fused into the initial surface: 8 cameras on each of 4 rings (below, level, above, high), at a
# pixel of 0.019 at the object (a 64-grid's cell on a unit object is 0.03).
FUSION_ELEVATIONS = (-30.0, 0.0, 30.0, 60.0)
FUSION_AZIMUTHS = 8
FUSION_RESOLUTION = 96
FUSION_SAMPLES = 96


class EmptySceneError(ValueError):
    """No grid vertex has a density above the threshold: nothing to refine."""


@torch.no_grad()
def _density(field: RadianceField, points: torch.Tensor) -> torch.Tensor:
    return torch.cat([density_from_log(field.log_density_and_albedo(points[start : start + _CHUNK])[0]).float()
                      for start in range(0, len(points), _CHUNK)])


@dataclass(frozen=True)
class DepthMaps:
    """The stage-1 field seen from cameras around it: along each pixel's ray the median stopping distance
    (where the transmittance falls to one half) and the opacity, ``[B, R*R]`` each."""

    cameras: CameraBatch
    depth: torch.Tensor
    opacity: torch.Tensor
    resolution: int

    @classmethod
    @torch.no_grad()
    def render(cls, field: RadianceField, resolution: int = FUSION_RESOLUTION) -> DepthMaps:
        rings = torch.tensor(FUSION_ELEVATIONS)
        azimuth = (torch.arange(FUSION_AZIMUTHS) * (360.0 / FUSION_AZIMUTHS))[None] \
            + (torch.arange(len(rings)) * 22.5)[:, None]
        elevation = rings[:, None].expand_as(azimuth)
        count = azimuth.numel()
        cameras = cameras_from_angles(azimuth.reshape(-1), elevation.reshape(-1), torch.full((count,), 2.2),
                                      torch.full((count,), 45.0)).to(module_device(field))
        origins, directions = generate_rays(cameras, resolution)
        depth, opacity = _median_depth(field, origins.reshape(-1, 3), directions.reshape(-1, 3))
        return cls(cameras, depth.reshape(count, -1), opacity.reshape(count, -1), resolution)

    def surface_points(self) -> torch.Tensor:
        """``[N, 3]``: where the rays of the pixels the field renders opaque stop."""
        origins, directions = generate_rays(self.cameras, self.resolution)
        shown = self.opacity > 0.5
        return origins[shown] + self.depth[shown, None] * directions[shown]

    def fused_distance(self, points: torch.Tensor, truncation: float) -> torch.Tensor:
        """``[P]``: each point's signed distance (negative inside) to the surface the maps show, truncated at
        ``truncation``: the distances along the rays of the cameras that see the point or see through it,
        averaged (TSDF fusion, as KinectFusion fuses depth maps). A camera whose pixel shows the point's ray
        empty puts it outside; one whose ray stops more than ``truncation`` before it says nothing of it; a
        point no camera says anything of is inside.

        A soft surface stops oblique rays early (they cross more of it per unit depth), so on the analytic ball as
        a VolSDF field the fused zero set lies a little outside the sphere (within 2% of its radius:
        ``tests/test_refine.py``). Weighting cameras by how squarely they see the surface removes that there but
        puts trained fields' surfaces inside theirs, whose head-on rays stop deeper than VolSDF's."""
        total = torch.zeros(len(points), device=points.device)
        weight = torch.zeros(len(points), device=points.device)
        for start in range(0, len(points), _CHUNK):
            chunk = points[start : start + _CHUNK]
            screen, _ = project(chunk[None].expand(len(self.cameras), -1, -1), self.cameras, self.resolution)
            pixel = screen.round().long()
            seen = ((pixel >= 0) & (pixel < self.resolution)).all(-1)
            index = (pixel[..., 1] * self.resolution + pixel[..., 0]).clamp(0, self.resolution**2 - 1)
            stop = self.depth.gather(1, index)
            empty = self.opacity.gather(1, index) <= 0.5
            distance = (chunk[None] - self.cameras.positions[:, None]).norm(dim=-1)
            signed = torch.where(empty, torch.full_like(stop, truncation), (stop - distance).clamp_max(truncation))
            evidence = (seen & (signed > -truncation)).float()
            total[start : start + _CHUNK] = (signed * evidence).sum(0)
            weight[start : start + _CHUNK] = evidence.sum(0)
        return torch.where(weight > 0, total / weight.clamp_min(1e-12), torch.full_like(total, -truncation))


@torch.no_grad()
def _median_depth(field: RadianceField, origins: torch.Tensor, directions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ray's median stopping distance, where its transmittance through the field falls to one half (the
    far end of the unit sphere where it never does), and its opacity."""
    b = (origins * directions).sum(-1)
    root = (b * b - ((origins * origins).sum(-1) - 1.0)).clamp_min(0.0).sqrt()
    near, far = (-b - root).clamp_min(0.0), (-b + root).clamp_min(0.0)
    fraction = (torch.arange(FUSION_SAMPLES, device=origins.device) + 0.5) / FUSION_SAMPLES
    depths, opacities = [], []
    rays_at_once = max(1, _CHUNK // FUSION_SAMPLES)
    for start in range(0, len(origins), rays_at_once):
        part = slice(start, start + rays_at_once)
        t = near[part, None] + (far - near)[part, None] * fraction  # [N, S]
        points = origins[part, None] + t[..., None] * directions[part, None]
        sigma = _density(field, points.reshape(-1, 3)).reshape(t.shape)
        step = (far - near)[part, None] / FUSION_SAMPLES
        crossed = torch.cumsum(sigma * step, dim=-1)  # the optical depth at each sample's far end
        halfway = crossed >= math.log(2.0)
        reached = halfway.any(-1)
        first = halfway.float().argmax(-1, keepdim=True)
        before = (crossed.gather(1, first) - (sigma * step).gather(1, first))  # at the crossing sample's near end
        # The density is constant over a sample's step: the crossing is linear in the optical depth within it.
        inside = (math.log(2.0) - before) / (sigma.gather(1, first) * step).clamp_min(1e-12)
        crossing = t.gather(1, first) + step * (inside - 0.5)
        depths.append(torch.where(reached, crossing[:, 0], far[part]))
        opacities.append(1.0 - torch.exp(-crossed[:, -1]))
    return torch.cat(depths), torch.cat(opacities)


@torch.no_grad()
def fit_grid(field: RadianceField, config: RefineConfig, surface_density: float) -> tuple[TetGrid, torch.Tensor]:
    """The tet grid over the box that holds the stage-1 surface (tightened to its extent plus two cells, as
    threestudio does) and its initial SDF: the signed distance, in cells, to the stage-1 surface
    (``signed_distance_in_cells``). That surface is where the field's renders show it (``DepthMaps``, fused),
    or with ``refine.sdf_threshold`` above 0 the density's isosurface at that level, as the anchors start.
    A field whose density never reaches ``surface_density`` (the export's level) is an empty scene.

    A soft field's density has no level that is its surface everywhere: the anchors' fixed thresholds
    (stable-dreamfusion 10, threestudio 25) give a mesh grown or eroded by a cell or more depending on how
    sharp stage 1 made each part (threestudio #45, #52, #311): the level that puts one object's surface where
    its renders show it erodes another's thin parts. Where the rays stop is what the photos taught the field,
    whatever the density's scale (``docs/benchmarks/quality_refine.md``)."""
    device = module_device(field)
    threshold = config.sdf_threshold
    coarse = tet_grid(64).vertices.to(device)
    inside = _density(field, coarse) > (threshold or surface_density)
    if not inside.any():
        setting = "refine.sdf_threshold" if threshold else "export.density_threshold"
        raise EmptySceneError(f"the stage-1 density never exceeds {setting}={threshold or surface_density}: "
                              f"nothing to refine; train longer or lower {setting}")
    if threshold:
        extent = float(coarse[inside].abs().max())
    else:
        maps = DepthMaps.render(field)
        extent = float(maps.surface_points().abs().max())
    extent += 2 * (2.0 / 64)
    scale = min(1.0, extent + 2 * (2 * extent / config.grid_resolution))
    grid = tet_grid(config.grid_resolution, scale).to(device)
    cell = 2.0 * scale / config.grid_resolution
    level = (threshold - _density(field, grid.vertices) if threshold
             else maps.fused_distance(grid.vertices, SDF_BAND_CELLS * cell))
    return grid, signed_distance_in_cells(grid, level)


@torch.no_grad()
def signed_distance_in_cells(grid: TetGrid, level: torch.Tensor, band: float = SDF_BAND_CELLS) -> torch.Tensor:
    """Each grid vertex's signed distance (negative inside) to the zero set of ``level``'s linear interpolation
    over the tetrahedra, in cells, truncated at ``band``.

    The anchors start from the density itself, ``(τ − σ)`` clamped to [−1, 1] (stable-dreamfusion,
    threestudio): saturated a cell from the surface and steep across it, so moving the surface by a cell
    takes a unit change at one vertex, and the stage barely moves geometry (stable-dreamfusion #315). A
    distance makes a step of the SDF a step of the surface, by the same amount everywhere."""
    surface = marching_tetrahedra(grid.vertices, level, grid.tets)
    sign = torch.where(level < 0, -1.0, 1.0).to(grid.vertices)
    if surface.faces.shape[0] == 0:
        return sign * band
    cell = 2.0 * grid.scale / grid.resolution
    mesh = trimesh.Trimesh(vertices=surface.vertices.cpu().double().numpy(), faces=surface.faces.cpu().numpy(),
                           process=False)
    points = grid.vertices.cpu().double().numpy()
    # A triangle of the grid's surface spans at most a cube's diagonal (√3 cells): a vertex farther than
    # band + 2 cells from every mesh vertex is beyond the band.
    nearest, _ = cKDTree(mesh.vertices).query(points, distance_upper_bound=(band + 2.0) * cell)
    near = np.isfinite(nearest)
    distance = np.full(len(points), band * cell)
    distance[near] = distance_to_mesh(points[near], mesh)
    cells = torch.from_numpy(np.minimum(distance / cell, band)).to(grid.vertices)
    return sign * cells


class MeshRefiner(nn.Module):
    """The refinement's geometry: a tet grid with a learned SDF and vertex offsets."""

    def __init__(self, grid: TetGrid, sdf: torch.Tensor) -> None:
        super().__init__()
        self.resolution, self.scale = grid.resolution, grid.scale
        self.register_buffer("rest", grid.vertices, persistent=False)
        self.register_buffer("tets", grid.tets, persistent=False)
        self.sdf = nn.Parameter(sdf.clone())
        self.deform = nn.Parameter(torch.zeros_like(grid.vertices))

    @classmethod
    def from_field(cls, field: RadianceField, config: RefineConfig, surface_density: float) -> MeshRefiner:
        return cls(*fit_grid(field, config, surface_density))

    @classmethod
    def empty(cls, resolution: int, scale: float, device: torch.device) -> MeshRefiner:
        """The structure of a saved refiner, to load its state into."""
        grid = tet_grid(resolution, scale).to(device)
        return cls(grid, torch.zeros(grid.vertices.shape[0], device=device))

    def extra_state(self) -> dict[str, float]:
        return {"resolution": self.resolution, "scale": self.scale}

    def positions(self) -> torch.Tensor:
        cell = 2.0 * self.scale / self.resolution
        return self.rest + torch.tanh(self.deform) * (MAX_OFFSET_CELLS * cell)

    def mesh(self) -> TetMesh:
        return marching_tetrahedra(self.positions(), self.sdf, self.tets, rest_positions=self.rest)

    def regularisers(self, mesh: TetMesh, neighbours: torch.Tensor) -> dict[str, torch.Tensor]:
        adjacency = face_adjacency(neighbours)
        return {"normal_consistency": normal_consistency(mesh.vertices, mesh.faces, adjacency),
                "laplacian": laplacian_smoothness(mesh.vertices, mesh.faces)}


def render_mesh(field: RadianceField, mesh: TetMesh, cameras: CameraBatch, resolution: int,
                shadings: tuple[Shading, ...], visibility: str = "auto", neighbours: torch.Tensor | None = None
                ) -> list[RenderOutput]:
    """``mesh`` rasterized from ``cameras`` in each of ``shadings``: the field's albedo at the surface points,
    interpolated vertex normals, the field's background behind, silhouettes antialiased (differentiable in the
    mesh's vertices and the field's parameters)."""
    device = module_device(field)
    cameras = cameras.to(device)
    batch = len(cameras)
    faces = mesh.faces
    rasterized = rasterize(mesh.vertices, faces, cameras, resolution, visibility)
    _, directions = generate_rays(cameras, resolution)
    background = field.background(directions.reshape(-1, 3)).reshape(batch, resolution, resolution, 3).float()
    normals = rasterized.interpolate(vertex_normals(mesh.vertices, faces), faces)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    if rasterized.hit.any():
        _, albedo = field.log_density_and_albedo(rasterized.interpolate(mesh.vertices, faces))
        albedo = albedo.float()
    else:
        albedo = normals.new_zeros(0, 3)
    camera_of_pixel = torch.arange(batch, device=device)[:, None, None].expand(-1, resolution, resolution)
    light = cameras.light_directions[camera_of_pixel[rasterized.hit]].to(normals)
    zeros = background.new_zeros(batch, resolution, resolution, 1)
    opacity = rasterized.scatter(torch.ones(len(normals), 1, device=device), zeros)
    normal_image = rasterized.scatter(normals, background.new_zeros(batch, resolution, resolution, 3))
    depth = rasterized.scatter(rasterized.distance[:, None], zeros)
    if neighbours is None:
        neighbours = face_neighbours(faces)
    images = torch.cat([rasterized.scatter(shade(albedo, normals, light, shading), background)
                        for shading in shadings] + [opacity], dim=1)
    smoothed = antialias(images, rasterized, mesh.vertices, faces, cameras, neighbours)
    hits = int(rasterized.hit.sum())
    return [RenderOutput(rgb=smoothed[:, 3 * k : 3 * k + 3], opacity=smoothed[:, -1:], depth=depth,
                         normals=normal_image, orientation_loss=torch.zeros((), device=device),
                         samples_evaluated=hits, samples_total=batch * resolution * resolution)
            for k in range(len(shadings))]
