"""3D accuracy against the analytic truth: Chamfer, F-score and normal error."""

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from dreamfusion.evaluate import held_out_cameras
from dreamfusion.geometry import (
    FSCORE_THRESHOLD,
    distance_to_mesh,
    level_set_silhouettes,
    mesh_accuracy,
    normal_error_deg,
    normal_error_from_render,
    sample_surface,
    surface_distances,
    true_normals,
    truth_samples,
    truth_surface,
)
from dreamfusion.mesh import decimate
from dreamfusion.prior.shapes import SDFField, find_object
from dreamfusion.renderer import Shading, render_batched_shadings

BALL = "a red ball"  # radius 0.55: its bounding radius, and an exact SDF
HOUSE = "a house with a red door"  # a union and an intersection: distances from its fine truth mesh


@pytest.mark.parametrize("prompt", [BALL, HOUSE, "a coffee mug with a logo"])
def test_the_truth_mesh_scores_near_zero(prompt):
    scores = mesh_accuracy(prompt, truth_surface(prompt).mesh)
    assert scores["chamfer"] < 3e-4 and scores["fscore"] == 1.0


def test_truth_samples_lie_on_the_analytic_surface():
    obj = find_object(HOUSE)
    points = truth_samples(HOUSE, 5000)
    assert np.abs(obj.sdf(torch.from_numpy(points)).numpy()).max() < 1e-6


@pytest.mark.parametrize("prompt", [BALL, HOUSE])
def test_a_shrunk_mesh_scores_its_shrink(prompt):
    """Scaled about the centre by s, a sphere's mesh is (1 - s)·R from the truth everywhere; on the house, the
    distance is the scale's displacement projected on the normal, which the KD-tree checker measures."""
    truth = truth_surface(prompt)
    for scale, inside in ((0.97, False), (0.995, True)):
        shrunk = truth.mesh.copy()
        shrunk.apply_scale(scale)
        scores = mesh_accuracy(prompt, shrunk)
        if prompt == BALL:
            assert scores["chamfer"] == pytest.approx(1.0 - scale, rel=0.02)
            assert scores["fscore"] == (1.0 if inside else 0.0)  # every point within, or beyond, 2% of R
        else:
            assert scores == pytest.approx(kd_tree_scores(prompt, shrunk), abs=0.05 if inside else 0.02, rel=0.05)


def test_vertex_noise_scores_what_the_noise_predicts():
    """Gaussian noise of σ per axis on a fine mesh's vertices moves its surface off the truth by the normal
    component of the barycentric mix of its corners' offsets: N(0, σ²·Σwᵢ²), whose mean absolute value is
    σ·√(2/π)·E[√Σwᵢ²] (E over uniform barycentrics, estimated here by Monte Carlo). That is the mesh → truth
    distance; the truth → mesh one is smaller, as the jittered triangles tilt towards the true points."""
    truth = truth_surface(BALL)
    sigma = 0.003
    rng = np.random.default_rng(1)
    noisy = trimesh.Trimesh(truth.mesh.vertices + rng.normal(0.0, sigma, truth.mesh.vertices.shape),
                            truth.mesh.faces, process=False)
    u, v = rng.random(200_000), rng.random(200_000)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    spread = np.sqrt(u**2 + v**2 + (1 - u - v) ** 2).mean()
    predicted = sigma * math.sqrt(2 / math.pi) * spread / truth.radius
    to_truth, to_mesh = surface_distances(BALL, noisy)
    assert to_truth.mean() == pytest.approx(predicted, rel=0.05)
    assert 0.7 * predicted < to_mesh.mean() < to_truth.mean()
    assert mesh_accuracy(BALL, noisy)["chamfer"] == pytest.approx(0.5 * (to_truth.mean() + to_mesh.mean()))


def test_point_to_mesh_distance_matches_trimesh_near_and_far_from_a_lumpy_mesh():
    """Against trimesh's own closest_point, on points at the surface, inside and far off (where every box
    holds most of the mesh); a far-off lumpy blob against the fine truth mesh stays in bounded memory."""
    rng = np.random.default_rng(3)
    blob = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    blob.vertices += rng.normal(0.0, 0.02, blob.vertices.shape)
    points = np.concatenate([sample_surface(blob, 300), rng.uniform(-1.0, 1.0, (700, 3))])
    _, expected, _ = trimesh.proximity.closest_point(blob, points)
    np.testing.assert_allclose(distance_to_mesh(points, blob), expected, rtol=0, atol=1e-12)
    far = trimesh.creation.icosphere(subdivisions=5, radius=0.1)
    scores = mesh_accuracy(HOUSE, far, samples=5000)  # trimesh's boxes: ~1e8 pairs here, GBs
    assert 0.3 < scores["chamfer"] < 1.0 and scores["fscore"] == 0.0


def kd_tree_scores(prompt: str, mesh: trimesh.Trimesh, count: int = 400_000) -> dict[str, float]:
    """The checker written differently: nearest neighbours among dense samples of both surfaces (the truth's
    from its fine mesh), a KD-tree each way; no SDF, no point-to-triangle distances."""
    truth = truth_surface(prompt)
    mine, theirs = sample_surface(mesh, count, seed=11), sample_surface(truth.mesh, count, seed=12)
    to_truth = cKDTree(theirs).query(mine[:50_000])[0] / truth.radius
    to_mesh = cKDTree(mine).query(theirs[:50_000])[0] / truth.radius
    precision, recall = (to_truth < FSCORE_THRESHOLD).mean(), (to_mesh < FSCORE_THRESHOLD).mean()
    return {"chamfer": 0.5 * (to_truth.mean() + to_mesh.mean()),
            "fscore": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def test_a_kd_tree_checker_agrees_on_a_coarse_mesh():
    """A lumpy result: the house's truth decimated to 600 faces, its vertices jittered."""
    coarse = decimate(truth_surface(HOUSE).mesh, 600)
    rng = np.random.default_rng(3)
    lumpy = trimesh.Trimesh(coarse.vertices + rng.normal(0.0, 0.025, coarse.vertices.shape), coarse.faces)
    mine, checked = mesh_accuracy(HOUSE, lumpy), kd_tree_scores(HOUSE, lumpy)
    assert 0.01 < mine["chamfer"] < 0.1 and 0.05 < mine["fscore"] < 0.95  # a case where both figures move
    assert mine["chamfer"] == pytest.approx(checked["chamfer"], rel=0.05)
    assert mine["fscore"] == pytest.approx(checked["fscore"], abs=0.03)


def test_true_normals_of_the_ball_point_from_its_centre():
    cameras = held_out_cameras().slice(0, 2)
    normals, hit = true_normals(BALL, cameras, 32)
    from dreamfusion.cameras import generate_rays

    origins, directions = generate_rays(cameras, 32)
    o, d = origins.reshape(-1, 3).double(), directions.reshape(-1, 3).double()
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.55**2)
    expected_hit = disc > 0
    point = o + (-b - disc.clamp_min(0).sqrt())[:, None] * d
    expected = (point / point.norm(dim=-1, keepdim=True)).float().reshape(2, 32, 32, 3).permute(0, 3, 1, 2)
    seen = hit.bool().reshape(-1)
    # pixels whose ray grazes the rim may differ in hit or miss
    assert (seen == expected_hit).float().mean() > 0.99
    both = (seen & expected_hit).reshape(2, 1, 32, 32).expand(-1, 3, -1, -1)
    assert torch.allclose(normals[both], expected[both], atol=1e-3)


def test_normal_error_of_known_angles():
    truth = torch.zeros(1, 3, 4, 4)
    truth[:, 2] = 1.0
    hit = torch.ones(1, 1, 4, 4)
    assert normal_error_deg(truth * 0.3, hit, truth, hit) == pytest.approx(0.0, abs=1e-3)  # length is ignored
    tilted = torch.zeros(1, 3, 4, 4)
    tilted[:, 0], tilted[:, 2] = math.sin(math.radians(20)), math.cos(math.radians(20))
    assert normal_error_deg(tilted, hit, truth, hit) == pytest.approx(20.0, abs=1e-3)
    half = hit.clone()
    half[..., :2] = 0
    tilted[..., :2] = -truth[..., :2]  # opposite normals, outside the foreground: not counted
    assert normal_error_deg(tilted, half, truth, hit) == pytest.approx(20.0, abs=1e-3)
    assert normal_error_deg(tilted, torch.zeros_like(hit), truth, hit) is None


def test_the_truth_rendered_as_a_field_has_small_normal_error_and_a_wrong_shape_a_large_one():
    cameras = held_out_cameras()
    [truth] = render_batched_shadings(SDFField(find_object(HOUSE)), cameras, 48, 96, (Shading("lambertian"),))
    own = normal_error_from_render(HOUSE, cameras, 48, truth.normals, truth.opacity)["normal_error_deg"]
    [ball] = render_batched_shadings(SDFField(find_object(BALL)), cameras, 48, 96, (Shading("lambertian"),))
    other = normal_error_from_render(HOUSE, cameras, 48, ball.normals, ball.opacity)["normal_error_deg"]
    assert own < 5.0 and other > 25.0


def test_the_photos_surface_lies_outside_the_ball_by_what_its_soft_density_predicts():
    """VolSDF's Laplace density (β = 0.012) on a ball of radius 0.55: a grazing ray reaches optical depth ln 2
    about 2.5 β outside the surface, 5% of the radius; the grown ball's silhouettes are the photos'."""
    from dreamfusion.evaluate import photos_surface_offset
    from dreamfusion.prior.synthetic import render_ground_truth

    offset = photos_surface_offset("a red ball", 32)
    assert 0.03 < offset < 0.07
    cameras = held_out_cameras().slice(0, 4)
    grown = level_set_silhouettes("a red ball", cameras, 32, offset * 0.55) > 0.5
    _, opacity = render_ground_truth(find_object("a red ball"), cameras, 32)
    photos = opacity > 0.5
    assert float((grown & photos).sum() / (grown | photos).sum()) > 0.97
    bare = level_set_silhouettes("a red ball", cameras, 32, 0.0) > 0.5
    assert float(bare.sum()) < float(photos.sum())
