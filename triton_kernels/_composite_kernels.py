"""Triton kernels of volume compositing over packed samples: one ray per lane, its samples walked front to
back (``longest`` steps, the most samples any ray has; shorter rays are masked)."""

import triton
import triton.language as tl


@triton.jit
def forward(sigma_ptr, colour_ptr, delta_ptr, t_ptr, start_ptr, count_ptr, weights_ptr, out_colour_ptr, opacity_ptr,
            depth_ptr, rays, longest, channels, stop_transmittance, BLOCK: tl.constexpr, CB: tl.constexpr):
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ray < rays
    start = tl.load(start_ptr + ray, mask=live, other=0)
    count = tl.load(count_ptr + ray, mask=live, other=0)
    channel = tl.arange(0, CB)
    channel_ok = channel < channels
    transmittance = tl.full([BLOCK], 1.0, tl.float32)
    acc_colour = tl.zeros([BLOCK, CB], dtype=tl.float32)
    acc_opacity = tl.zeros([BLOCK], dtype=tl.float32)
    acc_depth = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(longest):
        on, at, sigma, delta = _sample(sigma_ptr, delta_ptr, start, count, live, i)
        t = tl.load(t_ptr + at, mask=on, other=0.0)
        decay = tl.exp(-sigma * delta)
        weight = tl.where(transmittance >= stop_transmittance, (1.0 - decay) * transmittance, 0.0)
        colour = tl.load(colour_ptr + at[:, None] * channels + channel[None, :],
                         mask=on[:, None] & channel_ok[None, :], other=0.0)
        tl.store(weights_ptr + at, weight, mask=on)
        acc_colour += weight[:, None] * colour
        acc_opacity += weight
        acc_depth += weight * t
        transmittance = transmittance * decay
    tl.store(out_colour_ptr + ray[:, None] * channels + channel[None, :], acc_colour,
             mask=live[:, None] & channel_ok[None, :])
    tl.store(opacity_ptr + ray, acc_opacity, mask=live)
    tl.store(depth_ptr + ray, acc_depth, mask=live)


@triton.jit
def backward(sigma_ptr, colour_ptr, delta_ptr, t_ptr, start_ptr, count_ptr, weights_ptr, grad_weights_ptr,
             grad_colour_ptr, grad_opacity_ptr, grad_depth_ptr, grad_sigma_ptr, grad_sample_colour_ptr, rays, longest,
             channels, stop_transmittance, BLOCK: tl.constexpr, CB: tl.constexpr):
    # dL/dsigma_i = delta_i * (T_{i+1} G_i - sum_{k>i} w_k G_k), with G_i = dL/dw_i in total.
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = ray < rays
    start = tl.load(start_ptr + ray, mask=live, other=0)
    count = tl.load(count_ptr + ray, mask=live, other=0)
    channel = tl.arange(0, CB)
    channel_ok = channel < channels
    g_colour = tl.load(grad_colour_ptr + ray[:, None] * channels + channel[None, :],
                       mask=live[:, None] & channel_ok[None, :], other=0.0)
    g_opacity = tl.load(grad_opacity_ptr + ray, mask=live, other=0.0)
    g_depth = tl.load(grad_depth_ptr + ray, mask=live, other=0.0)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(longest):
        on = live & (i < count)
        at = start + i
        weight = tl.load(weights_ptr + at, mask=on, other=0.0)
        total += weight * _total_grad(colour_ptr, t_ptr, grad_weights_ptr, at, channel, channels, channel_ok, on,
                                      g_colour, g_opacity, g_depth)
    transmittance = tl.full([BLOCK], 1.0, tl.float32)
    prefix = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(longest):
        on, at, sigma, delta = _sample(sigma_ptr, delta_ptr, start, count, live, i)
        weight = tl.load(weights_ptr + at, mask=on, other=0.0)
        g = _total_grad(colour_ptr, t_ptr, grad_weights_ptr, at, channel, channels, channel_ok, on, g_colour,
                        g_opacity, g_depth)
        active = transmittance >= stop_transmittance
        next_transmittance = transmittance * tl.exp(-sigma * delta)
        prefix += weight * g
        grad_sigma = tl.where(active, delta * (next_transmittance * g - (total - prefix)), 0.0)
        tl.store(grad_sigma_ptr + at, grad_sigma, mask=on)
        tl.store(grad_sample_colour_ptr + at[:, None] * channels + channel[None, :], weight[:, None] * g_colour,
                 mask=on[:, None] & channel_ok[None, :])
        transmittance = next_transmittance


@triton.jit
def _sample(sigma_ptr, delta_ptr, start, count, live, i):
    """Sample ``i`` of each lane's ray: whether it exists, where it is packed, its density and step."""
    on = live & (i < count)
    at = start + i
    return on, at, tl.load(sigma_ptr + at, mask=on, other=0.0), tl.load(delta_ptr + at, mask=on, other=0.0)


@triton.jit
def _total_grad(colour_ptr, t_ptr, grad_weights_ptr, at, channel, channels, channel_ok, on, g_colour, g_opacity,
                g_depth):
    colour = tl.load(colour_ptr + at[:, None] * channels + channel[None, :], mask=on[:, None] & channel_ok[None, :],
                     other=0.0)
    t = tl.load(t_ptr + at, mask=on, other=0.0)
    g_weight = tl.load(grad_weights_ptr + at, mask=on, other=0.0)
    return tl.sum(colour * g_colour, axis=1) + g_opacity + g_depth * t + g_weight
