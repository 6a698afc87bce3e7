"""Hot paths of the renderer, each a PyTorch reference beside a Triton kernel with the same signature.

Kernels are imported only when the ``triton`` backend runs; ``backend.resolve`` picks one per device.
"""

from triton_kernels.backend import BACKENDS, BackendUnavailable, resolve
from triton_kernels.composite import composite
from triton_kernels.hashgrid import hash_encode, hash_encode_with_jacobian
from triton_kernels.march import march_rays, occupancy_update

__all__ = [
    "BACKENDS", "BackendUnavailable", "resolve", "composite", "hash_encode", "hash_encode_with_jacobian",
    "march_rays", "occupancy_update",
]
