import torch
from torch import nn

from dreamfusion.config import SDSConfig
from dreamfusion.guidance.base import Guidance, scaled_linear_alphas_cumprod
from dreamfusion.sds import sds_loss, timestep_bounds, weighting
from tests.conftest import views_of


class NetworkGuidance(Guidance):
    """A guidance backend with real parameters, to prove SDS never backpropagates into them."""

    def __init__(self):
        self.net = nn.Conv2d(3, 3, 1)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.calls = []

    def encode(self, images, progress=1.0):
        return images * 2 - 1

    def predict_noise(self, noisy, timesteps, views, guidance_scale, textureless=False, progress=1.0):
        self.calls.append((timesteps.clone(), views, guidance_scale, torch.is_grad_enabled()))
        return self.net(noisy)


def test_gradient_reaches_render_never_the_guidance_network():
    guidance = NetworkGuidance()
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    result = sds_loss(guidance, images, views_of(["front", "back"]), SDSConfig(), 0.0, torch.Generator().manual_seed(0))
    result.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in guidance.net.parameters())
    assert guidance.calls[0][1].labels == ["front", "back"] and guidance.calls[0][3] is False


def test_render_gradient_equals_weighted_noise_residual():
    guidance = NetworkGuidance()
    config = SDSConfig(guidance_scale=7.5)
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    sds_loss(guidance, images, None, config, 0.3, torch.Generator().manual_seed(5)).loss.backward()

    # Replay the same draws to rebuild w(t) (eps_hat - eps) by hand.
    generator = torch.Generator().manual_seed(5)
    low, high = timestep_bounds(config, 0.3)
    t = ((low + (high - low) * torch.rand(3, generator=generator)) * 999).round().long()
    noise = torch.randn(3, 3, 8, 8, generator=generator)
    ab = guidance.alphas_cumprod[t].reshape(3, 1, 1, 1)
    x = images.detach() * 2 - 1
    eps_hat = guidance.net(ab.sqrt() * x + (1 - ab).sqrt() * noise).detach()
    expected = weighting(config, ab) * (eps_hat - noise) * 2 / 3  # d(2x-1)/dx = 2; loss is averaged over B
    torch.testing.assert_close(images.grad, expected, atol=1e-5, rtol=1e-4)


def test_timestep_annealing():
    config = SDSConfig(t_min=0.02, t_max=0.98, t_max_final=0.5)
    assert timestep_bounds(config, 0.0) == (0.02, 0.98)
    assert abs(timestep_bounds(config, 1.0)[1] - 0.5) < 1e-9
    assert timestep_bounds(config, 0.5)[1] < 0.98
