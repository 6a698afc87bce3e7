"""Ray marching against an occupancy grid, and the grid's update: PyTorch references and Triton kernels.

``march_rays(origins, directions, near, far, offsets, occupied)``: stratified samples in [near, far]
(``offsets`` ``[R, S]`` in [0, 1) jitter each stratum), of which only those in an occupied cell of
``occupied`` ``[G, G, G]`` (every one when ``occupied`` is None) of rays that hit the bounds are kept,
packed ray after ray as nerfacc packs them (``PackedSamples``): nothing is allocated for the rest.

``occupancy_update(density, fresh, decay, threshold)``: ``max(decay * density, fresh)`` (an infinite
``density`` marks a grid never updated) and the cells above ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSamples:
    """Ragged samples per ray, stored contiguously ray after ray in front-to-back order.

    ``points [N, 3]``, ``t [N]``, ``ray [N]`` (the ray each sample belongs to); ``start [R]`` and
    ``count [R]`` locate each ray's samples (``count`` 0 for a ray with none).
    """

    points: torch.Tensor
    t: torch.Tensor
    ray: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor

    def __len__(self) -> int:
        return self.t.shape[0]

    def select(self, mask: torch.Tensor) -> PackedSamples:
        """The samples where ``mask [N]`` is set, packed again."""
        ray = self.ray[mask]
        count = torch.bincount(ray, minlength=self.count.shape[0])
        return PackedSamples(self.points[mask], self.t[mask], ray, torch.cumsum(count, 0) - count, count)


def packed(points: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> PackedSamples:
    """Pack the samples where ``keep [R, S]`` is set out of dense ``points [R, S, 3]`` and ``t [R, S]``."""
    samples = keep.shape[1]
    flat = keep.reshape(-1).nonzero().squeeze(1)  # row-major: ray after ray, front to back
    count = keep.sum(1)
    return PackedSamples(points.reshape(-1, 3)[flat], t.reshape(-1)[flat], flat // samples,
                         torch.cumsum(count, 0) - count, count)


def march_rays_reference(origins, directions, near, far, offsets, occupied) -> PackedSamples:
    samples = offsets.shape[1]
    steps = torch.arange(samples, dtype=origins.dtype, device=origins.device)
    t = near[:, None] + (far - near)[:, None] * (steps[None] + offsets) / samples
    points = origins[:, None, :] + directions[:, None, :] * t[..., None]
    keep = (far > near)[:, None].expand(-1, samples)
    if occupied is not None:
        resolution = occupied.shape[0]
        cell = ((points + 1.0) * 0.5 * resolution).long().clamp(0, resolution - 1)
        flat = (cell[..., 0] * resolution + cell[..., 1]) * resolution + cell[..., 2]
        keep = keep & occupied.reshape(-1)[flat]
    return packed(points, t, keep)


def occupancy_update_reference(density, fresh, decay: float, threshold: float):
    previous = torch.where(torch.isinf(density), torch.zeros_like(density), density)
    updated = torch.maximum(previous * decay, fresh)
    return updated, updated > threshold


BLOCK = 256
BLOCK_RAYS = 64


def march_rays_triton(origins, directions, near, far, offsets, occupied) -> PackedSamples:
    """Two passes over the rays, as nerfacc's traversal: count each ray's kept samples, then write them
    at the offsets the counts give, so the dense ``[R, S]`` samples are never stored."""
    from triton_kernels import _march_kernels

    rays, samples = offsets.shape
    device = origins.device
    inputs = tuple(x.contiguous().float() for x in (origins, directions, near, far, offsets))
    count = torch.zeros(rays, device=device, dtype=torch.int32)
    grid_cells = occupied.to(torch.int8).contiguous() if occupied is not None else count  # unused when absent
    resolution = occupied.shape[0] if occupied is not None else 1
    launch = ((rays + BLOCK_RAYS - 1) // BLOCK_RAYS,)
    if rays:
        _march_kernels.count_samples[launch](*inputs, grid_cells, count, rays, samples, resolution,
                                             HAS_GRID=occupied is not None, BLOCK=BLOCK_RAYS)
    count = count.long()
    start = torch.cumsum(count, 0) - count
    total = int(count.sum())
    points = torch.empty(total, 3, device=device, dtype=torch.float32)
    t = torch.empty(total, device=device, dtype=torch.float32)
    ray = torch.empty(total, device=device, dtype=torch.int64)
    if total:
        _march_kernels.write_samples[launch](*inputs, grid_cells, start, points, t, ray, rays, samples, resolution,
                                             HAS_GRID=occupied is not None, BLOCK=BLOCK_RAYS)
    return PackedSamples(points, t, ray, start, count)


def occupancy_update_triton(density, fresh, decay: float, threshold: float):
    from triton_kernels import _march_kernels

    density = density.contiguous().float()
    updated = torch.empty_like(density)
    occupied = torch.empty(density.shape, device=density.device, dtype=torch.int8)
    total = density.numel()
    if total:
        _march_kernels.occupancy_update[((total + BLOCK - 1) // BLOCK,)](
            density, fresh.contiguous().float(), updated, occupied, total, decay, threshold, BLOCK=BLOCK
        )
    return updated, occupied.bool()


def march_rays(origins, directions, near, far, offsets, occupied, backend: str = "torch") -> PackedSamples:
    fn = march_rays_triton if backend == "triton" else march_rays_reference
    return fn(origins, directions, near, far, offsets, occupied)


def occupancy_update(density, fresh, decay: float, threshold: float, backend: str = "torch"):
    fn = occupancy_update_triton if backend == "triton" else occupancy_update_reference
    return fn(density, fresh, decay, threshold)
