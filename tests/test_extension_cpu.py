"""The compiled extension's host code: flextron_kernels._C on a machine without a GPU.

``_C.routing_metadata_cpu`` must agree bit for bit with
``flextron_kernels.reference.routing_metadata``. These tests skip only when the
extension was not built at all (a ``FLEXTRON_SKIP_EXT=1`` install); a module that
exists but fails to import is an error. ``FLEXTRON_EXPECT_EXT=1`` turns the skip
into a failure, for CI jobs that build the extension.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flextron_kernels import reference

POISON = -123456789


def _load_extension():
    if importlib.util.find_spec("flextron_kernels._C") is None:
        reason = "flextron_kernels._C is not built (installed with FLEXTRON_SKIP_EXT=1?)"
        if os.environ.get("FLEXTRON_EXPECT_EXT", "0") == "1":
            pytest.fail(reason + ", but FLEXTRON_EXPECT_EXT=1", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    # Present but broken (missing symbol, wrong Python ABI...): let the error show.
    return importlib.import_module("flextron_kernels._C")


_C = _load_extension()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def run_cpu(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int) -> reference.RoutingMetadata:
    """Call the extension on int32 host tensors, with poisoned output buffers."""
    widths = widths.to(torch.int32).contiguous()
    boundaries = boundaries.to(torch.int32).contiguous()
    num_tokens, num_groups = widths.numel(), boundaries.numel()
    slots = reference.max_tiles(num_tokens, num_groups, block_m)
    out = reference.RoutingMetadata(
        *(torch.full((n,), POISON, dtype=torch.int32) for n in (num_tokens, num_groups + 1, slots, slots, slots, 1))
    )
    _C.routing_metadata_cpu(
        widths.data_ptr(), num_tokens, boundaries.data_ptr(), num_groups, block_m, *(t.data_ptr() for t in out)
    )
    return out


def assert_matches_reference(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int) -> None:
    got = run_cpu(widths, boundaries, block_m)
    want = reference.routing_metadata(widths, boundaries, block_m)
    for name, g, w in zip(reference.RoutingMetadata._fields, got, want):
        assert g.dtype == torch.int32 and w.dtype == torch.int32, name
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if not torch.equal(g, w):
            bad = (g != w).nonzero().flatten()[:5].tolist()
            raise AssertionError(
                f"{name} differs from the reference (T={widths.numel()}, G={boundaries.numel()}, "
                f"block_m={block_m}) at {bad}: got {g[bad].tolist()}, want {w[bad].tolist()}"
            )


def random_boundaries(gen: torch.Generator, num_groups: int, high: int = 8192) -> torch.Tensor:
    """``num_groups`` strictly increasing values in [1, high]."""
    return torch.randperm(high, generator=gen)[:num_groups].sort().values.add_(1).to(torch.int32)


def random_widths(gen: torch.Generator, num_tokens: int, boundaries: torch.Tensor) -> torch.Tensor:
    """Widths on, between and beyond the boundaries (0 and above the last one included)."""
    high = int(boundaries[-1]) + 16
    widths = torch.randint(0, high + 1, (num_tokens,), generator=gen, dtype=torch.int32)
    # Hit the boundaries themselves often: the lower_bound edge.
    on_boundary = torch.rand(num_tokens, generator=gen) < 0.3
    picks = boundaries[torch.randint(0, boundaries.numel(), (num_tokens,), generator=gen)]
    return torch.where(on_boundary, picks, widths)


# --------------------------------------------------------------------------- #
# Agreement with the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(6))
def test_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 5000, (1,), generator=gen)) | 1  # odd sizes
    num_groups = int(torch.randint(1, 40, (1,), generator=gen))
    block_m = int(torch.tensor([1, 3, 16, 64, 127, 128])[seed])
    boundaries = random_boundaries(gen, num_groups)
    widths = random_widths(gen, num_tokens, boundaries)
    assert_matches_reference(widths, boundaries, block_m)


@pytest.mark.parametrize(
    "num_tokens, num_groups, block_m",
    [
        (0, 1, 1),
        (0, 5, 64),
        (1, 1, 1),
        (1, 4, 128),
        (2, 1, 1),
        (7, 3, 1),
        (31, 2, 32),
        (33, 5, 32),
        (257, 8, 64),
        (1000, 1, 16),  # G = 1
        (999, 6, 1),  # block_m = 1: one tile per token
        (50, 4, 1000),  # block_m larger than T
        (100, 3, 2**31 - 1),  # the largest block_m
        (3001, 300, 17),  # many groups, most of them small or empty
        (4097, 1024, 64),  # the CUDA maximum number of groups
        (2000, 2500, 8),  # more groups than the CUDA version supports: fine on the host
    ],
)
def test_sizes(num_tokens, num_groups, block_m):
    gen = torch.Generator().manual_seed(num_tokens * 7919 + num_groups * 31 + block_m)
    boundaries = random_boundaries(gen, num_groups, high=max(8192, 2 * num_groups))
    widths = random_widths(gen, num_tokens, boundaries)
    assert_matches_reference(widths, boundaries, block_m)


def test_large_token_count():
    gen = torch.Generator().manual_seed(1234)
    boundaries = torch.tensor([64, 128, 256, 512, 768, 1024, 2048, 4096], dtype=torch.int32)
    widths = boundaries[torch.randint(0, 8, (100_003,), generator=gen)]
    for block_m in (1, 64, 128):
        assert_matches_reference(widths, boundaries, block_m)


def test_all_tokens_in_one_group():
    boundaries = torch.tensor([10, 20, 30, 40], dtype=torch.int32)
    for width in (10, 25, 40):
        assert_matches_reference(torch.full((777,), width, dtype=torch.int32), boundaries, 64)


def test_widths_zero_and_above_last_boundary_are_clamped():
    boundaries = torch.tensor([4, 8, 16], dtype=torch.int32)
    widths = torch.tensor([0, 17, 100, 0, 2**31 - 1, 16, 4, 5, 0, 1000], dtype=torch.int32)
    assert_matches_reference(widths, boundaries, 2)
    got = run_cpu(widths, boundaries, 2)
    # Zeros go to group 0; everything above 16 to the last group.
    assert got.group_offsets.tolist() == [0, 4, 5, 10]
    assert got.sorted_token_idx.tolist() == [0, 3, 6, 8, 7, 1, 2, 4, 5, 9]


def test_extreme_values():
    boundaries = torch.tensor([-(2**31), -5, 0, 2**31 - 1], dtype=torch.int32)
    widths = torch.tensor([-(2**31), -(2**31) + 1, -5, -4, 0, 1, 2**31 - 1, -6], dtype=torch.int32)
    assert_matches_reference(widths, boundaries, 3)


def test_empty_groups_between_full_ones():
    boundaries = torch.arange(1, 101, dtype=torch.int32) * 10
    widths = torch.tensor([10, 1000, 500, 10, 1000, 500] * 50, dtype=torch.int32)
    assert_matches_reference(widths, boundaries, 7)


def test_hand_computed_example():
    widths = torch.tensor([128, 64, 128, 32, 64, 64], dtype=torch.int32)
    boundaries = torch.tensor([32, 64, 128], dtype=torch.int32)
    out = run_cpu(widths, boundaries, 2)
    assert out.sorted_token_idx.tolist() == [3, 1, 4, 5, 0, 2]
    assert out.group_offsets.tolist() == [0, 1, 4, 6]
    # max_tiles = cdiv(6, 2) + 3 = 6; groups of 1, 3 and 2 tokens -> 1 + 2 + 1 tiles.
    assert out.tile_group.tolist() == [0, 1, 1, 2, -1, -1]
    assert out.tile_start.tolist() == [0, 1, 3, 4, 6, 6]
    assert out.tile_end.tolist() == [1, 3, 4, 6, 6, 6]
    assert out.num_tiles.tolist() == [4]


def test_numpy_buffers():
    """Pointers need not come from torch: any int32 host buffer's address works."""
    widths = np.array([5, 1, 9, 5], dtype=np.int32)
    boundaries = np.array([4, 8], dtype=np.int32)
    outs = [np.full(n, POISON, dtype=np.int32) for n in (4, 3, 4, 4, 4, 1)]
    _C.routing_metadata_cpu(
        widths.ctypes.data, 4, boundaries.ctypes.data, 2, 2, *(o.ctypes.data for o in outs)
    )
    want = reference.routing_metadata(torch.from_numpy(widths), torch.from_numpy(boundaries), 2)
    for o, w in zip(outs, want):
        assert o.tolist() == w.tolist()


# --------------------------------------------------------------------------- #
# Module facts and argument checks
# --------------------------------------------------------------------------- #
def test_build_info():
    info = _C.build_info()
    assert set(info) == {"version", "cuda", "cuda_archs", "cuda_version", "cxx_compiler", "cuda_runtime_static"}
    assert isinstance(info["version"], str) and info["version"]
    import flextron_kernels

    assert info["version"] == flextron_kernels.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) and a for a in info["cuda_archs"])
    assert isinstance(info["cxx_compiler"], str) and info["cxx_compiler"]
    assert isinstance(info["cuda_runtime_static"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]
        assert isinstance(info["cuda_version"], str) and info["cuda_version"][0].isdigit()
        assert hasattr(_C, "routing_metadata_cuda") and hasattr(_C, "routing_metadata_workspace_bytes")
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None
        assert info["cuda_runtime_static"] is False
        assert not hasattr(_C, "routing_metadata_cuda")


def test_max_groups_constant():
    assert isinstance(_C.ROUTING_MAX_GROUPS, int)
    assert _C.ROUTING_MAX_GROUPS >= 1024


def test_module_does_not_link_the_cuda_runtime_dynamically():
    """The CUDA runtime is linked statically, so the module loads without libcudart."""
    so = Path(_C.__file__).read_bytes()
    assert b"libcudart.so" not in so


def _valid_cpu_args(num_tokens=4, num_groups=2, block_m=2):
    widths = torch.tensor([1, 5, 9, 2][:num_tokens], dtype=torch.int32)
    boundaries = torch.tensor([4, 8], dtype=torch.int32)
    slots = reference.max_tiles(4, 2, 1)
    keep = [widths, boundaries] + [torch.zeros(max(slots, 8), dtype=torch.int32) for _ in range(6)]
    args = [widths.data_ptr(), num_tokens, boundaries.data_ptr(), num_groups, block_m] + [t.data_ptr() for t in keep[2:]]
    return args, keep


@pytest.mark.parametrize(
    "index, value, name",
    [
        (1, -1, "num_tokens"),
        (3, 0, "num_groups"),
        (3, -3, "num_groups"),
        (4, 0, "block_m"),
        (4, -64, "block_m"),
        (1, 2**31, "num_tokens"),
        (2, 0, "boundaries_ptr"),
        (0, 0, "widths_ptr"),
        (5, 0, "sorted_token_idx_ptr"),
        (6, 0, "group_offsets_ptr"),
        (10, 0, "num_tiles_ptr"),
    ],
)
def test_cpu_bad_arguments_raise_value_error(index, value, name):
    args, _keep = _valid_cpu_args()
    _C.routing_metadata_cpu(*args)  # the unmodified call is fine
    args[index] = value
    with pytest.raises(ValueError, match=name):
        _C.routing_metadata_cpu(*args)


def test_cpu_allows_null_token_buffers_when_empty():
    args, _keep = _valid_cpu_args()
    args[1] = 0
    args[0] = 0  # widths_ptr
    args[5] = 0  # sorted_token_idx_ptr
    _C.routing_metadata_cpu(*args)


# The CUDA entry points check their arguments on the host before any CUDA call,
# so these run without a GPU too. Every call here fails validation: nothing is
# launched with the fake addresses.
needs_cuda_part = pytest.mark.skipif(
    not hasattr(_C, "routing_metadata_cuda"), reason="flextron_kernels._C was built without CUDA"
)


@needs_cuda_part
def test_workspace_bytes():
    small = _C.routing_metadata_workspace_bytes(0, 1, 1)
    assert isinstance(small, int) and small > 0
    assert _C.routing_metadata_workspace_bytes(10**6, 8, 64) >= 4 * 10**6
    assert _C.routing_metadata_workspace_bytes(10**6, 8, 64) <= _C.routing_metadata_workspace_bytes(2 * 10**6, 8, 64)
    big = _C.routing_metadata_workspace_bytes(10**6, _C.ROUTING_MAX_GROUPS, 64)
    assert big <= 16 * 10**6  # O(T + G), not O(T * G)


@needs_cuda_part
@pytest.mark.parametrize(
    "args, name",
    [
        ((-1, 4, 64), "num_tokens"),
        ((10, 0, 64), "num_groups"),
        ((10, -1, 64), "num_groups"),
        ((10, "max+1", 64), "num_groups"),
        ((10, 4, 0), "block_m"),
    ],
)
def test_workspace_bytes_bad_arguments(args, name):
    args = tuple(_C.ROUTING_MAX_GROUPS + 1 if a == "max+1" else a for a in args)
    with pytest.raises(ValueError, match=name):
        _C.routing_metadata_workspace_bytes(*args)


@needs_cuda_part
@pytest.mark.parametrize(
    "change, name",
    [
        ({"workspace_bytes": 8}, "workspace_bytes"),
        ({"workspace_bytes": -1}, "workspace_bytes"),
        ({"num_groups": _C.ROUTING_MAX_GROUPS + 1}, "num_groups"),
        ({"num_groups": 0}, "num_groups"),
        ({"num_tokens": -5}, "num_tokens"),
        ({"block_m": 0}, "block_m"),
        ({"workspace_ptr": 0}, "workspace_ptr"),
        ({"widths_ptr": 0}, "widths_ptr"),
    ],
)
def test_cuda_bad_arguments_raise_value_error(change, name):
    fake = 1 << 20  # never dereferenced: validation fails first
    kwargs = dict(
        widths_ptr=fake,
        num_tokens=100,
        boundaries_ptr=fake,
        num_groups=4,
        block_m=16,
        sorted_token_idx_ptr=fake,
        group_offsets_ptr=fake,
        tile_group_ptr=fake,
        tile_start_ptr=fake,
        tile_end_ptr=fake,
        num_tiles_ptr=fake,
        workspace_ptr=fake,
        workspace_bytes=0,
        stream=0,
    )
    kwargs.update(change)
    if "workspace_bytes" not in change:
        kwargs["workspace_bytes"] = _C.routing_metadata_workspace_bytes(100, 4, 16)
    with pytest.raises(ValueError, match=name):
        _C.routing_metadata_cuda(**kwargs)


@needs_cuda_part
@pytest.mark.skipif(
    any(Path("/dev").glob("nvidia*")), reason="an NVIDIA device is present: this checks the no-GPU error path"
)
def test_cuda_call_without_gpu_raises_runtime_error():
    widths = torch.zeros(4, dtype=torch.int32)
    boundaries = torch.ones(1, dtype=torch.int32)
    outs = [torch.zeros(8, dtype=torch.int32) for _ in range(6)]
    ws_bytes = _C.routing_metadata_workspace_bytes(4, 1, 4)
    ws = torch.zeros(ws_bytes, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="routing_metadata_cuda"):
        _C.routing_metadata_cuda(
            widths.data_ptr(), 4, boundaries.data_ptr(), 1, 4, *(o.data_ptr() for o in outs), ws.data_ptr(), ws_bytes, 0
        )
