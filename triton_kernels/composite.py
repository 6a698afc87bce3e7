"""Volume compositing per ray: PyTorch reference and Triton kernels with the same signature.

``composite(sigma, colour, delta, t, stop_transmittance)`` with ``sigma, delta, t`` ``[R, S]`` and
``colour`` ``[R, S, C]`` returns ``weights [R, S]``, ``colour [R, C]``, ``opacity [R]``, ``depth [R]``.
Transmittance before sample i is T_i = exp(-sum_{j<i} sigma_j delta_j); once it drops below
``stop_transmittance`` the ray terminates early (the remaining weights are zero).
"""

from __future__ import annotations

import torch

STOP_TRANSMITTANCE = 1e-4


def composite_reference(sigma, colour, delta, t, stop_transmittance: float = STOP_TRANSMITTANCE):
    optical = sigma * delta
    transmittance = torch.exp(-(torch.cumsum(optical, dim=1) - optical))
    alpha = 1.0 - torch.exp(-optical)
    weights = torch.where(transmittance >= stop_transmittance, alpha * transmittance, torch.zeros_like(alpha))
    return weights, (weights[..., None] * colour).sum(1), weights.sum(1), (weights * t).sum(1)


def _get_kernels():
    from triton_kernels import _composite_kernels

    return _composite_kernels.forward, _composite_kernels.backward


BLOCK_RAYS = 64


def _channels_block(channels: int) -> int:
    return max(1, 1 << (channels - 1).bit_length())


class _CompositeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigma, colour, delta, t, stop_transmittance):
        forward_kernel, _ = _get_kernels()
        rays, samples = sigma.shape
        channels = colour.shape[-1]
        sigma, colour, delta, t = (x.contiguous().float() for x in (sigma, colour, delta, t))
        weights = torch.empty_like(sigma)
        out_colour = torch.empty(rays, channels, device=sigma.device, dtype=torch.float32)
        opacity = torch.empty(rays, device=sigma.device, dtype=torch.float32)
        depth = torch.empty_like(opacity)
        if rays:
            grid = ((rays + BLOCK_RAYS - 1) // BLOCK_RAYS,)
            forward_kernel[grid](sigma, colour, delta, t, weights, out_colour, opacity, depth, rays, samples,
                                 channels, stop_transmittance, BLOCK=BLOCK_RAYS, CB=_channels_block(channels))
        ctx.save_for_backward(sigma, colour, delta, t, weights)
        ctx.stop_transmittance = stop_transmittance
        return weights, out_colour, opacity, depth

    @staticmethod
    def backward(ctx, grad_weights, grad_colour, grad_opacity, grad_depth):
        _, backward_kernel = _get_kernels()
        sigma, colour, delta, t, weights = ctx.saved_tensors
        rays, samples = sigma.shape
        channels = colour.shape[-1]

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
            backward_kernel[grid](sigma, colour, delta, t, weights, grad_weights, grad_colour, grad_opacity,
                                  grad_depth, grad_sigma, grad_sample_colour, rays, samples, channels,
                                  ctx.stop_transmittance, BLOCK=BLOCK_RAYS, CB=_channels_block(channels))
        return grad_sigma, grad_sample_colour, None, None, None


def composite_triton(sigma, colour, delta, t, stop_transmittance: float = STOP_TRANSMITTANCE):
    return _CompositeTriton.apply(sigma, colour, delta, t, stop_transmittance)


def composite(sigma, colour, delta, t, stop_transmittance: float = STOP_TRANSMITTANCE, backend: str = "torch"):
    if backend == "triton":
        return composite_triton(sigma, colour, delta, t, stop_transmittance)
    return composite_reference(sigma, colour, delta, t, stop_transmittance)
