from __future__ import annotations

import os

# Triton decides at kernel definition whether to interpret: set it before any kernel module loads.
# On CPU tensors `auto` still picks the PyTorch path; only tests that ask for `triton` run kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing may download in tests: model loading runs offline, on weights the tests build and save.
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path

import pytest
import torch

from dreamfusion.cameras import ViewCondition
from dreamfusion.config import Config, apply_overrides

TINY = [
    "render.resolution=16",
    "render.samples_per_ray=24",
    "render.batch_size=2",
    "render.occupancy_resolution=16",
    "render.occupancy_update_every=4",
    "field.levels=4",
    "field.log2_table_size=12",
    "field.max_resolution=64",
    "field.hidden_dim=16",
    "field.hidden_layers=1",
    "guidance.prior_resolution=16",
    "guidance.prior_views=48",
    "export.mesh_resolution=32",
    "export.video_frames=4",
    "export.video_resolution=32",
    "export.density_threshold=5",
    "export.preview_resolution=16",
    "export.progress_resolution=16",
    "export.eval_resolution=16",
    "export.eval_samples_per_ray=24",
]


@pytest.fixture(scope="session", autouse=True)
def prior_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prior cache per test session: the tiny prior renders once, never in the user's home."""
    path = tmp_path_factory.mktemp("prior-cache")
    os.environ["DREAMFUSION_CACHE"] = str(path)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return path


def views_of(labels: list[str], azimuths: list[float] | None = None,
             elevations: list[float] | None = None) -> ViewCondition:
    """A view condition for ``labels``, from azimuth and elevation 0 unless the angles are given."""
    zeros = [0.0] * len(labels)
    return ViewCondition(labels, torch.tensor(azimuths or zeros), torch.tensor(elevations or zeros))


def tiny_config(prompt: str = "a red ball", iterations: int = 6, extra: list[str] | None = None) -> Config:
    return apply_overrides(Config(prompt=prompt, iterations=iterations), TINY + list(extra or []))


@pytest.fixture
def tiny() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("tiny-if"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
