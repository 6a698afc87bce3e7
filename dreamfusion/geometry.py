"""3D accuracy of a result against the synthetic object's analytic surface.

- ``chamfer``: symmetric Chamfer distance between a mesh and the true surface, the mean of the two
  directions' mean point-to-surface distances, as a share of the object's bounding radius. Mesh → truth is
  the analytic SDF's absolute value where the object's SDF is an exact distance, otherwise the distance to a
  fine mesh of the truth; truth → mesh is the exact point-to-triangle distance from points on the true
  surface (sampled on the fine truth mesh and projected onto the SDF's zero set).
- ``fscore``: the harmonic mean of precision (mesh points within ``FSCORE_THRESHOLD`` of the truth) and
  recall (truth points within it of the mesh), the standard of 3D reconstruction benchmarks.
- ``normal_error_deg``: the mean angle between rendered normals and the true surface normals (sphere-traced
  from the SDF) over the pixels that are foreground in both.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from skimage import measure

from dreamfusion.cameras import CameraBatch
from dreamfusion.prior.shapes import SyntheticObject, find_object, sdf_gradient, sphere_trace

GEOMETRY_METRICS = ("chamfer", "fscore", "normal_error_deg")
# The F-score's distance threshold, as a share of the object's bounding radius (about 0.012 for the
# objects here: half a cell of the default 96³ export grid).
FSCORE_THRESHOLD = 0.02
SURFACE_SAMPLES = 30_000
# The truth mesh's marching-cubes grid over [-1, 1]^3: cells of 0.0105, whose chords depart from a curved
# surface by ~1e-5 and which chamfer sharp edges by at most a cell.
TRUTH_RESOLUTION = 192
_DISTANCE_POINT_CHUNK = 4096
_DISTANCE_SLACK = 1e-9  # rounding in the bound on a point's distance
_SDF_CHUNK = 2**20
_TRACED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class TruthSurface:
    mesh: trimesh.Trimesh  # marching cubes of the SDF at TRUTH_RESOLUTION, wound outwards
    radius: float  # the bounding radius: farthest surface point from the origin


def _sdf(obj: SyntheticObject, points: torch.Tensor) -> torch.Tensor:
    return torch.cat([obj.sdf(points[start : start + _SDF_CHUNK]) for start in range(0, len(points), _SDF_CHUNK)])


@lru_cache(maxsize=16)
def truth_surface(prompt: str) -> TruthSurface:
    obj = find_object(prompt)
    axis = torch.linspace(-1.0, 1.0, TRUTH_RESOLUTION)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    with torch.no_grad():
        volume = _sdf(obj, grid).reshape((TRUTH_RESOLUTION,) * 3).numpy()
    vertices, faces, _, _ = measure.marching_cubes(volume, level=0.0)
    vertices = vertices / (TRUTH_RESOLUTION - 1) * 2.0 - 1.0
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=True)  # the SDF grows outwards: wound out
    return TruthSurface(mesh, float(np.linalg.norm(mesh.vertices, axis=1).max()))


def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniformly distributed by area over ``mesh``'s faces (deterministic per ``seed``)."""
    rng = np.random.default_rng(seed)
    areas = np.asarray(mesh.area_faces, dtype=np.float64)
    face = rng.choice(len(areas), size=count, p=areas / areas.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0
    u, v = np.where(flip, 1.0 - u, u), np.where(flip, 1.0 - v, v)
    a, b, c = (np.asarray(mesh.vertices)[np.asarray(mesh.faces)[face, i]] for i in range(3))
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def project_to_surface(obj: SyntheticObject, points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Newton steps onto the SDF's zero set: points near the surface land on it."""
    p = torch.from_numpy(np.asarray(points, dtype=np.float64))
    for _ in range(iterations):
        value, gradient = sdf_gradient(obj, p)
        p = p - (value / (gradient * gradient).sum(-1).clamp_min(1e-12))[:, None] * gradient
    return p.numpy()


def truth_samples(prompt: str, count: int = SURFACE_SAMPLES, seed: int = 0) -> np.ndarray:
    """Points on the true surface of ``prompt``'s object."""
    return project_to_surface(find_object(prompt), sample_surface(truth_surface(prompt).mesh, count, seed))


def distance_to_mesh(points: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """Exact point-to-triangle distance from each point to ``mesh``, in bounded memory and time.

    A point's nearest vertex, at distance d, bounds its distance to the mesh, so its closest triangle T has
    its centroid within d + r_T of it (r_T: T's farthest vertex from its centroid). Those triangles lie near
    where the ball of radius d touches the mesh, a few dozen, even for a point far from a fine mesh, where
    the axis-aligned boxes of trimesh's ``closest_point`` take in most of the mesh (and tens of GB)."""
    points = np.asarray(points, dtype=np.float64)
    triangles = np.asarray(mesh.triangles, dtype=np.float64)
    centroids = triangles.mean(axis=1)
    spans = np.linalg.norm(triangles - centroids[:, None], axis=-1).max(axis=1)
    bound, _ = cKDTree(np.asarray(mesh.vertices)[mesh.referenced_vertices]).query(points)
    bound += _DISTANCE_SLACK
    centroid_tree = cKDTree(centroids)
    distance = np.empty(len(points))
    for start in range(0, len(points), _DISTANCE_POINT_CHUNK):
        chunk, reach = points[start : start + _DISTANCE_POINT_CHUNK], bound[start : start + _DISTANCE_POINT_CHUNK]
        nearby = centroid_tree.query_ball_point(chunk, reach + spans.max(), return_sorted=False)
        counts = np.fromiter(map(len, nearby), dtype=np.int64, count=len(chunk))
        ids = np.fromiter(itertools.chain.from_iterable(nearby), dtype=np.int64, count=int(counts.sum()))
        owner = np.repeat(np.arange(len(chunk)), counts)
        keep = np.linalg.norm(centroids[ids] - chunk[owner], axis=-1) <= reach[owner] + spans[ids]
        ids, owner = ids[keep], owner[keep]  # the true closest triangle is always kept
        offset = trimesh.triangles.closest_point(triangles[ids], chunk[owner]) - chunk[owner]
        firsts = np.searchsorted(owner, np.arange(len(chunk)))  # owner is sorted; every point keeps a pair
        distance[start : start + len(chunk)] = np.sqrt(np.minimum.reduceat((offset * offset).sum(-1), firsts))
    return distance


def distance_to_truth(prompt: str, points: np.ndarray) -> np.ndarray:
    obj = find_object(prompt)
    if obj.exact_sdf:
        with torch.no_grad():
            return _sdf(obj, torch.from_numpy(np.asarray(points, dtype=np.float64))).abs().numpy()
    return distance_to_mesh(points, truth_surface(prompt).mesh)


def surface_distances(prompt: str, mesh: trimesh.Trimesh, samples: int = SURFACE_SAMPLES, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances, as shares of the bounding radius, from points on ``mesh`` to the true surface (where the
    mesh strays: floaters, bulges) and from points on the true surface to ``mesh`` (what it misses: holes)."""
    radius = truth_surface(prompt).radius
    to_truth = distance_to_truth(prompt, sample_surface(mesh, samples, seed + 1)) / radius
    to_mesh = distance_to_mesh(truth_samples(prompt, samples, seed), mesh) / radius
    return to_truth, to_mesh


def mesh_accuracy(prompt: str, mesh: trimesh.Trimesh, samples: int = SURFACE_SAMPLES, seed: int = 0
                  ) -> dict[str, float]:
    """``chamfer`` and ``fscore`` of ``mesh`` against the true surface of ``prompt``'s object."""
    to_truth, to_mesh = surface_distances(prompt, mesh, samples, seed)
    return {"chamfer": float(0.5 * (to_truth.mean() + to_mesh.mean())),
            "fscore": fscore(to_truth, to_mesh, FSCORE_THRESHOLD)}


def fscore(to_truth: np.ndarray, to_mesh: np.ndarray, threshold: float) -> float:
    precision = float((to_truth < threshold).mean())
    recall = float((to_mesh < threshold).mean())
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def _trace_normals(obj: SyntheticObject, cameras: CameraBatch, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    points, hit = sphere_trace(obj, cameras, resolution)
    normals = torch.zeros_like(points)
    if hit.any():
        _, gradient = sdf_gradient(obj, points[hit])
        normals[hit] = gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    count = len(cameras)
    return (normals.float().reshape(count, resolution, resolution, 3).permute(0, 3, 1, 2),
            hit.float().reshape(count, 1, resolution, resolution))


def level_set_silhouettes(prompt: str, cameras: CameraBatch, resolution: int, offset: float) -> torch.Tensor:
    """``[B, 1, R, R]``: the pixels whose rays meet the object grown by ``offset`` (its SDF's level set
    ``sdf = offset``; negative: shrunk)."""
    _, hit = sphere_trace(find_object(prompt), cameras, resolution, offset)
    return hit.float().reshape(len(cameras), 1, resolution, resolution)


def true_normals(prompt: str, cameras: CameraBatch, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit surface normals ``[B, 3, R, R]`` of the object at each pixel's first hit, and the hits
    ``[B, 1, R, R]`` (sphere tracing the SDF; zero normals where the ray misses)."""
    obj = find_object(prompt)
    key = (obj.prompt, resolution, tuple(torch.cat([cameras.positions.reshape(-1), cameras.rotations.reshape(-1),
                                                    cameras.fov_degrees.reshape(-1)]).tolist()))
    if key not in _TRACED:  # the held-out cameras are the same for every run: trace once per process
        if len(_TRACED) >= 32:
            _TRACED.pop(next(iter(_TRACED)))
        _TRACED[key] = _trace_normals(obj, cameras.to("cpu"), resolution)
    normals, hit = _TRACED[key]
    return normals.clone(), hit.clone()


def normal_error_deg(normals: torch.Tensor, foreground: torch.Tensor, truth: torch.Tensor,
                     truth_hit: torch.Tensor) -> float | None:
    """Mean angle in degrees between ``normals`` (any length; composited normals are normalised here) and the
    unit ``truth`` over pixels where both ``foreground`` and ``truth_hit`` are set; None where there are none."""
    both = (foreground > 0.5) & (truth_hit > 0.5)
    if not both.any():
        return None
    mine = normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-8)
    cosine = (mine * truth).sum(1, keepdim=True).clamp(-1.0, 1.0)
    return float(torch.rad2deg(torch.acos(cosine[both])).mean())


def normal_error_from_render(prompt: str, cameras: CameraBatch, resolution: int, normals: torch.Tensor,
                             opacity: torch.Tensor) -> dict[str, float]:
    """``normal_error_deg`` of a render's normals (``[B, 3, R, R]``) and opacity at ``cameras``."""
    truth, hit = true_normals(prompt, cameras, resolution)
    error = normal_error_deg(normals.float().cpu(), opacity.float().cpu(), truth, hit)
    return {} if error is None or math.isnan(error) else {"normal_error_deg": error}
