"""Stage 2, the mesh (Magic3D's fine stage; stable-dreamfusion's ``--dmtet``, threestudio's ``*-refine``).

The stage-1 field's density at ``refine.sdf_threshold`` sets the initial SDF of a deformable tetrahedral grid
(``dreamfusion.dmtet``); each step extracts the mesh by marching tetrahedra, rasterizes it
(``dreamfusion.rasterizer``) at ``refine.resolution``, colours it with the field's albedo at the surface points
(the hash grid carries on as the texture), shades it as stage 1 does, and applies the same SDS loss, plus
normal-consistency and Laplacian regularisers on the mesh.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from torch import nn

from dreamfusion.cameras import CameraBatch, generate_rays
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
from dreamfusion.rasterizer import antialias, rasterize
from dreamfusion.renderer import RenderOutput, Shading, module_device, shade

# How far a grid vertex may move, in cells (DMTet's tanh-bounded offsets; half a cell keeps tets valid).
MAX_OFFSET_CELLS = 0.5
# The initial SDF is a true signed distance (in cells) out to this many cells from the surface, constant beyond:
# only vertices next to the surface get gradients, and a surface that has to move a few cells crosses them at
# the same speed as the first.
SDF_BAND_CELLS = 3.0
_CHUNK = 2**18


class EmptySceneError(ValueError):
    """No grid vertex has a density above the threshold: nothing to refine."""


@torch.no_grad()
def _density(field: RadianceField, points: torch.Tensor) -> torch.Tensor:
    return torch.cat([density_from_log(field.log_density_and_albedo(points[start : start + _CHUNK])[0]).float()
                      for start in range(0, len(points), _CHUNK)])


@torch.no_grad()
def fit_grid(field: RadianceField, config: RefineConfig) -> tuple[TetGrid, torch.Tensor]:
    """The tet grid over the box that holds the stage-1 surface (a coarse pass over [-1, 1]^3 tightens it to
    the occupied extent plus two cells, as threestudio does) and its initial SDF: the signed distance, in
    cells, to the density's isosurface at ``τ = refine.sdf_threshold`` (``signed_distance_in_cells``)."""
    device = module_device(field)
    threshold = config.sdf_threshold
    coarse = tet_grid(64).vertices.to(device)
    inside = _density(field, coarse) > threshold
    if not inside.any():
        raise EmptySceneError(f"the stage-1 density never exceeds refine.sdf_threshold={threshold}: nothing to "
                              "refine; train longer or lower refine.sdf_threshold")
    extent = float(coarse[inside].abs().max()) + 2 * (2.0 / 64)
    scale = min(1.0, extent + 2 * (2 * extent / config.grid_resolution))
    grid = tet_grid(config.grid_resolution, scale).to(device)
    return grid, signed_distance_in_cells(grid, threshold - _density(field, grid.vertices))


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
    def from_field(cls, field: RadianceField, config: RefineConfig) -> MeshRefiner:
        return cls(*fit_grid(field, config))

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
