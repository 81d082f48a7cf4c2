"""Routing metadata: the reference's meaning, and every backend bit-exact with it."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference
from flextron_kernels.backends import extension, extension_has_cuda


def naive_metadata(widths, boundaries, block_m):
    """The same arrays built with Python loops, from the definition."""
    bounds = boundaries.tolist()
    groups = []
    for w in widths.tolist():
        g = next((i for i, b in enumerate(bounds) if w <= b), len(bounds) - 1)
        groups.append(g)
    order = [t for g in range(len(bounds)) for t in range(len(groups)) if groups[t] == g]
    offsets = [0]
    for g in range(len(bounds)):
        offsets.append(offsets[-1] + groups.count(g))
    tiles = []
    for g in range(len(bounds)):
        for start in range(offsets[g], offsets[g + 1], block_m):
            tiles.append((g, start, min(start + block_m, offsets[g + 1])))
    slots = reference.max_tiles(len(groups), len(bounds), block_m)
    n = len(groups)
    pad = [(-1, n, n)] * (slots - len(tiles))
    tile_group, tile_start, tile_end = zip(*(tiles + pad)) if slots else ((), (), ())
    return order, offsets, list(tile_group), list(tile_start), list(tile_end), [len(tiles)]


CASES = [
    # (num_tokens, boundaries, block_m)
    (10, [2, 5, 8], 2),
    (0, [3, 7], 4),
    (1, [16], 16),
    (37, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 3),
    (64, [64], 1),
    (19, [0, 5, 100], 64),
]


@pytest.mark.parametrize("num_tokens,bounds,block_m", CASES)
def test_reference_matches_definition(num_tokens, bounds, block_m):
    gen = torch.Generator().manual_seed(num_tokens)
    widths = torch.randint(-1, bounds[-1] + 3, (num_tokens,), generator=gen)  # includes out-of-range values
    meta = reference.routing_metadata(widths, torch.tensor(bounds), block_m)
    expected = naive_metadata(widths, torch.tensor(bounds), block_m)
    for name, got, want in zip(meta._fields, meta, expected):
        assert got.dtype == torch.int32, name
        assert got.tolist() == list(want), name


def _random_case(seed, num_tokens, num_groups, block_m):
    gen = torch.Generator().manual_seed(seed)
    boundaries = torch.sort(torch.randperm(4 * num_groups + 8, generator=gen)[:num_groups]).values.to(torch.int32)
    widths = torch.randint(0, int(boundaries[-1]) + 1, (num_tokens,), generator=gen)
    return widths, boundaries


def _backends_here():
    names = ["torch"]
    if extension() is not None:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize(
    "seed,num_tokens,num_groups,block_m",
    [(0, 1000, 4, 64), (1, 0, 3, 16), (2, 1, 1, 128), (3, 4097, 300, 32), (4, 50, 7, 1), (5, 33, 2, 100)],
)
def test_op_is_bit_exact_with_reference(backend, seed, num_tokens, num_groups, block_m, monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")
    widths, boundaries = _random_case(seed, num_tokens, num_groups, block_m)
    expected = reference.routing_metadata(widths, boundaries, block_m)
    for dtype in (torch.int32, torch.int64):
        with fk.use_backend(backend):
            got = fk.routing_metadata(widths.to(dtype), boundaries, block_m)
        for name, a, b in zip(expected._fields, got, expected):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("seed,num_tokens,num_groups,block_m", [(0, 4096, 4, 64), (1, 3_000_001, 1024, 128), (2, 0, 5, 16)])
def test_cuda_op_is_bit_exact_with_reference(seed, num_tokens, num_groups, block_m):
    widths, boundaries = _random_case(seed, num_tokens, num_groups, block_m)
    expected = reference.routing_metadata(widths, boundaries, block_m)
    backend = "cuda" if extension_has_cuda() else "torch"
    with fk.use_backend(backend):
        got = fk.routing_metadata(widths.cuda(), boundaries.cuda(), block_m)
    for name, a, b in zip(expected._fields, got, expected):
        assert torch.equal(a.cpu(), b), name


def test_default_boundaries():
    from flextron_kernels.ops.routing import MAX_DEFAULT_GROUPS

    b = fk.default_boundaries(11008, "cpu")  # ranges of 64: 172 groups
    assert b.tolist() == list(range(64, 11008, 64)) + [11008]
    wide = fk.default_boundaries(100_000, "cpu")
    assert wide[-1] == 100_000 and len(wide) <= MAX_DEFAULT_GROUPS and (wide[:-1] % 64 == 0).all()
    assert (wide.diff() > 0).all()
    assert fk.default_boundaries(1, "cpu").tolist() == [1]
    assert fk.default_boundaries(130, "cpu").tolist() == [64, 128, 130]


def test_opcheck():
    widths, boundaries = _random_case(0, 77, 5, 8)
    torch.library.opcheck(torch.ops.flextron.routing_metadata, (widths, boundaries, 8))


def test_bad_input():
    w = torch.tensor([1, 2, 3])
    b = torch.tensor([2, 4])
    with pytest.raises(TypeError, match="widths: expected dtype in"):
        fk.routing_metadata(w.float(), b, 4)
    with pytest.raises(ValueError, match="widths: expected 1 dimensions"):
        fk.routing_metadata(w.view(1, 3), b, 4)
    with pytest.raises(ValueError, match="boundaries: expected a tensor on cpu"):
        fk.routing_metadata(w, b.to("meta"), 4)
    with pytest.raises(ValueError, match="boundaries: expected at least one"):
        fk.routing_metadata(w, b[:0], 4)
    with pytest.raises(ValueError, match="boundaries: expected strictly increasing values, got \\[4, 4\\]"):
        fk.routing_metadata(w, torch.tensor([4, 4]), 4)
    with pytest.raises(ValueError, match="block_m: expected an int in"):
        fk.routing_metadata(w, b, 0)


@pytest.mark.parametrize("op", ["linear", "mlp"])
def test_one_grouping_per_forward_and_backward(op, device, monkeypatch):
    # The forward and every backward kernel of one call share the tokens' grouping (the
    # routing metadata) instead of computing it again.
    from flextron_kernels.ops import common

    calls = []
    original = common.compute_routing_metadata

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(common, "compute_routing_metadata", counted)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=gen).to(device).requires_grad_()
    widths = torch.randint(0, 33, (40,), generator=gen).to(device)
    with fk.use_backend("triton"):
        if op == "linear":
            layer = fk.ElasticLinear(24, 32).to(device)
            layer(x, out_features=widths).sum().backward()
            grads = (x.grad, layer.weight.grad)
        else:
            layer = fk.ElasticMLP(24, 32).to(device)
            layer(x, width=widths).sum().backward()
            grads = (x.grad, layer.w_up.grad, layer.w_down.grad)
    assert len(calls) == 1
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
