"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022), PyTorch path.

All levels and all eight cell corners are handled in one batched gather: the only Python loop is
over nothing in the hot path. Levels whose (resolution + 1)^3 vertices fit in their table index
densely; finer levels hash with the Instant-NGP primes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# int32 arithmetic wraps like the uint32 of Instant-NGP: the low bits that ``& (size - 1)`` keeps are
# the same, and int32 halves the memory traffic of the index math (the CPU hot spot).
_PRIMES = (1, 2654435761 - 2**32, 805459861)


def level_resolutions(levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    if levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (levels - 1))
    return [int(math.floor(base_resolution * growth**level)) for level in range(levels)]


class HashGridEncoding(nn.Module):
    """Maps points in [0, 1]^3 to ``levels * features_per_level`` features."""

    def __init__(
        self,
        levels: int = 16,
        features_per_level: int = 2,
        log2_table_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 2048,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.features_per_level = features_per_level
        self.table_size = 2**log2_table_size
        resolutions = level_resolutions(levels, base_resolution, max_resolution)
        sizes = [min(self.table_size, (r + 1) ** 3) for r in resolutions]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.long), persistent=False)
        self.register_buffer("level_sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # Dense levels come first (resolutions grow), so one split point separates the two kinds.
        self._dense_count = sum((r + 1) ** 3 <= self.table_size for r in resolutions)
        self.table = nn.Parameter(torch.empty(sum(sizes), features_per_level).uniform_(-1e-4, 1e-4))

    @property
    def output_dim(self) -> int:
        return self.levels * self.features_per_level

    def corner_indices_and_weights(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows ``[N, L, 8]`` and trilinear weights ``[N, L, 8]`` (differentiable in ``points``).

        Per-axis terms are built on ``[N, L, 2]`` and combined by broadcasting, so only the final
        xor/add and the weight product touch the eight-corner tensors.
        """
        count = points.shape[0]
        resolutions = self.resolutions.to(points.dtype)
        scaled = points.clamp(0.0, 1.0)[:, None, :] * resolutions[None, :, None]
        cell = torch.minimum(scaled.detach().floor(), (resolutions - 1)[None, :, None])
        frac = scaled - cell
        cell = cell.to(torch.int32)
        vertex = torch.stack([cell, cell + 1], dim=-1)  # [N, L, 3, 2]
        axis_weight = torch.stack([1.0 - frac, frac], dim=-1)
        weights = (
            axis_weight[:, :, 0, :, None, None]
            * axis_weight[:, :, 1, None, :, None]
            * axis_weight[:, :, 2, None, None, :]
        ).reshape(count, self.levels, 8)

        dense_count = self._dense_count
        parts = []
        if dense_count:
            v = vertex[:, :dense_count]
            stride = (self.resolutions[:dense_count] + 1).to(torch.int32)[None, :, None, None, None]
            parts.append(
                v[:, :, 0, :, None, None]
                + stride * v[:, :, 1, None, :, None]
                + (stride * stride) * v[:, :, 2, None, None, :]
            )
        if dense_count < self.levels:
            v = vertex[:, dense_count:]
            hashed = (
                (v[:, :, 0, :, None, None] * _PRIMES[0])
                ^ (v[:, :, 1, None, :, None] * _PRIMES[1])
                ^ (v[:, :, 2, None, None, :] * _PRIMES[2])
            )
            parts.append(hashed & (self.table_size - 1))
        index = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        index = index.reshape(count, self.levels, 8) + self.level_offsets.to(torch.int32)[None, :, None]
        return index, weights

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        index, weights = self.corner_indices_and_weights(points)
        count = points.shape[0]
        # index_select + einsum: an order of magnitude faster on the CPU than embedding + mul/sum.
        features = self.table.index_select(0, index.reshape(-1).long()).reshape(count, self.levels, 8, -1)
        encoded = torch.einsum("nlcf,nlc->nlf", features, weights.to(features.dtype))
        return encoded.reshape(count, self.output_dim)
