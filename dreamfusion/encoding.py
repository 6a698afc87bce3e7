"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022) as a module.

The maths lives in ``triton_kernels.hashgrid`` (PyTorch reference and Triton kernel); this module
owns the table and the level layout. Levels whose (resolution + 1)^3 vertices fit in their table
index densely; finer levels hash with the Instant-NGP primes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from triton_kernels import hash_encode, hash_encode_with_jacobian
from triton_kernels import resolve as resolve_backend


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
        backend: str = "auto",
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
        self.dense_count = sum((r + 1) ** 3 <= self.table_size for r in resolutions)
        self.table = nn.Parameter(torch.empty(sum(sizes), features_per_level).uniform_(-1e-4, 1e-4))
        self.backend = backend
        self.tcnn_encoding = None
        if backend == "tcnn":
            resolve_backend("tcnn", torch.device("cuda"))
            import tinycudann

            growth = (max_resolution / base_resolution) ** (1.0 / max(levels - 1, 1))
            self.tcnn_encoding = tinycudann.Encoding(3, {
                "otype": "HashGrid", "n_levels": levels, "n_features_per_level": features_per_level,
                "log2_hashmap_size": log2_table_size, "base_resolution": base_resolution, "per_level_scale": growth,
            })

    @property
    def output_dim(self) -> int:
        return self.levels * self.features_per_level

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if self.tcnn_encoding is not None:
            return self.tcnn_encoding(points).to(points.dtype)
        return hash_encode(
            points, self.table, self.resolutions, self.level_offsets, self.level_sizes, self.dense_count,
            resolve_backend(self.backend, points.device),
        )

    def forward_with_jacobian(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and their derivative by the points ``[N, 3, output_dim]`` (PyTorch gathers on
        every device; tiny-cuda-nn exposes no derivative, so it has none)."""
        if self.tcnn_encoding is not None:
            raise NotImplementedError("tiny-cuda-nn encodings expose no derivative; differentiate with autograd")
        return hash_encode_with_jacobian(
            points, self.table, self.resolutions, self.level_offsets, self.level_sizes, self.dense_count
        )
