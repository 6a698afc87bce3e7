"""Multiresolution hash-grid encoding: PyTorch reference and Triton kernels with the same signature.

``hash_encode(points, table, resolutions, offsets, sizes, dense_count)``: ``points`` ``[N, 3]`` in
[0, 1], ``table`` ``[rows, F]``; levels ``< dense_count`` index densely, the rest hash (Instant-NGP
primes, wrapping like uint32). Returns ``[N, L * F]``.
"""

from __future__ import annotations

import torch

# int32 arithmetic wraps like Instant-NGP's uint32: the low bits that ``& (size - 1)`` keeps agree.
PRIMES = (1, 2654435761 - 2**32, 805459861)


def hash_encode_reference(
    points: torch.Tensor,
    table: torch.Tensor,
    resolutions: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    dense_count: int,
) -> torch.Tensor:
    """Vectorised over levels and corners: per-axis terms on ``[N, L, 2]`` combined by broadcasting."""
    count, levels = points.shape[0], resolutions.shape[0]
    res_f = resolutions.to(points.dtype)
    scaled = points.clamp(0.0, 1.0)[:, None, :] * res_f[None, :, None]
    cell = torch.minimum(scaled.detach().floor(), (res_f - 1)[None, :, None])
    frac = scaled - cell
    vertex = torch.stack([cell, cell + 1], dim=-1).to(torch.int32)  # [N, L, 3, 2]
    axis_weight = torch.stack([1.0 - frac, frac], dim=-1)
    weights = (
        axis_weight[:, :, 0, :, None, None] * axis_weight[:, :, 1, None, :, None] * axis_weight[:, :, 2, None, None, :]
    ).reshape(count, levels, 8)
    parts = []
    if dense_count:
        v = vertex[:, :dense_count]
        stride = (resolutions[:dense_count] + 1).to(torch.int32)[None, :, None, None, None]
        x, y, z = v[:, :, 0, :, None, None], v[:, :, 1, None, :, None], v[:, :, 2, None, None, :]
        parts.append(x + stride * y + (stride * stride) * z)
    if dense_count < levels:
        v = vertex[:, dense_count:]
        hashed = (
            (v[:, :, 0, :, None, None] * PRIMES[0])
            ^ (v[:, :, 1, None, :, None] * PRIMES[1])
            ^ (v[:, :, 2, None, None, :] * PRIMES[2])
        )
        table_size = sizes[dense_count:].to(torch.int32)[None, :, None, None, None]
        parts.append(hashed & (table_size - 1))
    index = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    index = index.reshape(count, levels, 8) + offsets.to(torch.int32)[None, :, None]
    # index_select (int64 index) + einsum: an order of magnitude faster on the CPU than embedding + mul/sum.
    features = table.index_select(0, index.reshape(-1).long()).reshape(count, levels, 8, -1)
    encoded = torch.einsum("nlcf,nlc->nlf", features, weights.to(features.dtype))
    return encoded.reshape(count, levels * table.shape[1])


def _get_kernels():
    from triton_kernels import _hashgrid_kernels

    return _hashgrid_kernels.forward, _hashgrid_kernels.backward


BLOCK = 128


class _HashEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, table, resolutions, offsets, sizes, dense_count):
        forward_kernel, _ = _get_kernels()
        count, levels, features = points.shape[0], resolutions.shape[0], table.shape[1]
        out = torch.empty(count, levels * features, device=points.device, dtype=torch.float32)
        if count:
            grid = ((count + BLOCK - 1) // BLOCK, levels)
            forward_kernel[grid](points.contiguous().float(), table.contiguous().float(), out,
                                 resolutions.int(), offsets.int(), sizes.int(), count, levels, dense_count,
                                 F=features, BLOCK=BLOCK)
        ctx.save_for_backward(points, table, resolutions, offsets, sizes)
        ctx.dense_count = dense_count
        return out.to(table.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        points, table, resolutions, offsets, sizes = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A second derivative was asked for (normals from the density gradient, create_graph=True):
            # the reference is differentiable end to end, so the double backward goes through it.
            with torch.enable_grad():
                out = hash_encode_reference(points, table, resolutions, offsets, sizes, ctx.dense_count)
                inputs = [t for t, need in zip((points, table), ctx.needs_input_grad[:2], strict=True) if need]
                grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
            return (next(grads) if ctx.needs_input_grad[0] else None,
                    next(grads) if ctx.needs_input_grad[1] else None, None, None, None, None)
        _, backward_kernel = _get_kernels()
        count, levels, features = points.shape[0], resolutions.shape[0], table.shape[1]
        grad_table = torch.zeros(table.shape, device=table.device, dtype=torch.float32)
        grad_points = torch.zeros(points.shape, device=points.device, dtype=torch.float32)
        if count:
            grid = ((count + BLOCK - 1) // BLOCK, levels)
            backward_kernel[grid](points.contiguous().float(), table.contiguous().float(),
                                  grad_out.contiguous().float(), grad_table, grad_points, resolutions.int(),
                                  offsets.int(), sizes.int(), count, levels, ctx.dense_count, F=features,
                                  BLOCK=BLOCK, POINT_GRAD=bool(ctx.needs_input_grad[0]))
        return (grad_points.to(points.dtype) if ctx.needs_input_grad[0] else None,
                grad_table.to(table.dtype) if ctx.needs_input_grad[1] else None, None, None, None, None)


def hash_encode_triton(points, table, resolutions, offsets, sizes, dense_count: int) -> torch.Tensor:
    return _HashEncodeTriton.apply(points, table, resolutions, offsets, sizes, dense_count)


def hash_encode(points, table, resolutions, offsets, sizes, dense_count: int, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return hash_encode_triton(points, table, resolutions, offsets, sizes, dense_count)
    return hash_encode_reference(points, table, resolutions, offsets, sizes, dense_count)
