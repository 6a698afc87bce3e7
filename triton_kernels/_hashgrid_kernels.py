"""Triton kernels of the hash-grid encoding (imported only when the triton backend runs)."""

import triton
import triton.language as tl


@triton.jit
def corner(points_ptr, idx, mask, level, res_ptr, offset_ptr, size_ptr, dense_count, c: tl.constexpr):
    res = tl.load(res_ptr + level)
    offset = tl.load(offset_ptr + level)
    size = tl.load(size_ptr + level)
    res_f = res.to(tl.float32)
    x = tl.load(points_ptr + idx * 3 + 0, mask=mask, other=0.0)
    y = tl.load(points_ptr + idx * 3 + 1, mask=mask, other=0.0)
    z = tl.load(points_ptr + idx * 3 + 2, mask=mask, other=0.0)
    sx = tl.minimum(tl.maximum(x, 0.0), 1.0) * res_f
    sy = tl.minimum(tl.maximum(y, 0.0), 1.0) * res_f
    sz = tl.minimum(tl.maximum(z, 0.0), 1.0) * res_f
    cx = tl.minimum(tl.floor(sx), res_f - 1.0)
    cy = tl.minimum(tl.floor(sy), res_f - 1.0)
    cz = tl.minimum(tl.floor(sz), res_f - 1.0)
    fx = sx - cx
    fy = sy - cy
    fz = sz - cz
    bx: tl.constexpr = c & 1
    by: tl.constexpr = (c >> 1) & 1
    bz: tl.constexpr = (c >> 2) & 1
    vx = cx.to(tl.int64) + bx
    vy = cy.to(tl.int64) + by
    vz = cz.to(tl.int64) + bz
    wx = fx if bx == 1 else 1.0 - fx
    wy = fy if by == 1 else 1.0 - fy
    wz = fz if bz == 1 else 1.0 - fz
    stride = res.to(tl.int64) + 1
    dense_index = vx + stride * (vy + stride * vz)
    hashed = (vx * 1) ^ (vy * 2654435761) ^ (vz * 805459861)
    hashed = hashed & (size.to(tl.int64) - 1)
    index = tl.where(level < dense_count, dense_index, hashed) + offset.to(tl.int64)
    sign_x = 1.0 if bx == 1 else -1.0
    sign_y = 1.0 if by == 1 else -1.0
    sign_z = 1.0 if bz == 1 else -1.0
    inside_x = (x >= 0.0) & (x <= 1.0)
    inside_y = (y >= 0.0) & (y <= 1.0)
    inside_z = (z >= 0.0) & (z <= 1.0)
    dwx = tl.where(inside_x, sign_x * res_f * wy * wz, 0.0)
    dwy = tl.where(inside_y, sign_y * res_f * wx * wz, 0.0)
    dwz = tl.where(inside_z, sign_z * res_f * wx * wy, 0.0)
    return index, wx * wy * wz, dwx, dwy, dwz


@triton.jit
def forward(points_ptr, table_ptr, out_ptr, res_ptr, offset_ptr, size_ptr, n_points, n_levels, dense_count,
            F: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    level = tl.program_id(1)
    mask = idx < n_points
    feature = tl.arange(0, F)
    acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(8):
        index, weight, _, _, _ = corner(points_ptr, idx, mask, level, res_ptr, offset_ptr, size_ptr, dense_count, c)
        values = tl.load(table_ptr + index[:, None] * F + feature[None, :], mask=mask[:, None], other=0.0)
        acc += weight[:, None] * values
    out = out_ptr + idx[:, None] * (n_levels * F) + level * F + feature[None, :]
    tl.store(out, acc, mask=mask[:, None])


@triton.jit
def backward(points_ptr, table_ptr, grad_out_ptr, grad_table_ptr, grad_points_ptr, res_ptr, offset_ptr, size_ptr,
             n_points, n_levels, dense_count, F: tl.constexpr, BLOCK: tl.constexpr, POINT_GRAD: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    level = tl.program_id(1)
    mask = idx < n_points
    feature = tl.arange(0, F)
    grad = tl.load(grad_out_ptr + idx[:, None] * (n_levels * F) + level * F + feature[None, :],
                   mask=mask[:, None], other=0.0)
    gx = tl.zeros([BLOCK], dtype=tl.float32)
    gy = tl.zeros([BLOCK], dtype=tl.float32)
    gz = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(8):
        index, weight, dwx, dwy, dwz = corner(points_ptr, idx, mask, level, res_ptr, offset_ptr, size_ptr,
                                              dense_count, c)
        rows = index[:, None] * F + feature[None, :]
        tl.atomic_add(grad_table_ptr + rows, weight[:, None] * grad, mask=mask[:, None])
        if POINT_GRAD:
            values = tl.load(table_ptr + rows, mask=mask[:, None], other=0.0)
            dot = tl.sum(values * grad, axis=1)
            gx += dot * dwx
            gy += dot * dwy
            gz += dot * dwz
    if POINT_GRAD:
        tl.atomic_add(grad_points_ptr + idx * 3 + 0, gx, mask=mask)
        tl.atomic_add(grad_points_ptr + idx * 3 + 1, gy, mask=mask)
        tl.atomic_add(grad_points_ptr + idx * 3 + 2, gz, mask=mask)

