"""Guidance backends: the synthetic prior, and real diffusion models (loaded on demand)."""

from __future__ import annotations

from pathlib import Path

from dreamfusion.config import Config
from dreamfusion.guidance.base import Guidance


def make_guidance(config: Config, cache_dir: Path | None = None) -> Guidance:
    if config.guidance.backend == "synthetic":
        from dreamfusion.guidance.synthetic import SyntheticGuidance

        return SyntheticGuidance(config, cache_dir)
    from dreamfusion.config import resolve_device
    from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance

    device = resolve_device(config.device)
    if config.guidance.backend == "stable-diffusion":
        return StableDiffusionGuidance(config, device)
    if config.guidance.backend == "deepfloyd-if":
        return DeepFloydIFGuidance(config, device)
    raise AssertionError(f"unvalidated guidance backend {config.guidance.backend!r}")


__all__ = ["Guidance", "make_guidance"]
