"""The differentiable rasterizer: visibility against an independent ray cast, gradients against finite
differences inside triangles and at silhouette edges."""

import numpy as np
import pytest
import torch
import trimesh

from dreamfusion.cameras import cameras_from_angles, generate_rays
from dreamfusion.dmtet import face_neighbours
from dreamfusion.rasterizer import BACKGROUND, antialias, embree_visibility, rasterize, zbuffer


def cameras(count: int = 3):
    return cameras_from_angles(torch.linspace(0, 250, count), torch.linspace(-20, 40, count),
                               torch.full((count,), 2.2), torch.full((count,), 45.0))


def blob() -> trimesh.Trimesh:
    """An uneven closed surface: an icosphere with its vertices pushed in and out."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    v = sphere.vertices
    return trimesh.Trimesh(v * (1 + 0.15 * np.sin(3 * v[:, :1]) * np.cos(2 * v[:, 1:2])), sphere.faces)


@pytest.mark.parametrize("backend", ["embree", "torch"])
def test_ids_depth_and_barycentrics_match_an_independent_ray_cast(backend):
    mesh, views, size = blob(), cameras(), 40
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.faces)
    out = rasterize(vertices, faces, views, size, backend=backend)
    origins, directions = generate_rays(views, size)
    caster = trimesh.ray.ray_triangle.RayMeshIntersector(mesh)  # numpy, no Embree
    index, rays, locations = caster.intersects_id(origins.reshape(-1, 3).double().numpy(),
                                                  directions.reshape(-1, 3).double().numpy(),
                                                  multiple_hits=False, return_locations=True)
    expected = np.full(len(views) * size * size, BACKGROUND)
    expected[rays] = index
    mine = out.triangle.reshape(-1).numpy()
    assert (mine == expected).mean() > 0.998  # rays through a shared edge may pick either face
    same = np.flatnonzero((mine == expected) & (expected != BACKGROUND))
    where = {ray: k for k, ray in enumerate(rays)}
    order = np.array([where[r] for r in same])
    hit_rank = np.cumsum(out.hit.reshape(-1).numpy()) - 1
    truth_bary = trimesh.triangles.points_to_barycentric(mesh.triangles[index[order]], locations[order])
    assert np.allclose(out.barycentrics.detach().numpy()[hit_rank[same]], truth_bary, atol=1e-6)
    truth_distance = np.linalg.norm(locations[order] - origins.reshape(-1, 3).double().numpy()[same], axis=1)
    assert np.allclose(out.distance.detach().numpy()[hit_rank[same]], truth_distance, atol=1e-6)


def test_zbuffer_and_embree_agree():
    mesh = blob()
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    a = embree_visibility(vertices, faces, cameras(), 64)
    b = zbuffer(vertices, faces, cameras(), 64)
    assert (a == b).float().mean() > 0.998 and (a != BACKGROUND).float().mean() > 0.2


def test_face_neighbours_of_a_closed_mesh():
    mesh = blob()
    neighbours = face_neighbours(torch.tensor(mesh.faces))
    assert (neighbours >= 0).all()
    for face in (0, 17, 300):
        for edge in range(3):
            other = int(neighbours[face, edge])
            shared = {int(mesh.faces[face][edge]), int(mesh.faces[face][(edge + 1) % 3])}
            assert shared <= set(mesh.faces[other].tolist()) and other != face


def render_triangle(vertices: torch.Tensor, faces: torch.Tensor, view, size: int, colours: torch.Tensor,
                    aa: bool = True) -> torch.Tensor:
    out = rasterize(vertices, faces, view, size, backend="torch")
    background = torch.full((len(view), size, size, 3), 0.2, dtype=vertices.dtype)
    image = out.scatter(out.interpolate(colours, faces), background)
    return antialias(image, out, vertices, faces, view) if aa else image


def triangle_scene():
    view = cameras_from_angles(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.2]), torch.tensor([45.0]))
    vertices = torch.tensor([[-0.41, -0.33, 0.1], [0.47, -0.28, 0.0], [0.03, 0.52, -0.05]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    colours = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.3, 1.0]], dtype=torch.float64)
    weights = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return view, vertices, faces, colours, weights


def test_silhouette_gradient_of_a_translation_matches_finite_differences():
    """A flat-coloured triangle over a background moved sideways: only its silhouette moves, so the whole
    gradient comes from the antialias. The antialiased image is continuous in the shift except for small jumps
    where a pixel centre crosses an edge near a corner (as in Laine et al.'s method); a central difference of
    1e-6 straddles one at about one shift in fifty, so the gradient is checked at nine shifts and must agree at
    eight."""
    view, vertices, faces, _, weights = triangle_scene()
    colours = torch.tensor([[0.9, 0.6, 0.1]] * 3, dtype=torch.float64)

    def loss(offset):
        return (weights * render_triangle(vertices + offset, faces, view, 24, colours)).sum()

    for axis in (0, 1):
        agree = 0
        for position in torch.linspace(-0.02, 0.02, 9, dtype=torch.float64):
            shift = torch.zeros(3, dtype=torch.float64)
            shift[axis] = position
            shift.requires_grad_(True)
            (gradient,) = torch.autograd.grad(loss(shift), shift)
            step = torch.zeros(3, dtype=torch.float64)
            step[axis] = 1e-6
            with torch.no_grad():
                numeric = (float(loss(shift + step)) - float(loss(shift - step))) / 2e-6
            assert abs(float(gradient[axis])) > 1.0
            agree += abs(float(gradient[axis]) - numeric) < 1e-3 * abs(numeric)
        assert agree >= 8
        # without the antialias, a translation has no gradient at all: what the edge pass adds
        shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        plain = (weights * render_triangle(vertices + shift, faces, view, 24, colours, aa=False)).sum()
        assert float(torch.autograd.grad(plain, shift)[0][axis]) == pytest.approx(0.0, abs=1e-9)


def test_interior_gradient_of_a_vertex_matches_finite_differences():
    """Moving one vertex changes the interpolated colours inside (perspective-correct barycentrics recomputed
    from the vertices); pixels whose four neighbours are inside too keep their triangle under a step of 1e-5,
    so finite differences over them are exact."""
    view, vertices, faces, colours, weights = triangle_scene()
    inside = rasterize(vertices, faces, view, 24, backend="torch").hit[0].clone()
    core = torch.zeros_like(inside)
    core[1:-1, 1:-1] = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    assert 20 < int(core.sum()) < int(inside.sum())
    weights = weights * core

    def loss(points):
        return (weights * render_triangle(points, faces, view, 24, colours, aa=False)).sum()

    moved = vertices.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss(moved), moved)
    for corner, axis in ((0, 0), (2, 1), (1, 2)):
        step = torch.zeros_like(vertices)
        step[corner, axis] = 1e-5
        with torch.no_grad():
            numeric = (float(loss(vertices + step)) - float(loss(vertices - step))) / 2e-5
        assert abs(numeric) > 1e-3
        assert float(gradient[corner, axis]) == pytest.approx(numeric, rel=1e-4)


def test_antialias_leaves_interior_edges_alone():
    """Two faces of one surface that both face the camera: the edge between them is not a silhouette."""
    view = cameras_from_angles(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.2]), torch.tensor([45.0]))
    vertices = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]],
                            dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]], dtype=torch.float64)
    out = rasterize(vertices, faces, view, 32, backend="torch")
    image = out.scatter(out.interpolate(colours, faces), torch.zeros(1, 32, 32, 3, dtype=torch.float64))
    smoothed = antialias(image, out, vertices, faces, view)
    interior = out.hit[0].clone()
    interior[1:] &= out.hit[0][:-1]
    interior[:-1] &= out.hit[0][1:]
    interior[:, 1:] &= out.hit[0][:, :-1]
    interior[:, :-1] &= out.hit[0][:, 1:]
    assert torch.equal(smoothed[0][:, interior], image[0][:, interior])
    assert not torch.equal(smoothed, image)  # the outer border is blended
