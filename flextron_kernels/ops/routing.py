"""Routing metadata: tokens grouped by width and a tile schedule, on the device.

Every routed op (per-token widths or head counts) launches its kernels over the
tiles described here, gathering each tile's rows through ``sorted_token_idx``. The
meaning is :func:`flextron_kernels.reference.routing_metadata`; the extension (C++
on CPU, CUDA on GPU) computes the same arrays bit for bit, with no host sync, and
the torch backend falls back to the reference's vectorised code.
"""

from __future__ import annotations

import functools

import torch

from flextron_kernels import reference
from flextron_kernels.backends import extension, select_backend
from flextron_kernels.ops.checks import (
    INTEGER_DTYPES,
    check_int,
    check_tensor,
    new_output,
    poison_outputs,
    value_checks_enabled,
)
from flextron_kernels.reference import RoutingMetadata

# Per-token widths are grouped into ranges of 64 (a reduction step of the routed matmul),
# at most this many (layers up to 16384 wide; wider ones get coarser ranges). The finer the
# groups, the closer the sort comes to exact widths: a row tile's widths sit closer together
# (its loops run to its largest), and the weight gradient skips more of the tokens that stop
# short of each block. Empty groups cost nothing in the kernels' launch grids.
MAX_DEFAULT_GROUPS = 256
_GROUP_GRANULE = 64


@functools.lru_cache(maxsize=256)
def _default_boundaries_cached(size: int, device: torch.device) -> torch.Tensor:
    step = max(_GROUP_GRANULE, -(-size // MAX_DEFAULT_GROUPS))
    step = -(-step // _GROUP_GRANULE) * _GROUP_GRANULE
    values = list(range(step, size, step)) + [size]
    return torch.tensor(values, dtype=torch.int32, device=device)


def default_boundaries(size: int, device: torch.device) -> torch.Tensor:
    """Group upper bounds for widths in ``[0, size]``: multiples of 64, at most
    ``MAX_DEFAULT_GROUPS`` groups.

    Returns an int32 tensor ``[G]``, strictly increasing, ending at ``size``.
    """
    return _default_boundaries_cached(int(size), torch.device(device))


def compute_routing_metadata(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int, *,
                             fresh: bool = False) -> RoutingMetadata:
    """:func:`routing_metadata` without its argument checks or its custom op: for the ops'
    own implementations, which already run below the dispatcher (a nested custom op would
    only add its dispatch cost to every call). Arguments as there, already valid.
    ``fresh``: outputs that share no memory with the inputs (a custom op's rule)."""
    ext = extension()
    # The extension's kernels take up to ROUTING_MAX_GROUPS groups; more go to torch.
    implemented = ("cuda", "torch") if ext is not None and boundaries.numel() <= ext.ROUTING_MAX_GROUPS else ("torch",)
    backend = select_backend("routing_metadata", widths.device, implemented, implemented)
    if backend == "torch":
        result = reference.routing_metadata(widths, boundaries, block_m)
        return RoutingMetadata(*(t.clone() for t in result)) if fresh else result
    return _extension_routing_metadata(widths, boundaries, block_m)


@torch.library.custom_op("flextron::routing_metadata", mutates_args=())
def _routing_metadata_op(
    widths: torch.Tensor, boundaries: torch.Tensor, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(compute_routing_metadata(widths, boundaries, block_m, fresh=True))


@_routing_metadata_op.register_fake
def _(widths, boundaries, block_m):
    num_tokens, num_groups = widths.shape[0], boundaries.shape[0]
    n_slots = reference.max_tiles(num_tokens, num_groups, block_m)

    def new(size):
        return widths.new_empty((size,), dtype=torch.int32)

    return new(num_tokens), new(num_groups + 1), new(n_slots), new(n_slots), new(n_slots), new(1)


def _extension_routing_metadata(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int) -> RoutingMetadata:
    ext = extension()
    widths = widths.to(torch.int32).contiguous()
    boundaries = boundaries.to(torch.int32).contiguous()
    num_tokens, num_groups = widths.numel(), boundaries.numel()
    n_slots = reference.max_tiles(num_tokens, num_groups, block_m)

    poison = poison_outputs()

    def new(size):
        return new_output((size,), dtype=torch.int32, device=widths.device, poison=poison)

    out = RoutingMetadata(new(num_tokens), new(num_groups + 1), new(n_slots), new(n_slots), new(n_slots), new(1))
    pointers = (widths.data_ptr(), num_tokens, boundaries.data_ptr(), num_groups, block_m) + tuple(
        t.data_ptr() for t in out
    )
    if widths.is_cuda:
        workspace_bytes = ext.routing_metadata_workspace_bytes(num_tokens, num_groups, block_m)
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=widths.device)
        with torch.cuda.device(widths.device):
            stream = torch.cuda.current_stream().cuda_stream
            ext.routing_metadata_cuda(*pointers, workspace.data_ptr(), workspace_bytes, stream)
    else:
        ext.routing_metadata_cpu(*pointers)
    return out


def routing_metadata(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int) -> RoutingMetadata:
    """Group tokens by width and lay out tiles of at most ``block_m`` tokens.

    Args:
        widths: ``[T]`` integer tensor (any integer dtype), each token's width.
        boundaries: ``[G]`` strictly increasing integer tensor on the same device:
            group ``g`` holds the tokens with ``boundaries[g-1] < width <= boundaries[g]``.
            Widths above ``boundaries[-1]`` fall in the last group.
        block_m: tile height in tokens, >= 1.

    Returns:
        :class:`~flextron_kernels.reference.RoutingMetadata` of int32 tensors on the
        widths' device (see there for each array's shape and meaning).
    """
    check_tensor("widths", widths, dtypes=INTEGER_DTYPES, ndim=1)
    check_tensor("boundaries", boundaries, dtypes=INTEGER_DTYPES, ndim=1, device=widths.device)
    if boundaries.numel() == 0:
        raise ValueError("boundaries: expected at least one group boundary, got an empty tensor")
    check_int("block_m", block_m, 1, 1 << 20)
    if value_checks_enabled(boundaries) and not bool((boundaries.diff() > 0).all()):
        raise ValueError(f"boundaries: expected strictly increasing values, got {boundaries.tolist()}")
    return RoutingMetadata(*torch.ops.flextron.routing_metadata(widths, boundaries, block_m))
