"""Volume compositing of packed samples (``march.PackedSamples``): PyTorch reference and Triton kernels with
the same signature.

``composite(sigma, colour, delta, t, start, count, stop_transmittance)`` with ``sigma, delta, t`` ``[N]`` and
``colour`` ``[N, C]`` packed ray after ray (ray r's samples are ``start[r] : start[r] + count[r]``, front to
back) returns ``weights [N]``, ``colour [R, C]``, ``opacity [R]``, ``depth [R]``. Transmittance before sample
i is T_i = exp(-sum_{j<i} sigma_j delta_j) over the samples of its ray; once it drops below
``stop_transmittance`` the ray terminates early (the remaining weights are zero).
"""

from __future__ import annotations

import torch

STOP_TRANSMITTANCE = 1e-4


def transmittance(optical: torch.Tensor, start: torch.Tensor, ray: torch.Tensor) -> torch.Tensor:
    """T before each packed sample, given each sample's optical thickness ``sigma * delta`` and ray."""
    # One running sum over every ray, less its value where each ray starts. In float64: the running sum
    # grows with the number of rays, and float32 would lose the digits a ray's own thickness lives in.
    inclusive = torch.cumsum(optical.double(), 0)
    exclusive = inclusive - optical
    return torch.exp(-(exclusive - exclusive[start[ray]])).to(optical.dtype)


def composite_reference(sigma, colour, delta, t, start, count, stop_transmittance: float = STOP_TRANSMITTANCE):
    rays = count.shape[0]
    ray = torch.repeat_interleave(torch.arange(rays, device=count.device), count)  # each sample's ray
    optical = sigma * delta
    before = transmittance(optical, start, ray)
    alpha = 1.0 - torch.exp(-optical)
    weights = torch.where(before >= stop_transmittance, alpha * before, torch.zeros_like(alpha))

    def per_ray(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros((rays,) + values.shape[1:], dtype=values.dtype, device=values.device).index_add(
            0, ray, values)

    return weights, per_ray(weights[:, None] * colour), per_ray(weights), per_ray(weights * t)


def _get_kernels():
    from triton_kernels import _composite_kernels

    return _composite_kernels.forward, _composite_kernels.backward


BLOCK_RAYS = 64


def _channels_block(channels: int) -> int:
    return max(1, 1 << (channels - 1).bit_length())


class _CompositeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigma, colour, delta, t, start, count, stop_transmittance):
        forward_kernel, _ = _get_kernels()
        rays, channels = count.shape[0], colour.shape[-1]
        sigma, colour, delta, t = (x.contiguous().float() for x in (sigma, colour, delta, t))
        start, count = start.contiguous().long(), count.contiguous().long()
        longest = int(count.max()) if rays else 0
        weights = torch.empty_like(sigma)
        out_colour = torch.empty(rays, channels, device=sigma.device, dtype=torch.float32)
        opacity = torch.empty(rays, device=sigma.device, dtype=torch.float32)
        depth = torch.empty_like(opacity)
        if rays:
            grid = ((rays + BLOCK_RAYS - 1) // BLOCK_RAYS,)
            forward_kernel[grid](sigma, colour, delta, t, start, count, weights, out_colour, opacity, depth, rays,
                                 longest, channels, stop_transmittance, BLOCK=BLOCK_RAYS, CB=_channels_block(channels))
        ctx.save_for_backward(sigma, colour, delta, t, start, count, weights)
        ctx.stop_transmittance = stop_transmittance
        ctx.longest = longest
        return weights, out_colour, opacity, depth

    @staticmethod
    def backward(ctx, grad_weights, grad_colour, grad_opacity, grad_depth):
        _, backward_kernel = _get_kernels()
        sigma, colour, delta, t, start, count, weights = ctx.saved_tensors
        rays, channels = count.shape[0], colour.shape[-1]

        def dense(grad, like):
            return torch.zeros_like(like) if grad is None else grad.contiguous().float()

        grad_weights = dense(grad_weights, weights)
        grad_colour = dense(grad_colour, torch.empty(rays, channels, device=sigma.device))
        grad_opacity = dense(grad_opacity, torch.empty(rays, device=sigma.device))
        grad_depth = dense(grad_depth, torch.empty(rays, device=sigma.device))
        grad_sigma = torch.zeros_like(sigma)
        grad_sample_colour = torch.zeros_like(colour)
        if rays:
            grid = ((rays + BLOCK_RAYS - 1) // BLOCK_RAYS,)
            backward_kernel[grid](sigma, colour, delta, t, start, count, weights, grad_weights, grad_colour,
                                  grad_opacity, grad_depth, grad_sigma, grad_sample_colour, rays, ctx.longest,
                                  channels, ctx.stop_transmittance, BLOCK=BLOCK_RAYS, CB=_channels_block(channels))
        return grad_sigma, grad_sample_colour, None, None, None, None, None


def composite_triton(sigma, colour, delta, t, start, count, stop_transmittance: float = STOP_TRANSMITTANCE):
    return _CompositeTriton.apply(sigma, colour, delta, t, start, count, stop_transmittance)


def composite(sigma, colour, delta, t, start, count, stop_transmittance: float = STOP_TRANSMITTANCE,
              backend: str = "torch"):
    fn = composite_triton if backend == "triton" else composite_reference
    return fn(sigma, colour, delta, t, start, count, stop_transmittance)
