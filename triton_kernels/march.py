"""Ray marching against an occupancy grid, and the grid's update: PyTorch references and Triton kernels.

``march_rays(origins, directions, near, far, offsets, occupied)``: stratified samples in [near, far]
(``offsets`` ``[R, S]`` in [0, 1) jitter each stratum), returning ``points [R, S, 3]``, ``t [R, S]`` and
``keep [R, S]`` (the ray hits the bounds and the sample's cell of ``occupied`` ``[G, G, G]`` is set; all
kept when ``occupied`` is None). Survivors are packed by the caller with ``keep.nonzero()``.

``occupancy_update(density, fresh, decay, threshold)``: ``max(decay * density, fresh)`` (an infinite
``density`` marks a grid never updated) and the cells above ``threshold``.
"""

from __future__ import annotations

import torch


def march_rays_reference(origins, directions, near, far, offsets, occupied):
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
    return points, t, keep


def occupancy_update_reference(density, fresh, decay: float, threshold: float):
    previous = torch.where(torch.isinf(density), torch.zeros_like(density), density)
    updated = torch.maximum(previous * decay, fresh)
    return updated, updated > threshold


BLOCK = 256


def march_rays_triton(origins, directions, near, far, offsets, occupied):
    from triton_kernels import _march_kernels

    rays, samples = offsets.shape
    points = torch.empty(rays, samples, 3, device=origins.device, dtype=torch.float32)
    t = torch.empty(rays, samples, device=origins.device, dtype=torch.float32)
    keep = torch.empty(rays, samples, device=origins.device, dtype=torch.int8)
    total = rays * samples
    grid_cells = occupied.to(torch.int8).contiguous() if occupied is not None else keep  # unused when absent
    if total:
        _march_kernels.march[((total + BLOCK - 1) // BLOCK,)](
            origins.contiguous().float(), directions.contiguous().float(), near.contiguous().float(),
            far.contiguous().float(), offsets.contiguous().float(), grid_cells, points, t, keep, total, samples,
            occupied.shape[0] if occupied is not None else 1, HAS_GRID=occupied is not None, BLOCK=BLOCK,
        )
    return points, t, keep.bool()


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


def march_rays(origins, directions, near, far, offsets, occupied, backend: str = "torch"):
    fn = march_rays_triton if backend == "triton" else march_rays_reference
    return fn(origins, directions, near, far, offsets, occupied)


def occupancy_update(density, fresh, decay: float, threshold: float, backend: str = "torch"):
    fn = occupancy_update_triton if backend == "triton" else occupancy_update_reference
    return fn(density, fresh, decay, threshold)
