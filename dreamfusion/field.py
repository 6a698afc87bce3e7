"""The NeRF being optimised: hash-grid features → MLP → log-density and albedo, plus a background."""

from __future__ import annotations

from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from dreamfusion.config import FieldConfig
from dreamfusion.encoding import HashGridEncoding

# Log-density is clamped before exp: beyond e^15 a sample is opaque anyway, and the clamp keeps
# early steps from overflowing.
MAX_LOG_DENSITY = 15.0


def density_from_log(log_density: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_density.clamp(max=MAX_LOG_DENSITY))


class RadianceField(nn.Module):
    """Anything the renderer can draw: log-density and albedo at points, colour behind the scene.

    Points live in the unit bounding sphere; directions are unit vectors.
    """

    def log_density_and_albedo(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_density_albedo_and_gradient(
        self, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Also the log-density's gradient by the points ``[N, 3]`` (normals), differentiable when
        gradients are on. This default differentiates the backward pass."""
        differentiable = torch.is_grad_enabled()
        points = points.detach().requires_grad_(True)
        with torch.enable_grad():
            log_density, albedo = self.log_density_and_albedo(points)
            (gradient,) = torch.autograd.grad(
                log_density, points, torch.ones_like(log_density), create_graph=differentiable
            )
        return log_density, albedo, gradient

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _mlp(in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, hidden), nn.ReLU(inplace=False)]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


class NeRFField(RadianceField):
    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = HashGridEncoding(
            levels=config.levels,
            features_per_level=config.features_per_level,
            log2_table_size=config.log2_table_size,
            base_resolution=config.base_resolution,
            max_resolution=config.max_resolution,
            backend=config.backend,
        )
        self.mlp = _mlp(self.encoder.output_dim, config.hidden_dim, config.hidden_layers, 4)
        self.background_net = _mlp(3 * 2 * 4 + 3, 16, 1, 3) if config.background == "learned" else None
        self.register_buffer("background_color", torch.tensor(config.background_color), persistent=False)

    def blob(self, points: torch.Tensor) -> torch.Tensor:
        """DreamFusion's density bias: an object at the centre from step one, empty space elsewhere.

        It stays in the parameterisation (as in DreamFusion); the network overrides it early on.
        """
        return self.config.blob_density * (1.0 - points.norm(dim=-1) / self.config.blob_radius)

    def _run_mlp(self, fn, *inputs: torch.Tensor):
        if self.config.checkpointing and torch.is_grad_enabled():
            # The MLP's activations grow with the sample count; recompute them in the backward pass.
            return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)
        return fn(*inputs)

    def _heads(self, out: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out[:, 0] + self.blob(points), torch.sigmoid(out[:, 1:])

    def log_density_and_albedo(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self._run_mlp(self.mlp, self.encoder((points + 1.0) * 0.5)), points)

    def log_density_albedo_and_gradient(
        self, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.config.normals == "autograd" or self.encoder.tcnn_encoding is not None:
            return super().log_density_albedo_and_gradient(points)
        features, jacobian = self.encoder.forward_with_jacobian((points + 1.0) * 0.5)
        # The encoder sees (points + 1) / 2: its derivative by the points is half its own.
        out, tangents = self._run_mlp(partial(_mlp_with_tangents, self.mlp), features, jacobian * 0.5)
        radial = points / points.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        blob_gradient = radial * (-self.config.blob_density / self.config.blob_radius)
        return *self._heads(out, points), tangents[:, :, 0] + blob_gradient

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        if self.background_net is None:
            return self.background_color.to(directions.dtype).expand(directions.shape[0], 3)
        return torch.sigmoid(self.background_net(_frequency_encode(directions, 4)))

    def parameter_groups(self, lr: float, mlp_lr_ratio: float) -> list[dict]:
        """Hash tables learn at ``lr``; the MLPs, which see every sample, at a fraction of it."""
        mlp_params = list(self.mlp.parameters())
        if self.background_net is not None:
            mlp_params += list(self.background_net.parameters())
        return [
            {"params": [self.encoder.table], "lr": lr, "name": "encoding"},
            {"params": mlp_params, "lr": lr * mlp_lr_ratio, "name": "mlp"},
        ]


def _mlp_with_tangents(
    mlp: nn.Sequential, inputs: torch.Tensor, tangents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's output ``[N, out]`` and its derivatives ``[N, 3, out]`` along the input tangents
    ``[N, 3, in]`` (forward mode through its linear and ReLU layers)."""
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            inputs = layer(inputs)
            tangents = tangents @ layer.weight.T
        elif isinstance(layer, nn.ReLU):
            active = (inputs > 0).to(inputs.dtype)
            inputs = inputs * active
            tangents = tangents * active[:, None, :]
        else:
            raise TypeError(f"no forward-mode rule for {type(layer).__name__}")
    return inputs, tangents


def _frequency_encode(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    scales = 2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device)
    scaled = x[..., None, :] * scales[:, None]
    return torch.cat([x, torch.sin(scaled).flatten(-2), torch.cos(scaled).flatten(-2)], dim=-1)
