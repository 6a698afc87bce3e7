"""Multiresolution hash-grid encoding: PyTorch reference and Triton kernels with the same signature.

``hash_encode(points, table, resolutions, offsets, sizes, dense_count)``: ``points`` ``[N, 3]`` in
[0, 1], ``table`` ``[rows, F]``; levels ``< dense_count`` index densely, the rest hash (Instant-NGP
primes, wrapping like uint32). Returns ``[N, L * F]``.
"""

from __future__ import annotations

import torch

# int32 arithmetic wraps like Instant-NGP's uint32: the low bits that ``& (size - 1)`` keeps agree.
PRIMES = (1, 2654435761 - 2**32, 805459861)


def _corners(
    points: torch.Tensor,
    resolutions: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    dense_count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows ``[N, L, 8]`` of each point's cell corners and their per-axis weights ``[N, L, 3, 2]``."""
    count, levels = points.shape[0], resolutions.shape[0]
    res_f = resolutions.to(points.dtype)
    scaled = points.clamp(0.0, 1.0)[:, None, :] * res_f[None, :, None]
    cell = torch.minimum(scaled.detach().floor(), (res_f - 1)[None, :, None])
    frac = scaled - cell
    vertex = torch.stack([cell, cell + 1], dim=-1).to(torch.int32)  # [N, L, 3, 2]
    axis_weight = torch.stack([1.0 - frac, frac], dim=-1)
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
    return index, axis_weight


def _trilinear(axis_weight: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 2]`` per-axis weights → ``[..., 8]`` corner weights (x slowest, z fastest)."""
    x, y, z = axis_weight[..., 0, :], axis_weight[..., 1, :], axis_weight[..., 2, :]
    return (x[..., :, None, None] * y[..., None, :, None] * z[..., None, None, :]).flatten(-3)


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # index_select (int64 index) + einsum: an order of magnitude faster on the CPU than embedding + mul/sum.
    return table.index_select(0, index.reshape(-1).long()).reshape(*index.shape, -1)


def hash_encode_reference(
    points: torch.Tensor,
    table: torch.Tensor,
    resolutions: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    dense_count: int,
) -> torch.Tensor:
    """Vectorised over levels and corners: per-axis terms on ``[N, L, 2]`` combined by broadcasting."""
    index, axis_weight = _corners(points, resolutions, offsets, sizes, dense_count)
    features = _gather(table, index)
    encoded = torch.einsum("nlcf,nlc->nlf", features, _trilinear(axis_weight).to(features.dtype))
    return encoded.reshape(points.shape[0], -1)


def hash_encode_with_jacobian(
    points: torch.Tensor,
    table: torch.Tensor,
    resolutions: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    dense_count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoding ``[N, L * F]`` and its derivative by the points ``[N, 3, L * F]``, from one gather.

    Forward-mode and first-order in the table: a loss on the derivative (normals) backpropagates
    through one scatter, where ``torch.autograd.grad(..., create_graph=True)`` would differentiate
    the backward pass. Points outside [0, 1] are clamped, so their derivative is zero, as autograd's.
    """
    count = points.shape[0]
    index, axis_weight = _corners(points, resolutions, offsets, sizes, dense_count)
    features = _gather(table, index)
    levels = resolutions.shape[0]
    inside = ((points >= 0.0) & (points <= 1.0)).to(points.dtype)  # [N, 3]
    # Per-axis weights of each (point, level) as [axis, side, N * L]: products over a long contiguous
    # last dimension vectorise on the CPU, broadcasts over [..., 2, 2, 2] do not.
    weight = axis_weight.permute(2, 3, 0, 1).reshape(3, 2, -1)
    # d(axis weight)/d(point): (-r, +r) along its own axis.
    rate = (resolutions.to(points.dtype)[None, :, None] * inside[:, None, :]).permute(2, 0, 1).reshape(3, -1)
    slope = torch.stack([-rate, rate], dim=1)
    x = torch.stack([weight[0], slope[0], weight[0], weight[0]])  # [value, d/dx, d/dy, d/dz, side, N * L]
    y = torch.stack([weight[1], weight[1], slope[1], weight[1]])
    z = torch.stack([weight[2], weight[2], weight[2], slope[2]])
    corner = (x[:, :, None, None] * y[:, None, :, None] * z[:, None, None, :]).reshape(4, 8, -1)
    corner = corner.permute(2, 0, 1).reshape(count, levels, 4, 8).to(features.dtype)
    combined = torch.matmul(corner, features)  # [N, L, 4, F]: a batched [4, 8] @ [8, F]
    jacobian = combined[:, :, 1:].permute(0, 2, 1, 3).reshape(count, 3, -1)
    return combined[:, :, 0].reshape(count, -1), jacobian


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
