"""When a tensor can be read through a TMA tensor descriptor (Hopper's bulk tensor copies)."""

from __future__ import annotations

import functools

import torch

from flextron_kernels.backends import device_index

try:  # Triton 3.3 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    """Whether CUDA device ``index`` is an NVIDIA GPU with TMA (read once per device)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def tma_ready(t: torch.Tensor, strides: tuple[int, int]) -> bool:
    """Whether TMA can read ``t`` addressed as a matrix with ``strides``: a Triton with
    host tensor descriptors, an NVIDIA GPU with TMA (compute capability 9 or above; or the
    CPU, where the Triton interpreter stands in), one unit stride, and the base address
    and the other stride 16-byte aligned."""
    if TensorDescriptor is None:
        return False
    if t.device.type != "cpu" and not (t.is_cuda and _has_tma(device_index(t.device))):
        return False
    if 1 not in strides or t.data_ptr() % 16:
        return False
    other = strides[0] if strides[1] == 1 else strides[1]
    return other > 0 and other * t.element_size() % 16 == 0
