"""Triton kernels of ray marching against the occupancy grid and of the grid's update."""

import triton
import triton.language as tl


@triton.jit
def march(origins_ptr, directions_ptr, near_ptr, far_ptr, offsets_ptr, grid_ptr, points_ptr, t_ptr, keep_ptr,
          total, samples, resolution, HAS_GRID: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = index < total
    ray = index // samples
    step = (index % samples).to(tl.float32)
    near = tl.load(near_ptr + ray, mask=live, other=0.0)
    far = tl.load(far_ptr + ray, mask=live, other=0.0)
    offset = tl.load(offsets_ptr + index, mask=live, other=0.0)
    t = near + (far - near) * (step + offset) / samples
    keep = far > near
    flat = tl.zeros([BLOCK], dtype=tl.int32)
    for axis in tl.static_range(3):
        origin = tl.load(origins_ptr + ray * 3 + axis, mask=live, other=0.0)
        direction = tl.load(directions_ptr + ray * 3 + axis, mask=live, other=0.0)
        point = origin + direction * t
        tl.store(points_ptr + index * 3 + axis, point, mask=live)
        # Only with a grid: without one the compiler makes `resolution` (then 1) a Python int, a constant.
        if HAS_GRID:
            # (p + 1) / 2 * G truncated toward zero, then clamped: the reference's .long().clamp().
            cell = ((point + 1.0) * 0.5 * resolution).to(tl.int32)
            cell = tl.minimum(tl.maximum(cell, 0), resolution - 1)
            flat = flat * resolution + cell
    if HAS_GRID:
        occupied = tl.load(grid_ptr + flat, mask=live, other=0)
        keep = keep & (occupied != 0)
    tl.store(t_ptr + index, t, mask=live)
    tl.store(keep_ptr + index, keep.to(tl.int8), mask=live)


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
