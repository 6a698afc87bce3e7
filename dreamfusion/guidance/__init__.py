"""Guidance backends: the synthetic prior here; real diffusion models load on demand."""

from __future__ import annotations

from pathlib import Path

from dreamfusion.config import Config
from dreamfusion.guidance.base import Guidance


def make_guidance(config: Config, cache_dir: Path | None = None) -> Guidance:
    if config.guidance.backend == "synthetic":
        from dreamfusion.guidance.synthetic import SyntheticGuidance

        return SyntheticGuidance(config, cache_dir)
    raise AssertionError(f"unvalidated guidance backend {config.guidance.backend!r}")


__all__ = ["Guidance", "make_guidance"]
