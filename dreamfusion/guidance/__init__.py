"""Guidance backends: the synthetic prior, and real diffusion models (loaded on demand)."""

from __future__ import annotations

from pathlib import Path

from dreamfusion.config import Config
from dreamfusion.guidance.base import Guidance
from dreamfusion.text_cache import TextEmbeddingCache


def check_config(config: Config) -> Config:
    """``config.validate()`` and the checks only its backend can make (the synthetic prior knows which
    negative prompts it can condition on), before any work."""
    config.validate()
    if config.sds.negative_prompt and config.guidance.backend == "synthetic":
        from dreamfusion.guidance.synthetic import prior_condition
        from dreamfusion.sds import negative_text

        prior_condition(negative_text(config.sds.negative_prompt, config.prompt))
    return config


def make_guidance(config: Config, cache_dir: Path | None = None, text_cache: TextEmbeddingCache | None = None
                  ) -> Guidance:
    """The configured backend; ``cache_dir`` holds the synthetic prior's photos, ``text_cache`` a real
    model's text embeddings (both default to ``$DREAMFUSION_CACHE``)."""
    if config.guidance.backend == "synthetic":
        from dreamfusion.guidance.synthetic import SyntheticGuidance

        return SyntheticGuidance(config, cache_dir)
    from dreamfusion.config import resolve_device
    from dreamfusion.guidance.diffusion import DeepFloydIFGuidance, StableDiffusionGuidance
    from dreamfusion.prior.synthetic import default_cache_dir

    device = resolve_device(config.device)
    text_cache = text_cache or TextEmbeddingCache(default_cache_dir())
    if config.guidance.backend == "stable-diffusion":
        return StableDiffusionGuidance(config, device, text_cache=text_cache)
    if config.guidance.backend == "deepfloyd-if":
        return DeepFloydIFGuidance(config, device, text_cache=text_cache)
    raise AssertionError(f"unvalidated guidance backend {config.guidance.backend!r}")


__all__ = ["Guidance", "check_config", "make_guidance"]
