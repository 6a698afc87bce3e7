"""Which implementation runs: ``auto | torch | triton | tcnn``."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "tcnn")


class BackendUnavailable(RuntimeError):
    """The requested kernel backend cannot run here; the message says what to install or change."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(requested: str, device: torch.device) -> str:
    """``auto`` is Triton on CUDA tensors (when Triton imports) and PyTorch elsewhere."""
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown kernel backend '{requested}'; choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested == "triton":
        if not triton_available():
            raise BackendUnavailable("the triton backend needs Triton: pip install triton")
        if device.type != "cuda" and not triton_interpreted():
            raise BackendUnavailable(
                "the triton backend runs on CUDA tensors; on the CPU use field.backend=torch (or auto), "
                "or set TRITON_INTERPRET=1 before starting Python to run the kernels in Triton's interpreter"
            )
    if requested == "tcnn" and importlib.util.find_spec("tinycudann") is None:
        raise BackendUnavailable(
            "the tcnn backend needs tiny-cuda-nn, which is not on PyPI: install it from source with "
            "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch "
            "(needs CUDA and a compiler), or use field.backend=auto"
        )
    return requested
