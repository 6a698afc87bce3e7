"""Triton kernels of ray marching against the occupancy grid (one ray per lane, two passes: count, then
write packed) and of the grid's update."""

import triton
import triton.language as tl


@triton.jit
def _ray(origins_ptr, directions_ptr, near_ptr, far_ptr, ray, live):
    near = tl.load(near_ptr + ray, mask=live, other=0.0)
    far = tl.load(far_ptr + ray, mask=live, other=0.0)
    ox = tl.load(origins_ptr + ray * 3, mask=live, other=0.0)
    oy = tl.load(origins_ptr + ray * 3 + 1, mask=live, other=0.0)
    oz = tl.load(origins_ptr + ray * 3 + 2, mask=live, other=0.0)
    dx = tl.load(directions_ptr + ray * 3, mask=live, other=0.0)
    dy = tl.load(directions_ptr + ray * 3 + 1, mask=live, other=0.0)
    dz = tl.load(directions_ptr + ray * 3 + 2, mask=live, other=0.0)
    return near, far, ox, oy, oz, dx, dy, dz, live & (far > near)


@triton.jit
def _cell(point, resolution):
    # (p + 1) / 2 * G truncated toward zero, then clamped: the reference's .long().clamp().
    cell = ((point + 1.0) * 0.5 * resolution).to(tl.int32)
    return tl.minimum(tl.maximum(cell, 0), resolution - 1)


@triton.jit
def _sample(offsets_ptr, grid_ptr, ray, step, samples, resolution, near, far, ox, oy, oz, dx, dy, dz, hit,
            HAS_GRID: tl.constexpr):
    offset = tl.load(offsets_ptr + ray * samples + step, mask=hit, other=0.0)
    t = near + (far - near) * (step + offset) / samples
    px = ox + dx * t
    py = oy + dy * t
    pz = oz + dz * t
    keep = hit
    # Only with a grid: without one the compiler makes `resolution` (then 1) a Python int, a constant.
    if HAS_GRID:
        flat = (_cell(px, resolution) * resolution + _cell(py, resolution)) * resolution + _cell(pz, resolution)
        keep = keep & (tl.load(grid_ptr + flat, mask=hit, other=0) != 0)
    return t, px, py, pz, keep


@triton.jit
def count_samples(origins_ptr, directions_ptr, near_ptr, far_ptr, offsets_ptr, grid_ptr, count_ptr, rays, samples,
                  resolution, HAS_GRID: tl.constexpr, BLOCK: tl.constexpr):
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ray < rays
    near, far, ox, oy, oz, dx, dy, dz, hit = _ray(origins_ptr, directions_ptr, near_ptr, far_ptr, ray, live)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(samples):
        _, _, _, _, keep = _sample(offsets_ptr, grid_ptr, ray, step, samples, resolution, near, far, ox, oy, oz,
                                   dx, dy, dz, hit, HAS_GRID)
        count += keep.to(tl.int32)
    tl.store(count_ptr + ray, count, mask=live)


@triton.jit
def write_samples(origins_ptr, directions_ptr, near_ptr, far_ptr, offsets_ptr, grid_ptr, start_ptr, points_ptr,
                  t_ptr, ray_ptr, rays, samples, resolution, HAS_GRID: tl.constexpr, BLOCK: tl.constexpr):
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ray < rays
    near, far, ox, oy, oz, dx, dy, dz, hit = _ray(origins_ptr, directions_ptr, near_ptr, far_ptr, ray, live)
    at = tl.load(start_ptr + ray, mask=live, other=0)
    for step in range(samples):
        t, px, py, pz, keep = _sample(offsets_ptr, grid_ptr, ray, step, samples, resolution, near, far, ox, oy, oz,
                                      dx, dy, dz, hit, HAS_GRID)
        tl.store(t_ptr + at, t, mask=keep)
        tl.store(points_ptr + at * 3, px, mask=keep)
        tl.store(points_ptr + at * 3 + 1, py, mask=keep)
        tl.store(points_ptr + at * 3 + 2, pz, mask=keep)
        tl.store(ray_ptr + at, ray.to(tl.int64), mask=keep)
        at += keep.to(tl.int64)


@triton.jit
def occupancy_update(density_ptr, fresh_ptr, updated_ptr, occupied_ptr, total, decay, threshold,
                     BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = index < total
    density = tl.load(density_ptr + index, mask=live, other=0.0)
    fresh = tl.load(fresh_ptr + index, mask=live, other=0.0)
    previous = tl.where(density == float("inf"), 0.0, density)
    updated = tl.maximum(previous * decay, fresh)
    tl.store(updated_ptr + index, updated, mask=live)
    tl.store(occupied_ptr + index, (updated > threshold).to(tl.int8), mask=live)
