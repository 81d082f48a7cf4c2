"""The compiled extension's CUDA code: ``_C.routing_metadata_cuda`` on a GPU.

Bit-exact agreement with ``flextron_kernels.reference.routing_metadata`` on poisoned
output buffers and a poisoned workspace, on the current and on a side stream, and
under CUDA-graph capture and replay. Skipped without a GPU, or when the extension
was built without its CUDA part.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from flextron_kernels import reference

POISON = -123456789


def _extension():
    if importlib.util.find_spec("flextron_kernels._C") is None:
        return None
    return importlib.import_module("flextron_kernels._C")


_C = _extension()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)"),
    pytest.mark.skipif(_C is None, reason="flextron_kernels._C is not built (installed with FLEXTRON_SKIP_EXT=1?)"),
    pytest.mark.skipif(
        _C is not None and not hasattr(_C, "routing_metadata_cuda"),
        reason="flextron_kernels._C was built without its CUDA part",
    ),
]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
class Call:
    """Device inputs, poisoned outputs and workspace for one problem, and the call."""

    def __init__(self, widths: torch.Tensor, boundaries: torch.Tensor, block_m: int):
        dev = torch.device("cuda")
        self.widths = widths.to(dev, torch.int32).contiguous()
        self.boundaries = boundaries.to(dev, torch.int32).contiguous()
        self.block_m = block_m
        self.num_tokens, self.num_groups = self.widths.numel(), self.boundaries.numel()
        slots = reference.max_tiles(self.num_tokens, self.num_groups, block_m)
        sizes = (self.num_tokens, self.num_groups + 1, slots, slots, slots, 1)
        self.out = reference.RoutingMetadata(*(torch.empty(n, dtype=torch.int32, device=dev) for n in sizes))
        self.workspace_bytes = _C.routing_metadata_workspace_bytes(self.num_tokens, self.num_groups, block_m)
        self.workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=dev)
        self.poison()

    def poison(self) -> None:
        """Garbage everywhere, so that any element the kernels forget to write (or
        any scratch they read before writing) shows."""
        for t in self.out:
            t.fill_(POISON)
        self.workspace.fill_(0xA5)

    def launch(self) -> None:
        _C.routing_metadata_cuda(
            self.widths.data_ptr(),
            self.num_tokens,
            self.boundaries.data_ptr(),
            self.num_groups,
            self.block_m,
            *(t.data_ptr() for t in self.out),
            self.workspace.data_ptr(),
            self.workspace_bytes,
            torch.cuda.current_stream().cuda_stream,
        )

    def check(self) -> None:
        torch.cuda.synchronize()
        want = reference.routing_metadata(self.widths.cpu(), self.boundaries.cpu(), self.block_m)
        for name, g, w in zip(reference.RoutingMetadata._fields, self.out, want):
            g = g.cpu()
            assert g.shape == w.shape, (name, g.shape, w.shape)
            if not torch.equal(g, w):
                bad = (g != w).nonzero().flatten()[:5].tolist()
                raise AssertionError(
                    f"{name} differs from the reference (T={self.num_tokens}, G={self.num_groups}, "
                    f"block_m={self.block_m}) at {bad}: got {g[bad].tolist()}, want {w[bad].tolist()}"
                )


def random_boundaries(gen: torch.Generator, num_groups: int, high: int = 8192) -> torch.Tensor:
    return torch.randperm(high, generator=gen)[:num_groups].sort().values.add_(1).to(torch.int32)


def random_widths(gen: torch.Generator, num_tokens: int, boundaries: torch.Tensor) -> torch.Tensor:
    high = int(boundaries[-1]) + 16
    widths = torch.randint(0, high + 1, (num_tokens,), generator=gen, dtype=torch.int32)
    on_boundary = torch.rand(num_tokens, generator=gen) < 0.3
    picks = boundaries[torch.randint(0, boundaries.numel(), (num_tokens,), generator=gen)]
    return torch.where(on_boundary, picks, widths)


def check_case(widths, boundaries, block_m) -> None:
    call = Call(widths, boundaries, block_m)
    call.launch()
    call.check()


# --------------------------------------------------------------------------- #
# Agreement with the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(6))
def test_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 50_000, (1,), generator=gen)) | 1
    num_groups = int(torch.randint(1, 40, (1,), generator=gen))
    block_m = [1, 3, 16, 64, 127, 128][seed]
    boundaries = random_boundaries(gen, num_groups)
    check_case(random_widths(gen, num_tokens, boundaries), boundaries, block_m)


@pytest.mark.parametrize(
    "num_tokens, num_groups, block_m",
    [
        (0, 1, 1),
        (0, 5, 64),
        (0, 1024, 64),
        (1, 1, 1),
        (1, 4, 128),
        (2, 1, 1),
        (7, 3, 1),
        (31, 2, 32),
        (33, 5, 32),
        (255, 8, 64),
        (257, 8, 64),
        (1000, 1, 16),
        (999, 6, 1),
        (50, 4, 1000),
        (100, 3, 2**31 - 1),  # the largest block_m
        (3001, 300, 17),
        (4097, 1024, 64),
        (65_537, 33, 128),
    ],
)
def test_sizes(num_tokens, num_groups, block_m):
    gen = torch.Generator().manual_seed(num_tokens * 7919 + num_groups * 31 + block_m)
    boundaries = random_boundaries(gen, num_groups)
    check_case(random_widths(gen, num_tokens, boundaries), boundaries, block_m)


@pytest.mark.parametrize(
    "num_tokens, num_groups, block_m",
    [
        (3_000_017, 1024, 64),  # many blocks and the most groups
        (4_194_304, 8, 128),
        (2_000_003, 1, 1),  # one group, one tile per token: 2M tiles
        (1_000_000, 1024, 1),
    ],
)
def test_millions_of_tokens(num_tokens, num_groups, block_m):
    gen = torch.Generator().manual_seed(num_tokens + num_groups)
    boundaries = random_boundaries(gen, num_groups)
    check_case(random_widths(gen, num_tokens, boundaries), boundaries, block_m)


def test_all_tokens_in_one_group():
    boundaries = torch.tensor([10, 20, 30, 40], dtype=torch.int32)
    for width in (10, 25, 40, 1000):
        check_case(torch.full((100_001,), width, dtype=torch.int32), boundaries, 64)


def test_widths_zero_and_above_last_boundary_are_clamped():
    boundaries = torch.tensor([4, 8, 16], dtype=torch.int32)
    widths = torch.tensor([0, 17, 100, 0, 2**31 - 1, 16, 4, 5, 0, 1000] * 301, dtype=torch.int32)
    check_case(widths, boundaries, 2)


def test_extreme_values():
    boundaries = torch.tensor([-(2**31), -5, 0, 2**31 - 1], dtype=torch.int32)
    widths = torch.tensor([-(2**31), -(2**31) + 1, -5, -4, 0, 1, 2**31 - 1, -6] * 100, dtype=torch.int32)
    check_case(widths, boundaries, 3)


def test_max_groups():
    num_groups = _C.ROUTING_MAX_GROUPS
    gen = torch.Generator().manual_seed(7)
    boundaries = random_boundaries(gen, num_groups, high=4 * num_groups)
    check_case(random_widths(gen, 200_000, boundaries), boundaries, 32)
    with pytest.raises(ValueError, match="num_groups"):
        _C.routing_metadata_workspace_bytes(10, num_groups + 1, 32)


def test_agrees_with_cpu_extension():
    gen = torch.Generator().manual_seed(99)
    boundaries = random_boundaries(gen, 17)
    widths = random_widths(gen, 12_345, boundaries)
    call = Call(widths, boundaries, 16)
    call.launch()
    torch.cuda.synchronize()
    slots = reference.max_tiles(12_345, 17, 16)
    host = [torch.empty(n, dtype=torch.int32) for n in (12_345, 18, slots, slots, slots, 1)]
    _C.routing_metadata_cpu(widths.data_ptr(), 12_345, boundaries.data_ptr(), 17, 16, *(t.data_ptr() for t in host))
    for h, d in zip(host, call.out):
        assert torch.equal(h, d.cpu())


# --------------------------------------------------------------------------- #
# Streams and CUDA graphs
# --------------------------------------------------------------------------- #
def test_side_stream():
    gen = torch.Generator().manual_seed(3)
    boundaries = random_boundaries(gen, 12)
    call = Call(random_widths(gen, 300_001, boundaries), boundaries, 64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the poisoning fills
    with torch.cuda.stream(side):
        call.launch()
    torch.cuda.current_stream().wait_stream(side)
    call.check()


@pytest.mark.parametrize("num_tokens, num_groups", [(0, 3), (1, 1), (70_001, 9), (1_000_003, 1024)])
def test_cuda_graph_capture_and_replay(num_tokens, num_groups):
    gen = torch.Generator().manual_seed(num_tokens + 5)
    boundaries = random_boundaries(gen, num_groups)
    call = Call(random_widths(gen, num_tokens, boundaries), boundaries, 64)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on its own stream, which launch() uses
        call.launch()
    # Capture launches nothing: the outputs are still poison.
    torch.cuda.synchronize()
    assert int(call.out.group_offsets[-1]) == POISON

    graph.replay()
    call.check()

    # New widths, written in place into the captured input: replay follows them.
    for _ in range(2):
        call.widths.copy_(random_widths(gen, num_tokens, boundaries).cuda())
        call.poison()
        graph.replay()
        call.check()


def test_bad_workspace_raises_value_error():
    call = Call(torch.ones(1000, dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="workspace_bytes"):
        _C.routing_metadata_cuda(
            call.widths.data_ptr(),
            call.num_tokens,
            call.boundaries.data_ptr(),
            call.num_groups,
            call.block_m,
            *(t.data_ptr() for t in call.out),
            call.workspace.data_ptr(),
            call.workspace_bytes - 1,
            torch.cuda.current_stream().cuda_stream,
        )
