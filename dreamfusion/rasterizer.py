"""A differentiable triangle rasterizer on the CPU and on CUDA, split as Laine et al. 2020 ("Modular Primitives
for High-Performance Differentiable Rendering") split theirs:

1. visibility, without gradients: the triangle and depth seen at each pixel centre (Embree's ray caster on the
   CPU; on other devices a z-buffer in torch, ``zbuffer``, which is also the reference the tests hold Embree to);
2. differentiable in torch: perspective-correct barycentrics recomputed from the vertices by intersecting each
   pixel's ray with its triangle (gradients inside triangles), interpolation of vertex attributes, and
3. an edge antialias (``antialias``): where two neighbouring pixels see different triangles across a silhouette
   edge of the front one, the pixels' colours are blended by where the edge crosses between their centres,
   the analytic coverage of a one-pixel box filter, so the gradient reaches the edge's vertices.

Cameras are ``dreamfusion.cameras.CameraBatch``: the same rays as the volume renderer's, pixel centres at
``(k + 0.5) / R`` of the image plane, rows from the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dreamfusion.cameras import CameraBatch, generate_rays
from dreamfusion.dmtet import face_neighbours

BACKGROUND = -1  # the triangle id of a pixel that sees nothing
VISIBILITY_BACKENDS = ("auto", "embree", "torch")


@dataclass
class Rasterized:
    """A rasterized batch: ``triangle`` ``[B, H, W]`` (``BACKGROUND`` where nothing is hit) and, for the ``hit``
    pixels in row-major order, ``barycentrics`` ``[N, 3]`` and ray ``distance`` ``[N]``, differentiable in the
    vertices."""

    triangle: torch.Tensor
    hit: torch.Tensor  # [B, H, W] bool
    barycentrics: torch.Tensor
    distance: torch.Tensor
    resolution: int

    def interpolate(self, attributes: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Per-vertex ``attributes`` ``[V, C]`` at the hit pixels: ``[N, C]``."""
        corners = attributes[faces[self.triangle[self.hit]]]  # [N, 3, C]
        return (corners * self.barycentrics[..., None]).sum(1)

    def scatter(self, values: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """Hit-pixel ``values`` ``[N, C]`` over ``background`` ``[B, H, W, C]``, as ``[B, C, H, W]``."""
        image = background.clone()
        image[self.hit] = values.to(image.dtype)
        return image.permute(0, 3, 1, 2)


def resolve_visibility(backend: str, device: torch.device) -> str:
    if backend not in VISIBILITY_BACKENDS:
        raise ValueError(f"unknown visibility backend {backend!r}; use one of {', '.join(VISIBILITY_BACKENDS)}")
    if backend == "auto":
        return "embree" if device.type == "cpu" and _has_embree() else "torch"
    if backend == "embree" and not _has_embree():
        raise ValueError("the embree visibility backend needs embreex (pip install embreex, x86_64 only)")
    return backend


def _has_embree() -> bool:
    try:
        import embreex  # noqa: F401
    except ImportError:
        return False
    return True


def project(points: torch.Tensor, cameras: CameraBatch, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``[B, N, 3]`` in each camera's pixel coordinates ``[B, N, 2]`` (column, row; pixel k's centre at
    k) and their depth along the view axis ``[B, N]``."""
    local = torch.einsum("bij,bni->bnj", cameras.rotations.to(points), points - cameras.positions[:, None].to(points))
    tan_half = torch.tan(torch.deg2rad(cameras.fov_degrees.to(points)) / 2.0)[:, None]
    depth = local[..., 2]
    x = local[..., 0] / (depth * tan_half)
    y = local[..., 1] / (depth * tan_half)
    column = (x + 1.0) * 0.5 * resolution - 0.5
    row = (1.0 - y) * 0.5 * resolution - 0.5
    return torch.stack([column, row], dim=-1), depth


@torch.no_grad()
def zbuffer(vertices: torch.Tensor, faces: torch.Tensor, cameras: CameraBatch, resolution: int,
            near: float = 1e-3) -> torch.Tensor:
    """The nearest triangle at each pixel centre, ``[B, H, W]`` (``BACKGROUND`` where none): every triangle's
    pixels enumerated over its bounding box, depth interpolated perspective-correctly, the nearest kept by a
    scatter of (depth, triangle) keys. Runs on any device."""
    batch, device = len(cameras), vertices.device
    out = torch.full((batch, resolution * resolution), BACKGROUND, dtype=torch.long, device=device)
    if faces.shape[0] == 0:
        return out.reshape(batch, resolution, resolution)
    screen, depth = project(vertices[None].expand(batch, -1, -1), cameras.to(device), resolution)
    for b in range(batch):
        corner = screen[b][faces]  # [F, 3, 2]
        z = depth[b][faces]  # [F, 3]
        keep = (z > near).all(-1)
        low = corner.amin(1).ceil().clamp(0, resolution - 1)
        high = corner.amax(1).floor().clamp(0, resolution - 1)
        keep &= (corner.amax(1) >= 0).all(-1) & (corner.amin(1) <= resolution - 1).all(-1) & (high >= low).all(-1)
        index = torch.nonzero(keep).squeeze(1)
        extent = (high[index] - low[index] + 1).long()
        counts = extent[:, 0] * extent[:, 1]
        if counts.sum() == 0:
            continue
        face = torch.repeat_interleave(index, counts)
        local = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        per = torch.repeat_interleave(torch.arange(len(index), device=device), counts)
        column = low[index][per, 0].long() + local % extent[per, 0]
        row = low[index][per, 1].long() + local // extent[per, 0]
        a, bb, c = corner[face, 0], corner[face, 1], corner[face, 2]
        p = torch.stack([column, row], dim=-1).to(corner)
        area = _cross2(bb - a, c - a)
        w0, w1, w2 = _cross2(c - bb, p - bb), _cross2(a - c, p - c), _cross2(bb - a, p - a)
        safe = torch.where(area.abs() < 1e-12, torch.ones_like(area), area)
        weights = torch.stack([w0, w1, w2], dim=-1) / safe[:, None]
        inside = (weights >= -1e-6).all(-1) & (area.abs() >= 1e-12)
        inverse_depth = (weights / z[face]).sum(-1)  # 1/z is linear in screen space
        inside &= inverse_depth > 0
        key_depth = (1.0 / inverse_depth[inside]).float()
        # Positive floats order as their bit patterns: (depth bits, triangle) packs into one comparable key.
        key = (key_depth.view(torch.int32).long() << 32) | face[inside]
        pixel = row[inside] * resolution + column[inside]
        best = torch.full((resolution * resolution,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
        best.scatter_reduce_(0, pixel, key, reduce="amin")
        seen = best != torch.iinfo(torch.long).max
        out[b, seen] = best[seen] & 0xFFFFFFFF
    return out.reshape(batch, resolution, resolution)


def _cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


@torch.no_grad()
def embree_visibility(vertices: torch.Tensor, faces: torch.Tensor, cameras: CameraBatch, resolution: int
                      ) -> torch.Tensor:
    """The first triangle each pixel's ray hits, by Embree: ``[B, H, W]``."""
    from embreex import rtcore_scene
    from embreex.mesh_construction import TriangleMesh

    batch = len(cameras)
    out = np.full(batch * resolution * resolution, BACKGROUND, dtype=np.int64)
    if faces.shape[0]:
        scene = rtcore_scene.EmbreeScene()
        TriangleMesh(scene=scene, vertices=vertices.detach().cpu().numpy().astype(np.float32),
                     indices=faces.cpu().numpy().astype(np.int32))
        origins, directions = generate_rays(cameras.to("cpu"), resolution)
        ids = scene.run(origins.reshape(-1, 3).numpy().astype(np.float32),
                        directions.reshape(-1, 3).numpy().astype(np.float32))
        out = np.asarray(ids, dtype=np.int64)
        out[out < 0] = BACKGROUND
    return torch.from_numpy(out).reshape(batch, resolution, resolution).to(vertices.device)


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, cameras: CameraBatch, resolution: int,
              backend: str = "auto") -> Rasterized:
    """Visibility by ``backend``, then barycentrics and distances recomputed differentiably from
    ``vertices`` by intersecting each hit pixel's ray with its triangle."""
    backend = resolve_visibility(backend, vertices.device)
    if backend == "embree":
        triangle = embree_visibility(vertices, faces, cameras, resolution)
    else:
        triangle = zbuffer(vertices, faces, cameras, resolution)
    hit = triangle != BACKGROUND
    origins, directions = generate_rays(cameras.to(vertices.device), resolution)
    flat_hit = hit.reshape(len(cameras), -1)
    o, d = origins[flat_hit].to(vertices), directions[flat_hit].to(vertices)
    p0, p1, p2 = (vertices[faces[triangle[hit], i]] for i in range(3))
    # Möller–Trumbore: the ray o + t d meets the plane of the triangle at barycentrics (1 - u - v, u, v).
    e1, e2 = p1 - p0, p2 - p0
    h = torch.cross(d, e2, dim=-1)
    det = (e1 * h).sum(-1)
    det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    s = o - p0
    u = (s * h).sum(-1) / det
    q = torch.cross(s, e1, dim=-1)
    v = (d * q).sum(-1) / det
    distance = (e2 * q).sum(-1) / det
    return Rasterized(triangle, hit, torch.stack([1.0 - u - v, u, v], dim=-1), distance, resolution)


def antialias(image: torch.Tensor, rasterized: Rasterized, vertices: torch.Tensor, faces: torch.Tensor,
              cameras: CameraBatch, neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """``image`` ``[B, C, H, W]`` with its silhouette edges antialiased, differentiably in ``vertices``.

    For each pair of horizontally or vertically adjacent pixels that see different triangles, the nearer
    pixel's triangle is the front one; if one of its edges separates the two pixel centres on screen and is a
    silhouette edge (the face across it faces away from the camera, or there is none), the pixel on the far
    side of the crossing from the edge takes a share of the other's colour equal to how far the edge reaches
    past the midpoint. The share is linear in the crossing, which is a function of the edge's projected
    vertices: that is the gradient that moves silhouettes.
    """
    if neighbours is None:
        neighbours = face_neighbours(faces)
    batch, channels, size, _ = image.shape
    depth = torch.full((batch, size, size), float("inf"), device=image.device, dtype=image.dtype)
    depth[rasterized.hit] = rasterized.distance.detach().to(image.dtype)
    triangle = rasterized.triangle
    flat = image.permute(0, 2, 3, 1).reshape(-1, channels)
    pixel = torch.arange(batch * size * size, device=image.device).reshape(batch, size, size)
    firsts, seconds, directions = [], [], []
    for dy, dx in ((0, 1), (1, 0)):
        a = pixel[:, : size - dy, : size - dx].reshape(-1)
        b = pixel[:, dy:, dx:].reshape(-1)
        differ = triangle.reshape(-1)[a] != triangle.reshape(-1)[b]
        firsts.append(a[differ])
        seconds.append(b[differ])
        directions.append(torch.full((int(differ.sum()),), dy, dtype=torch.long, device=image.device))
    a, b, vertical = torch.cat(firsts), torch.cat(seconds), torch.cat(directions).bool()
    flat_depth, flat_triangle = depth.reshape(-1), triangle.reshape(-1)
    a_front = flat_depth[a] <= flat_depth[b]
    front = torch.where(a_front, a, b)
    back = torch.where(a_front, b, a)
    face = flat_triangle[front]
    camera = front // (size * size)
    if front.numel() == 0:
        return image

    corners = vertices[faces[face]]  # [P, 3, 3]
    screen, _ = _project_per_pair(corners, cameras, camera, size)  # [P, 3, 2]
    centre = lambda p: torch.stack([(p % size).to(screen), ((p // size) % size).to(screen)], dim=-1)  # noqa: E731
    f_centre, b_centre = centre(front)[:, None], centre(back)[:, None]  # [P, 1, 2]
    start, end = screen, screen.roll(-1, dims=1)  # edge k: corner k to corner k + 1
    third = screen.roll(-2, dims=1)
    side = torch.sign(_cross2(end - start, third - start))
    e_front = _cross2(end - start, f_centre - start) * side
    e_back = _cross2(end - start, b_centre - start) * side
    crosses = (e_front >= 0) & (e_back < 0)
    crossing = e_front / (e_front - e_back).clamp_min(1e-12)  # 0 at the front centre, 1 at the back one

    # Silhouette edges: the face across faces away from this camera, or there is none.
    eye = cameras.positions.to(vertices)[camera]
    usable = crosses & _faces_away(vertices, faces, neighbours[face], eye)
    crossing = torch.where(usable, crossing, torch.full_like(crossing, float("inf")))
    t, edge = crossing.min(dim=1)
    keep = torch.isfinite(t)
    if not keep.any():
        return image
    t, front, back = t[keep], front[keep], back[keep]
    # An edge is crossed by horizontal and by vertical pairs; each direction takes the share of the blend that
    # the edge's normal has along it, so a pixel's total stays continuous when its centre crosses the edge.
    along = (end - start)[keep].gather(1, edge[keep, None, None].expand(-1, 1, 2)).squeeze(1).abs()
    share = torch.where(vertical[keep], along[:, 0], along[:, 1]) / along.sum(-1).clamp_min(1e-12)
    front_colour, back_colour = flat[front], flat[back]
    # Edge inside the front pixel (t < 1/2): the front pixel shows the back colour over (1/2 - t) of its width;
    # inside the back pixel (t > 1/2): the back pixel shows the front colour over (t - 1/2).
    into_front = (share * (0.5 - t).clamp_min(0.0))[:, None]
    into_back = (share * (t - 0.5).clamp_min(0.0))[:, None]
    delta = torch.zeros_like(flat)
    delta = delta.index_add(0, front, into_front * (back_colour - front_colour))
    delta = delta.index_add(0, back, into_back * (front_colour - back_colour))
    return (flat + delta).reshape(batch, size, size, channels).permute(0, 3, 1, 2)


def _faces_away(vertices: torch.Tensor, faces: torch.Tensor, across: torch.Tensor, eye: torch.Tensor
                ) -> torch.Tensor:
    """``[P, 3]``: whether the face across each edge faces away from ``eye`` ``[P, 3]`` (or is missing)."""
    with torch.no_grad():
        other = vertices[faces[across.clamp_min(0)]]  # [P, 3, 3 corners, 3]
        normal = torch.cross(other[..., 1, :] - other[..., 0, :], other[..., 2, :] - other[..., 0, :], dim=-1)
        facing = (normal * (eye[:, None] - other[..., 0, :])).sum(-1)
    return (across < 0) | (facing <= 0)


def _project_per_pair(points: torch.Tensor, cameras: CameraBatch, camera: torch.Tensor, resolution: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``project`` with a camera per row of ``points`` ``[P, K, 3]``."""
    chosen = CameraBatch(*(getattr(cameras, name).to(points.device)[camera] for name in cameras.__dataclass_fields__))
    return project(points, chosen, resolution)
