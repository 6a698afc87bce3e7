"""DMTet: the generated tetrahedral grid and marching tetrahedra."""

import pytest
import torch
import trimesh

from dreamfusion.dmtet import (
    face_adjacency,
    face_neighbours,
    laplacian_smoothness,
    marching_tetrahedra,
    normal_consistency,
    tet_grid,
    vertex_normals,
)
from dreamfusion.geometry import mesh_accuracy


def test_the_grid_fills_the_cube_with_positive_tetrahedra():
    grid = tet_grid(4, scale=0.8)
    assert grid.vertices.shape == (125, 3) and grid.tets.shape == (6 * 64, 4)
    corners = grid.vertices[grid.tets]
    volume = torch.linalg.det(corners[:, 1:] - corners[:, :1]).abs() / 6
    assert torch.all(volume > 0) and float(volume.sum()) == pytest.approx(1.6**3, rel=1e-5)
    # face-conforming: every interior triangle is shared by exactly two tetrahedra
    faces = torch.cat([grid.tets[:, [0, 1, 2]], grid.tets[:, [0, 1, 3]], grid.tets[:, [0, 2, 3]],
                       grid.tets[:, [1, 2, 3]]]).sort(dim=1).values
    _, counts = torch.unique(faces, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2} and int((counts == 1).sum()) == 6 * 2 * 16  # boundary: 2 per square


@pytest.mark.parametrize("resolution, bound", [(24, 0.01), (48, 0.003)])
def test_marching_tetrahedra_on_a_sphere_is_closed_outward_and_close(resolution, bound):
    grid = tet_grid(resolution)
    mesh = marching_tetrahedra(grid.vertices, grid.vertices.norm(dim=-1) - 0.55, grid.tets)
    surface = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)
    assert surface.is_watertight and surface.is_winding_consistent and surface.volume > 0
    assert mesh_accuracy("a red ball", surface)["chamfer"] < bound


def test_marching_tetrahedra_is_differentiable_in_sdf_and_offsets():
    grid = tet_grid(12)
    sdf = (grid.vertices.norm(dim=-1) - 0.5).requires_grad_(True)
    offsets = torch.zeros_like(grid.vertices, requires_grad=True)
    mesh = marching_tetrahedra(grid.vertices + offsets, sdf, grid.tets, rest_positions=grid.vertices)
    radius = mesh.vertices.norm(dim=-1).mean()
    radius.backward()
    # raising the SDF everywhere shrinks the sphere; moving every vertex outwards grows it
    assert float(sdf.grad.sum()) < 0 and float((offsets.grad * grid.vertices).sum()) > 0


def test_regularisers_prefer_a_smooth_surface():
    grid = tet_grid(20)
    sdf = grid.vertices.norm(dim=-1) - 0.61
    smooth = marching_tetrahedra(grid.vertices, sdf, grid.tets)
    bumpy = marching_tetrahedra(grid.vertices, sdf + 0.05 * torch.sin(40 * grid.vertices[:, 0]), grid.tets)
    normals = vertex_normals(smooth.vertices, smooth.faces)
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-5)
    assert (normals * smooth.vertices).sum(-1).min() > 0.9 * 0.61  # outwards
    adjacency = [face_adjacency(face_neighbours(m.faces)) for m in (smooth, bumpy)]
    assert normal_consistency(smooth.vertices, smooth.faces, adjacency[0]) < 0.5 * normal_consistency(
        bumpy.vertices, bumpy.faces, adjacency[1])
    assert laplacian_smoothness(smooth.vertices, smooth.faces) < laplacian_smoothness(bumpy.vertices, bumpy.faces)
