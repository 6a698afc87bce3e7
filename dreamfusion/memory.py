"""Memory controls: activation checkpointing, and the message a CUDA out-of-memory error turns into.

DeepSpeed's activation checkpointing (set up as a one-process group, which also works on a CPU) is
used where the backward pass is a plain ``.backward()``: the VAE encoder of Stable Diffusion, whose
activations at 512×512 dominate memory. DeepSpeed's checkpoint is re-entrant and refuses
``torch.autograd.grad``, which normals use with ``field.normals=autograd``, so the field's MLP is
checkpointed with PyTorch's non-re-entrant ``torch.utils.checkpoint`` (which supports it) whatever the mode.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from dreamfusion.errors import UserInputError

log = logging.getLogger(__name__)

_deepspeed_ready = False


def _deepspeed_checkpoint() -> Callable[..., Any] | None:
    global _deepspeed_ready  # one process-wide set-up, as DeepSpeed itself keeps its state globally
    try:
        import deepspeed
    except ImportError:
        return None
    if not _deepspeed_ready:
        import torch.distributed as dist

        if not dist.is_initialized():
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            # A file rendezvous, not a TCP port: trials side by side on one node would race for free ports.
            store = tempfile.NamedTemporaryFile(prefix="dreamfusion-deepspeed-", delete=False)
            store.close()
            os.unlink(store.name)
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       init_method=f"file://{store.name}", rank=0, world_size=1,
                                       auto_mpi_discovery=False, verbose=False)
        deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                          checkpoint_in_cpu=False, synchronize=False, profile=False)
        _deepspeed_ready = True
    return deepspeed.checkpointing.checkpoint


def _torch_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def _no_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


def checkpointer(mode: str, device: torch.device) -> Callable[..., Any]:
    """``checkpointer(mode, device)(function, *tensors)``: run ``function`` and recompute its activations in
    the backward pass instead of storing them. ``mode``: auto (DeepSpeed on CUDA where installed, torch
    otherwise), deepspeed, torch, off. On a CPU, DeepSpeed would compile its shared-memory communication op
    (C++) at first use on each machine, for nothing torch's checkpointing does not do, so auto takes torch's."""
    if mode == "off":
        return _no_checkpoint
    if mode == "deepspeed" or (mode == "auto" and device.type == "cuda"):
        found = _deepspeed_checkpoint()
        if found is not None:
            return found
        if mode == "deepspeed":
            raise UserInputError("guidance.checkpointing=deepspeed but DeepSpeed is not installed: "
                                 "pip install deepspeed, or use guidance.checkpointing=torch")
        log.info("DeepSpeed is not installed; activation checkpointing uses torch.utils.checkpoint")
    return _torch_checkpoint


def out_of_memory_message(exc: BaseException, config: Any) -> str:
    return (
        f"CUDA ran out of memory ({str(exc).splitlines()[0][:160]}). Lower the memory a step needs: "
        f"render.resolution (now {config.render.resolution}), render.batch_size (now {config.render.batch_size}), "
        f"render.samples_per_ray (now {config.render.samples_per_ray}); guidance.checkpointing=auto "
        f"(now {config.guidance.checkpointing}); guidance.dtype=fp16 (now {config.guidance.dtype}); "
        f"render.autocast=bf16 (now {config.render.autocast})"
    )
