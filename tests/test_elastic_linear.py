"""elastic_linear against the reference: every width kind, both backends, forward and gradients."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(out).all(), "output has non-finite (unwritten) elements"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def widths_for(kind, lead, n_full, k_full, device, gen):
    """Keyword arguments for one width kind; per-token widths include 0 and full."""

    def per_token(high):
        w = torch.randint(0, high + 1, lead, generator=gen)
        flat = w.view(-1)
        if flat.numel() >= 2:
            flat[0], flat[1] = 0, high
        return w.to(device)

    return {
        "full": lambda: {},
        "static": lambda: dict(out_features=n_full - 6, in_features=k_full - 5),
        "static_zero_out": lambda: dict(out_features=0),
        "static_zero_in": lambda: dict(in_features=0),
        "token_out": lambda: dict(out_features=per_token(n_full)),
        "token_out_max": lambda: dict(out_features=per_token(n_full - 9), max_out_features=n_full - 9),
        "token_in": lambda: dict(in_features=per_token(k_full)),
        "token_both": lambda: dict(out_features=per_token(n_full), in_features=per_token(k_full)),
    }[kind]()


KINDS = ["full", "static", "static_zero_out", "static_zero_in", "token_out", "token_out_max", "token_in", "token_both"]


def run_case(backend, kind, dtype, device, lead=(3, 7), n_full=37, k_full=29, bias=True, seed=0, as_params=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k_full, generator=gen).to(device, dtype)
    w = (torch.randn(n_full, k_full, generator=gen) / k_full**0.5).to(device, dtype)
    b = torch.randn(n_full, generator=gen).to(device, dtype) if bias else None
    kw = widths_for(kind, lead, n_full, k_full, device, gen)

    x_ = x.clone().requires_grad_()
    if as_params:
        w_ = torch.nn.Parameter(w.clone())
        b_ = torch.nn.Parameter(b.clone()) if bias else None
    else:
        w_ = w.clone().requires_grad_()
        b_ = b.clone().requires_grad_() if bias else None
    with fk.use_backend(backend):
        y = fk.elastic_linear(x_, w_, b_, **kw)
        grad_y = torch.randn(y.shape, generator=gen).to(device, dtype)
        y.backward(grad_y)

    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    y64 = reference.elastic_linear(x64, w64, b64, **kw)
    y64.backward(grad_y.double())
    return (y, x_.grad, w_.grad, b_.grad if bias else None), (y64, x64.grad, w64.grad, b64.grad if bias else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients_match_reference(backend, kind, dtype, device):
    out, ref = run_case(backend, kind, dtype, device)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        if r.numel() == 0 or r.abs().max() == 0:
            assert o is None or (o == 0).all(), name
            continue
        assert rel_err(o, r) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["token_out", "token_in", "token_both"])
def test_several_width_groups(backend, kind, device):
    """Sizes past the 64-wide grouping granule: tokens fall in several width groups, and
    the kernels skip the per-row masks for the rows whose widths cover a whole block."""
    out, ref = run_case(backend, kind, torch.float32, device, lead=(45,), n_full=150, k_full=140, seed=7)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        assert rel_err(o, r) < TOL[torch.float32], name


@pytest.mark.parametrize("widths_kind", ["few", "many", "one", "masked"])
@pytest.mark.parametrize("axis", ["out", "in", "both"])
def test_torch_backend_token_runs(widths_kind, axis, monkeypatch):
    """The torch backend on a CPU computes runs of like-width tokens (by the output widths
    when given, else the input widths), each at its own width: one run per distinct width
    (few), equal runs at their widest token's width, masked (many), one width for every
    token; and, as off a CPU, every token at the bound, masked."""
    import importlib

    from flextron_kernels.ops.common import MAX_TORCH_RUNS

    module = importlib.import_module("flextron_kernels.ops.elastic_linear")
    gen = torch.Generator().manual_seed(12)
    n_full, k_full, tokens = 37, 29, 31

    def widths(size):
        return {
            "few": torch.tensor([0, size, 11, 20])[torch.randint(0, 4, (tokens,), generator=gen)],
            "many": torch.randint(0, size + 1, (tokens,), generator=gen),
            "one": torch.full((tokens,), 11),
            "masked": torch.randint(0, size + 1, (tokens,), generator=gen),
        }[widths_kind]

    kw = {}
    if axis in ("out", "both"):
        kw["out_features"] = widths(n_full)
    if axis in ("in", "both"):
        kw["in_features"] = widths(k_full)
    seen = []
    runs = (lambda w, size: [(None, size, w)]) if widths_kind == "masked" else module.torch_runs
    monkeypatch.setattr(module, "torch_runs", lambda *a: seen.append(runs(*a)) or seen[-1])
    x = torch.randn(tokens, k_full, generator=gen)
    w = torch.randn(n_full, k_full, generator=gen) / k_full**0.5
    b = torch.randn(n_full, generator=gen)
    grad = torch.randn(tokens, n_full, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with fk.use_backend("torch"):
        fk.elastic_linear(*leaves, **kw).backward(grad)
    exact = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = reference.elastic_linear(*exact, **kw)
    y64.backward(grad.double())
    with fk.use_backend("torch"):
        y = fk.elastic_linear(x, w, b, **kw)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), [y] + [t.grad for t in leaves], [y64] + [t.grad for t in exact]):
        assert rel_err(o, r) < 1e-5, name
    expected = {"few": 4, "many": MAX_TORCH_RUNS, "one": 1, "masked": 1}[widths_kind]
    assert len(seen) == 4 and all(len(r) == expected for r in seen)  # forward, dx, dweight, forward


@pytest.mark.parametrize("axis", ["out", "in"])
def test_row_tiles_straddling_width_groups(axis, device):
    """Groups of 5, 18 and 17 tokens (shuffled): under the interpreter's 16-row tiles,
    tiles hold rows of two groups, computed to the wider width and masked per row."""
    gen = torch.Generator().manual_seed(11)
    n_full, k_full = 150, 140
    size = n_full if axis == "out" else k_full
    widths = torch.tensor([3] * 5 + [size - 40] * 18 + [size] * 17)[torch.randperm(40, generator=gen)]
    x = torch.randn(40, k_full, generator=gen).to(device)
    w = (torch.randn(n_full, k_full, generator=gen) / k_full**0.5).to(device)
    b = torch.randn(n_full, generator=gen).to(device)
    grad_y = torch.randn(40, n_full, generator=gen).to(device)
    kw = dict(out_features=widths) if axis == "out" else dict(in_features=widths)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    with fk.use_backend("triton"):
        y = fk.elastic_linear(*inputs, **{k: v.to(device) for k, v in kw.items()})
        y.backward(grad_y)
    inputs64 = [t.double().cpu().requires_grad_() for t in (x, w, b)]
    y64 = reference.elastic_linear(*inputs64, **kw)
    y64.backward(grad_y.double().cpu())
    assert rel_err(y, y64) < 1e-5
    for name, t, t64 in zip(("dx", "dweight", "dbias"), inputs, inputs64):
        assert rel_err(t.grad, t64.grad) < 1e-5, name


@pytest.mark.parametrize("kind", ["token_out", "token_in", "token_both"])
@pytest.mark.parametrize("k_full,expect_descriptors", [(40, True), (29, False)])
def test_weight_tiles_through_tma_descriptors(kind, k_full, expect_descriptors, device, monkeypatch):
    """The routed matmul's B_TMA option on every matmul family: the forward reads W and the
    input gradient W.T through descriptors where the weight's rows are 16-byte aligned
    (40 fp32 columns), through pointers where not (29), with the same results."""
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles
    from flextron_kernels.triton import routed_matmul

    made = []
    descriptor = routed_matmul._b_descriptor
    monkeypatch.setattr(routed_matmul, "_b_descriptor", lambda *args: made.append(args[1]) or descriptor(*args))
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}):
        out, ref = run_case("triton", kind, torch.float32, device, lead=(45,), n_full=150, k_full=k_full, seed=3)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        assert rel_err(o, r) < TOL[torch.float32], name
    # The forward's B is W (strides (k_full, 1)); the input gradient's is W.T ((1, k_full)).
    assert made == ([(k_full, 1), (1, k_full)] if expect_descriptors else [])


@pytest.mark.parametrize("kind", ["static", "token_out_max"])
def test_weight_tiles_through_tma_stop_at_the_used_prefix(kind, device):
    """B_TMA descriptors span only the used prefix: the weight holds inf past it, and the
    output and input gradient stay those of the prefix (the zero fill of the descriptor's
    bounds stands for the pointer path's masks)."""
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles

    gen = torch.Generator().manual_seed(4)
    n_full, k_full = 48, 40
    x = torch.randn(30, k_full, generator=gen).to(device)
    w = torch.randn(n_full, k_full, generator=gen).to(device)
    kw = widths_for(kind, (30,), n_full, k_full, device, gen)
    n, k = kw.get("max_out_features", kw["out_features"]), kw.get("in_features", k_full)
    poisoned = w.clone()
    poisoned[n:], poisoned[:, k:] = float("inf"), float("inf")
    grad_y = torch.randn(30, n, generator=gen).to(device)
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}), fk.use_backend("triton"):
        x_ = x.clone().requires_grad_()
        fk.elastic_linear(x_, poisoned, **kw).backward(grad_y)
        y = fk.elastic_linear(x, poisoned, **kw)
    x64 = x.double().cpu().requires_grad_()
    y64 = reference.elastic_linear(x64, w.double().cpu(), **{k_: v.cpu() if isinstance(v, torch.Tensor) else v
                                                              for k_, v in kw.items()})
    y64.backward(grad_y.double().cpu())
    assert rel_err(y, y64) < 1e-5 and rel_err(x_.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["static", "token_out", "token_both"])
def test_parameters_accumulate_in_place_into_prefix(backend, kind, device):
    """Parameters get their gradient added into the used prefix of an existing .grad,
    the rest untouched, in the same buffer."""
    gen = torch.Generator().manual_seed(1)
    n_full, k_full, lead = 37, 29, (11,)
    layer = fk.ElasticLinear(k_full, n_full).to(device)
    before_w = torch.randn(n_full, k_full, generator=gen).to(device)
    before_b = torch.randn(n_full, generator=gen).to(device)
    layer.weight.grad = before_w.clone()
    layer.bias.grad = before_b.clone()
    grad_ptr = layer.weight.grad.data_ptr()
    x = torch.randn(*lead, k_full, generator=gen).to(device)
    kw = widths_for(kind, lead, n_full, k_full, device, gen)
    with fk.use_backend(backend):
        layer(x, **kw).sum().backward()

    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    reference.elastic_linear(x.double(), w64, b64, **kw).sum().backward()
    assert layer.weight.grad.data_ptr() == grad_ptr
    assert rel_err(layer.weight.grad - before_w, w64.grad) < 1e-5
    assert rel_err(layer.bias.grad - before_b, b64.grad) < 1e-5
    if kind == "static":
        n, k = kw["out_features"], kw["in_features"]
        assert torch.equal(layer.weight.grad[n:], before_w[n:])
        assert torch.equal(layer.weight.grad[:, k:], before_w[:, k:])
        assert torch.equal(layer.bias.grad[n:], before_b[n:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_backward_allocates_grad_and_subnetworks_accumulate(backend, device):
    """Several sub-networks in one step: grads sum, as with full-size autograd."""
    gen = torch.Generator().manual_seed(2)
    layer = fk.ElasticLinear(23, 19).to(device)
    x = torch.randn(6, 23, generator=gen).to(device)
    choices = [dict(), dict(out_features=7, in_features=5), dict(out_features=torch.tensor([0, 3, 19, 19, 1, 8]).to(device))]
    with fk.use_backend(backend):
        for kw in choices:
            layer(x, **kw).square().sum().backward()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    for kw in choices:
        reference.elastic_linear(x.double(), w64, b64, **kw).square().sum().backward()
    assert rel_err(layer.weight.grad, w64.grad) < 1e-5
    assert rel_err(layer.bias.grad, b64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_as_plain_tensors_match_in_place_path(backend, device):
    plain = run_case(backend, "token_both", torch.float32, device, seed=3, as_params=False)[0]
    params = run_case(backend, "token_both", torch.float32, device, seed=3, as_params=True)[0]
    for a, b in zip(plain, params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_size_weight_grads_mode(backend, device):
    layer = fk.ElasticLinear(13, 11).to(device)
    x = torch.randn(5, 13, device=device)
    with fk.use_backend(backend), fk.full_size_weight_grads():
        (grad_w,) = torch.autograd.grad(layer(x, out_features=4).sum(), [layer.weight])
    w64 = layer.weight.detach().double().requires_grad_()
    reference.elastic_linear(x.double(), w64, layer.bias.double(), out_features=4).sum().backward()
    assert rel_err(grad_w, w64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead,kind",
    [((1,), "token_both"), ((0,), "token_both"), ((0,), "static"), ((2, 0, 3), "full"), ((1,), "static")],
)
def test_one_token_and_empty_batch(backend, lead, kind, device):
    out, ref = run_case(backend, kind, torch.float32, device, lead=lead)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        if r.numel():
            assert rel_err(o, r) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_width_everywhere_and_skewed_widths(backend, device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 33, generator=gen).to(device)
    w = torch.randn(70, 33, generator=gen).to(device)
    for widths in (torch.full((40,), 17), torch.where(torch.rand(40, generator=gen) < 0.8, 3, 70)):
        with fk.use_backend(backend):
            y = fk.elastic_linear(x, w, out_features=widths.to(device), in_features=widths.clamp(max=33).to(device))
        ref = reference.elastic_linear(x.double().cpu(), w.double().cpu(), out_features=widths, in_features=widths.clamp(max=33))
        assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_narrow_inputs(backend, device):
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(9, 2 * 21, generator=gen).to(device)
    x = big[:, ::2]  # row stride 42, column stride 2
    w = torch.randn(17, 21, generator=gen).to(device)
    x_t = torch.randn(21, 9, generator=gen).to(device).T  # column-major
    with fk.use_backend(backend):
        for xx in (x, x_t):
            y = fk.elastic_linear(xx, w, out_features=torch.arange(9).to(device) * 2, in_features=torch.arange(9).to(device) + 10)
            ref = reference.elastic_linear(
                xx.double().cpu(), w.double().cpu(), out_features=torch.arange(9) * 2, in_features=torch.arange(9) + 10
            )
            assert rel_err(y, ref) < 1e-5
        # x holding only the used columns (in_features the int k), zero of them included.
        y = fk.elastic_linear(x[:, :8], w, in_features=8, out_features=5)
        assert rel_err(y, x[:, :8].double() @ w[:5, :8].double().T) < 1e-5
        y = fk.elastic_linear(x[:, :0], w, in_features=0, out_features=5)
        assert y.shape == (9, 5) and (y == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_at_static_widths(backend, device):
    # Without autograd, static widths on the torch backend skip the custom op: same results.
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(5, 3, 29, generator=gen).to(device)
    weight, bias = torch.randn(37, 29, generator=gen).to(device), torch.randn(37, generator=gen).to(device)
    with torch.no_grad(), fk.use_backend(backend):
        full = fk.elastic_linear(x, weight, bias)
        narrow = fk.elastic_linear(x[..., :11], weight, bias, out_features=20, in_features=11)
    torch.testing.assert_close(full, reference.elastic_linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    want = reference.elastic_linear(x[..., :11], weight, bias, out_features=20, in_features=11)
    assert narrow.shape == (5, 3, 20) and rel_err(narrow, want) < 1e-5


def test_inputs_beyond_width_are_ignored(device):
    """NaN in x past a token's in-width, and NaN in dy past its out-width, never leak."""
    x = torch.randn(4, 10, device=device)
    x[0, 6:] = float("nan")
    in_w = torch.tensor([6, 10, 10, 10], device=device)
    out_w = torch.tensor([3, 8, 8, 0], device=device)
    w = torch.randn(8, 10, device=device, requires_grad=True)
    for backend in BACKENDS:
        with fk.use_backend(backend):
            xx = x.clone().requires_grad_()
            y = fk.elastic_linear(xx, w, in_features=in_w, out_features=out_w)
            assert torch.isfinite(y).all()
            assert (y[0, 3:] == 0).all() and (y[3] == 0).all()
            grad = torch.randn_like(y)
            grad[0, 3:] = float("nan")
            grad[3] = float("nan")
            y.backward(grad)
            assert torch.isfinite(xx.grad).all() and (xx.grad[0, 6:] == 0).all()
            assert torch.isfinite(w.grad).all()
            w.grad = None


def test_module_matches_nn_linear(device):
    torch.manual_seed(6)
    linear = torch.nn.Linear(24, 31).to(device)
    elastic = fk.ElasticLinear.from_linear(linear)
    x = torch.randn(2, 5, 24, device=device)
    torch.testing.assert_close(elastic(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "in_features=24" in repr(elastic)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _bad_cases():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6)
    return [
        (dict(x=x, weight=w, out_features=6), ValueError, "out_features: expected an int in \\[0, 5\\], got 6"),
        (dict(x=x, weight=w, in_features=-1), ValueError, "in_features: expected an int in \\[0, 6\\], got -1"),
        (dict(x=x, weight=w, out_features=torch.tensor([1, 2, 6, 0])), ValueError, "out_features: expected every width in \\[0, 5\\]"),
        (dict(x=x, weight=w, in_features=torch.tensor([1, -2, 3, 0])), ValueError, "in_features: expected every width in \\[0, 6\\], got values in \\[-2, 3\\]"),
        (dict(x=x, weight=w, out_features=torch.tensor([1.0, 2, 3, 0])), TypeError, "out_features: expected an integer tensor"),
        (dict(x=x, weight=w, out_features=torch.tensor([1, 2, 3])), ValueError, "out_features: expected shape \\(4,\\)"),
        (dict(x=x, weight=w, in_features=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "in_features: expected a tensor on cpu"),
        (dict(x=x, weight=w, out_features=2.5), TypeError, "out_features: expected an int, got float"),
        (dict(x=x, weight=w, out_features=True), TypeError, "out_features: expected an int, got bool"),
        (dict(x=x.long(), weight=w), TypeError, "x: expected dtype in"),
        (dict(x=x, weight=w.half()), TypeError, "weight: expected dtype torch.float32 \\(the dtype of x\\), got torch.float16"),
        (dict(x=x, weight=w, bias=torch.randn(4)), ValueError, "bias: expected shape \\(5,\\), got \\(4,\\)"),
        (dict(x=torch.randn(4, 7), weight=w), ValueError, "x: expected last dimension 6"),
        (dict(x=torch.randn(4, 3), weight=w, in_features=2), ValueError, "x: expected last dimension 6 or 2"),
        (dict(x=x, weight=w, out_features=3, max_out_features=4), ValueError, "max_out_features: only applies"),
        (dict(x=x, weight=w, out_features=torch.tensor([1, 2, 5, 0]), max_out_features=4), ValueError, "out_features: expected every width in \\[0, 4\\]"),
        (dict(x=x, weight=w.to("meta")), ValueError, "weight: expected a tensor on cpu"),
        (dict(x=x, weight=w[0]), ValueError, "weight: expected 2 dimensions"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        fk.elastic_linear(**kwargs)


# --------------------------------------------------------------------------- #
# torch.library and torch.compile
# --------------------------------------------------------------------------- #
def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 12, generator=gen).to(device)
    w = torch.randn(10, 12, generator=gen).to(device)
    b = torch.randn(10, generator=gen).to(device)
    out_w = torch.randint(0, 11, (9,), generator=gen).to(device)
    in_w = torch.randint(0, 13, (9,), generator=gen).to(device)
    return x, w, b, out_w, in_w


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    x, w, b, out_w, in_w = _opcheck_samples(device)
    ops = torch.ops.flextron
    with fk.use_backend(backend):
        for args in [(x, w, b, None, None, 7, 5), (x, w, b, out_w, in_w, 10, 12), (x, w, None, out_w, None, 10, 12)]:
            grad_args = (x.clone().requires_grad_(), w.clone().requires_grad_(), None if args[2] is None else b.clone().requires_grad_())
            torch.library.opcheck(ops.elastic_linear, grad_args + args[3:])
        dy = torch.randn(9, 10, device=device)
        torch.library.opcheck(ops.elastic_linear_grad_input, (dy, w, out_w, in_w, 12, 12))
        torch.library.opcheck(ops.elastic_linear_grad_input, (dy[:, :6], w, None, None, 4, 12))
        torch.library.opcheck(
            ops.elastic_linear_grad_weight_, (torch.zeros_like(w), torch.zeros_like(b), dy, x, out_w, in_w, 12)
        )
        torch.library.opcheck(ops.elastic_linear_grad_weight_, (torch.zeros_like(w), None, dy[:, :6], x, None, None, 4))


class _TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = fk.ElasticLinear(12, 20)
        self.down = fk.ElasticLinear(20, 12)

    def forward(self, x, width):
        h = self.up(x, out_features=width)
        return self.down(torch.relu(h), in_features=width)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend, device):
    torch.manual_seed(8)
    model = _TwoLayer().to(device)
    x = torch.randn(2, 7, 12, device=device)
    width = torch.randint(0, 21, (2, 7), device=device)
    eager_out = model(x, width)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(x, width)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_inference_at_static_widths(device):
    # Eagerly, this path skips the custom op; compiled, it keeps it (no graph break).
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 12, generator=gen).to(device)
    weight, bias = torch.randn(20, 12, generator=gen).to(device), torch.randn(20, generator=gen).to(device)
    with torch.no_grad():
        eager = fk.elastic_linear(x, weight, bias, out_features=6, in_features=12)
        compiled = torch.compile(lambda x: fk.elastic_linear(x, weight, bias, out_features=6, in_features=12),
                                 fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# GPU: bf16 against fp64, at most 2x PyTorch's own bf16 error
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["static", "token_out", "token_in", "token_both"])
@pytest.mark.parametrize("lead,n_full,k_full", [((1,), 4096, 4096), ((37,), 1000, 777), ((513,), 11008, 4096)])
def test_bf16_error_within_twice_torch(kind, lead, n_full, k_full):
    _check_bf16_error(kind, lead, n_full, k_full)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["token_out", "token_in", "token_both"])
@pytest.mark.parametrize("lead,n_full,k_full", [((16,), 4096, 4096), ((200,), 1000, 776), ((1100,), 11008, 4096)])
def test_bf16_weight_tiles_through_tma(kind, lead, n_full, k_full, monkeypatch):
    # The weight tiles through TMA descriptors (B_TMA) on the decode, small and large
    # row families (the tile sweep may pick it for any of them).
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles
    from flextron_kernels.triton import routed_matmul

    made = []
    descriptor = routed_matmul._b_descriptor
    monkeypatch.setattr(routed_matmul, "_b_descriptor", lambda *args: made.append(args) or descriptor(*args))
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}):
        _check_bf16_error(kind, lead, n_full, k_full)
    # Every weight here allows TMA: the forward reads W, the input gradient W.T.
    assert [args[1] for args in made] == [(k_full, 1), (1, k_full)]


def _check_bf16_error(kind, lead, n_full, k_full):
    gen = torch.Generator().manual_seed(9)
    device = torch.device("cuda")
    x = torch.randn(*lead, k_full, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(n_full, k_full, generator=gen) / k_full**0.5).to(device, torch.bfloat16)
    b = torch.randn(n_full, generator=gen).to(device, torch.bfloat16)
    kw = widths_for(kind, lead, n_full, k_full, device, gen)
    grad_y = None

    def forward_backward(fn, tensors):
        nonlocal grad_y
        xs = [t.clone().requires_grad_() for t in tensors]
        y = fn(*xs, **kw)
        if grad_y is None:
            grad_y = torch.randn(y.shape, generator=gen).to(device, torch.bfloat16)
        y.backward(grad_y.to(y.dtype))
        return [y] + [t.grad for t in xs]

    ours = forward_backward(fk.elastic_linear, (x, w, b))
    torch_bf16 = forward_backward(reference.elastic_linear, (x, w, b))
    exact = forward_backward(reference.elastic_linear, (x.double(), w.double(), b.double()))
    for name, o, t, e in zip(("y", "dx", "dw", "db"), ours, torch_bf16, exact):
        ours_err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        assert torch.isfinite(o).all(), name
        assert ours_err <= 2 * torch_err + 1e-6, (name, ours_err, torch_err)
