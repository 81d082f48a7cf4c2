"""elastic_mlp against the reference: activations, gating, biases, scale, widths, both backends."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference
from flextron_kernels.ops.common import MAX_TORCH_RUNS
from flextron_kernels.ops.elastic_mlp import activation_derivative

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
BACKENDS = ["torch", "triton"]
NAMES = ("out", "dx", "dw_up", "dw_down", "db_up", "db_down", "dscale", "dw_gate")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")


def rel_err(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten) elements"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make(num_tokens, d_model, ffn, *, gated, bias, dtype, device, seed, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (num_tokens,)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, dtype)

    tensors = dict(
        x=randn(*shape, d_model),
        w_up=randn(ffn, d_model, scale=d_model**-0.5),
        w_down=randn(d_model, ffn, scale=ffn**-0.5),
        b_up=randn(ffn) if bias else None,
        b_down=randn(d_model) if bias else None,
        scale=(torch.rand(*shape, generator=gen) + 0.5).to(device, dtype),
        w_gate=randn(ffn, d_model, scale=d_model**-0.5) if gated else None,
    )
    return tensors, gen


def run(backend, tensors, width, activation, use_scale, as_params=False, grad=None, gen=None, max_width=None):
    """Forward and backward through our op and through the fp64 reference."""
    names = [n for n, t in tensors.items() if t is not None and (use_scale or n != "scale")]

    def leaf(t, param):
        return torch.nn.Parameter(t.clone()) if param else t.clone().requires_grad_()

    ours = {n: leaf(tensors[n], as_params and n not in ("x", "scale")) for n in names}
    ref = {n: tensors[n].detach().cpu().double().requires_grad_() for n in names}
    kw = lambda d: dict(  # noqa: E731
        width=width.to(tensors["x"].device) if isinstance(width, torch.Tensor) else width,
        w_gate=d.get("w_gate"), b_up=d.get("b_up"), b_down=d.get("b_down"), activation=activation, scale=d.get("scale"),
    )
    with fk.use_backend(backend):
        out = fk.elastic_mlp(ours["x"], ours["w_up"], ours["w_down"], **kw(ours), max_width=max_width)
        if grad is None:
            grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        out.backward(grad)
    ref_kw = kw(ref)
    if isinstance(width, torch.Tensor):
        ref_kw["width"] = width.cpu()
    ref_out = reference.elastic_mlp(ref["x"], ref["w_up"], ref["w_down"], **ref_kw)
    ref_out.backward(grad.double().cpu())
    got = {"out": out, **{f"d{n}" if n != "x" else "dx": ours[n].grad for n in names}}
    want = {"out": ref_out, **{f"d{n}" if n != "x" else "dx": ref[n].grad for n in names}}
    return got, want


def check(got, want, tol):
    for name, ref in want.items():
        out = got[name]
        if ref is None or ref.abs().max() == 0:
            assert out is None or (out == 0).all(), name
            continue
        assert rel_err(out, ref) < tol, name


CONFIGS = [
    # (gated, activation, bias)
    (True, "silu", False),
    (True, "gelu", True),
    (False, "gelu_tanh", True),
    (False, "gelu", False),
    (False, "relu", True),
    (False, "relu2", False),
    (False, "silu", True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated,activation,bias", CONFIGS)
@pytest.mark.parametrize("width_kind", ["per_token", "static"])
def test_matches_reference_fp32(backend, gated, activation, bias, width_kind, device):
    tensors, gen = make(23, 19, 45, gated=gated, bias=bias, dtype=torch.float32, device=device, seed=len(activation))
    width = torch.randint(0, 46, (23,), generator=gen) if width_kind == "per_token" else 29
    if width_kind == "per_token":
        width[:2] = torch.tensor([0, 45])
    got, want = run(backend, tensors, width, activation, use_scale=True, gen=gen)
    check(got, want, 1e-5)


@pytest.mark.parametrize("widths_kind", ["few", "many", "one", "masked"])
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", True), (False, "gelu_tanh", True)])
@pytest.mark.parametrize("recompute", [False, True])
def test_torch_backend_token_runs(widths_kind, gated, activation, bias, recompute, monkeypatch):
    """The torch backend on a CPU computes runs of like-width tokens, each at its own width:
    one run per distinct width (few), equal runs at their widest token's width, masked
    (many), one width for every token (below the bound); and, as off a CPU, every token at
    the bound, masked."""
    import functools
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_mlp")
    tensors, gen = make(29, 19, 45, gated=gated, bias=bias, dtype=torch.float32, device="cpu", seed=3)
    width = {
        "few": torch.tensor([0, 45, 17, 30])[torch.randint(0, 4, (29,), generator=gen)],
        "many": torch.randint(0, 46, (29,), generator=gen),
        "one": torch.full((29,), 17),
        "masked": torch.randint(0, 46, (29,), generator=gen),
    }[widths_kind]
    seen = []
    runs = (lambda widths, fw: [(None, fw, widths)]) if widths_kind == "masked" else module.torch_runs
    monkeypatch.setattr(module, "torch_runs", lambda *a: seen.append(runs(*a)) or seen[-1])
    partial_run = functools.partial(run, "torch", tensors, width, activation, use_scale=True, gen=gen)
    if recompute:
        monkeypatch.setattr(fk, "elastic_mlp", functools.partial(fk.elastic_mlp, recompute=True))
    check(*partial_run(), 1e-5)
    expected = {"few": 4, "many": MAX_TORCH_RUNS, "one": 1, "masked": 1}[widths_kind]
    assert seen and all(len(r) == expected for r in seen), [len(r) for r in seen]
    assert len(seen) == (3 if recompute else 2)  # forward, (recomputed pre-activations,) backward
    if widths_kind == "many":
        assert any(mask is not None for runs_seen in seen for _, _, mask in runs_seen)  # runs of unlike widths


@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", True), (False, "gelu_tanh", False)])
def test_weight_tiles_through_tma_descriptors(gated, activation, bias, device, monkeypatch):
    """The routed matmul's B_TMA option on every matmul family: each weight (and its
    transpose, in the input gradients) goes through a descriptor, with the same results."""
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles
    from flextron_kernels.triton import routed_matmul

    made = []
    descriptor = routed_matmul._b_descriptor
    monkeypatch.setattr(routed_matmul, "_b_descriptor", lambda *args: made.append(args[1]) or descriptor(*args))
    d_model, ffn = 20, 44  # fp32 rows of 80 and 176 bytes: 16-byte aligned
    tensors, gen = make(23, d_model, ffn, gated=gated, bias=bias, dtype=torch.float32, device=device, seed=5)
    width = torch.randint(0, ffn + 1, (23,), generator=gen)
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}):
        got, want = run("triton", tensors, width, activation, use_scale=True, gen=gen)
    check(got, want, TOL[torch.float32])
    # Forward: up (and gate), down; backward: down.T (hidden gradient), up.T (and gate.T) (dx).
    up, down = (d_model, 1), (ffn, 1)
    expected = [up, up, down, down[::-1], up[::-1], up[::-1]] if gated else [up, down, down[::-1], up[::-1]]
    assert made == expected


def test_weight_tiles_through_tma_stop_at_the_width(device):
    """B_TMA descriptors span only the used width: the weights hold inf past it, and the
    output and input gradient stay those of the width."""
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles

    tensors, gen = make(23, 20, 44, gated=True, bias=False, dtype=torch.float32, device=device, seed=6)
    width = 28
    poisoned = dict(tensors)
    for name, cut in (("w_up", (slice(width, None),)), ("w_gate", (slice(width, None),)),
                      ("w_down", (slice(None), slice(width, None)))):
        poisoned[name] = tensors[name].clone()
        poisoned[name][cut] = float("inf")
    grad = torch.randn(23, 20, generator=gen).to(device)
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}), fk.use_backend("triton"):
        x = poisoned["x"].clone().requires_grad_()
        out = fk.elastic_mlp(x, poisoned["w_up"], poisoned["w_down"], width=width, w_gate=poisoned["w_gate"])
        out.backward(grad)
    x64 = tensors["x"].double().cpu().requires_grad_()
    ref = reference.elastic_mlp(x64, *(tensors[n].double().cpu() for n in ("w_up", "w_down")), width=width,
                                w_gate=tensors["w_gate"].double().cpu())
    ref.backward(grad.double().cpu())
    assert rel_err(out, ref) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", True), (False, "relu", False)])
def test_max_width_bounds_the_hidden_width(backend, gated, activation, bias, device):
    tensors, gen = make(21, 16, 80, gated=gated, bias=bias, dtype=torch.float32, device=device, seed=5)
    width = torch.randint(0, 34, (21,), generator=gen)
    width[:2] = torch.tensor([0, 33])
    got, want = run(backend, tensors, width, activation, use_scale=True, gen=gen, max_width=33)
    check(got, want, 1e-5)
    with fk.use_backend(backend):  # the saved pre-activations are [T, max_width]
        saved = torch.ops.flextron.elastic_mlp_fwd(
            tensors["x"], tensors["w_up"], tensors["w_down"], tensors["w_gate"], None, None, width.to(device), 33,
            activation, None, True)
    assert saved[1].shape == (21, 33)


def test_max_width_is_checked():
    x, w_up, w_down = torch.randn(4, 8), torch.randn(20, 8), torch.randn(8, 20)
    with pytest.raises(ValueError, match="width: expected every width in \\[0, 10\\], got values in \\[2, 12\\]"):
        fk.elastic_mlp(x, w_up, w_down, width=torch.tensor([2, 12, 3, 4]), max_width=10)
    with pytest.raises(ValueError, match="max_width: expected an int in \\[0, 20\\], got 21"):
        fk.elastic_mlp(x, w_up, w_down, width=torch.tensor([2, 12, 3, 4]), max_width=21)
    mlp = fk.ElasticMLP(8, 20)
    widths = torch.tensor([2, 9, 3, 0])
    torch.testing.assert_close(mlp(x, width=widths, max_width=9), mlp(x, width=widths))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh")])
def test_matches_reference_fp16(backend, gated, activation, device):
    tensors, gen = make(37, 24, 70, gated=gated, bias=True, dtype=torch.float16, device=device, seed=3)
    width = torch.randint(0, 71, (37,), generator=gen)
    got, want = run(backend, tensors, width, activation, use_scale=True, gen=gen)
    check(got, want, TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_accumulate_in_place(backend, device):
    tensors, gen = make(17, 16, 40, gated=True, bias=True, dtype=torch.float32, device=device, seed=4)
    width = torch.tensor([0, 40, 8, 8, 8, 16, 24, 32, 40, 1, 2, 3, 39, 40, 10, 10, 20])
    grad = torch.randn(17, 16, generator=gen).to(device)
    plain, want = run(backend, tensors, width, "silu", use_scale=True, grad=grad)
    params, _ = run(backend, tensors, width, "silu", use_scale=True, as_params=True, grad=grad)
    for name in want:
        torch.testing.assert_close(params[name], plain[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_grads_accumulate_across_subnetworks_and_keep_the_rest(backend, device):
    torch.manual_seed(5)
    mlp = fk.ElasticMLP(16, 48, gated=True, activation="silu", bias=True).to(device)
    before = {n: torch.randn_like(p) for n, p in mlp.named_parameters()}
    for n, p in mlp.named_parameters():
        p.grad = before[n].clone()
    x = torch.randn(9, 16, device=device)
    choices = [dict(width=12), dict(width=torch.tensor([0, 4, 48, 12, 12, 30, 1, 47, 48], device=device)), dict()]
    with fk.use_backend(backend):
        for kw in choices:
            mlp(x, **kw).square().sum().backward()
    ref = {n: p.detach().double().requires_grad_() for n, p in mlp.named_parameters()}
    for kw in choices:
        width = kw.get("width", 48)
        width = width.cpu() if isinstance(width, torch.Tensor) else width
        reference.elastic_mlp(
            x.double().cpu(), ref["w_up"].cpu(), ref["w_down"].cpu(), width=width, w_gate=ref["w_gate"].cpu(),
            b_up=ref["b_up"].cpu(), b_down=ref["b_down"].cpu(),
        ).square().sum().backward()
    for n, p in mlp.named_parameters():
        assert rel_err(p.grad - before[n], ref[n].grad) < 1e-5, n
    # A static sub-network leaves the unused part of each gradient untouched.
    for p in mlp.parameters():
        p.grad = None
    mlp(x, width=12).sum().backward()
    assert (mlp.w_up.grad[12:] == 0).all() and (mlp.w_down.grad[:, 12:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_width_everywhere_equals_dense_mlp(backend, device):
    torch.manual_seed(6)
    d_model, ffn, width = 16, 40, 24
    mlp = fk.ElasticMLP(d_model, ffn, gated=True).to(device)
    x = torch.randn(2, 5, d_model, device=device)
    with fk.use_backend(backend):
        out = mlp(x, width=torch.full((2, 5), width, device=device))
    dense = torch.nn.functional.silu(x @ mlp.w_gate[:width].T) * (x @ mlp.w_up[:width].T) @ mlp.w_down[:, :width].T
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["width0", "one_token_per_width", "fewer_than_block", "empty", "one_token"])
def test_edge_cases(backend, case, device):
    num_tokens = {"width0": 9, "one_token_per_width": 5, "fewer_than_block": 3, "empty": 0, "one_token": 1}[case]
    tensors, gen = make(num_tokens, 16, 40, gated=True, bias=True, dtype=torch.float32, device=device, seed=7)
    width = {
        "width0": torch.zeros(9, dtype=torch.int64),
        "one_token_per_width": torch.tensor([10, 20, 30, 40, 0]),
        "fewer_than_block": torch.tensor([40, 3, 17]),
        "empty": torch.zeros(0, dtype=torch.int64),
        "one_token": torch.tensor([33]),
    }[case]
    got, want = run(backend, tensors, width, "silu", use_scale=True, gen=gen)
    assert got["out"].shape == want["out"].shape
    if num_tokens:
        check(got, want, 1e-5)
    if case == "width0":  # only b_down reaches the output, and dscale is 0
        torch.testing.assert_close(got["out"], tensors["b_down"].expand(9, 16))


def test_batch_shape_and_static_width_zero(device):
    tensors, gen = make(0, 12, 30, gated=False, bias=True, dtype=torch.float32, device=device, seed=8, lead=(2, 3))
    for width in (0, 30, torch.randint(0, 31, (2, 3), generator=gen)):
        got, want = run("torch", tensors, width, "gelu", use_scale=False, gen=gen)
        check(got, want, 1e-5)


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activation_derivatives(activation):
    z = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(reference.activation(activation, z).sum(), z)
    torch.testing.assert_close(activation_derivative(activation, z.detach()), grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("static", [False, True])
def test_inference_without_grad(backend, static, device):
    # Static widths on the torch backend skip the custom op: same results.
    tensors, gen = make(7, 16, 40, gated=True, bias=True, dtype=torch.float32, device=device, seed=12)
    t = tensors
    width = 23 if static else torch.randint(0, 41, (7,), generator=gen).to(device)
    with torch.no_grad(), fk.use_backend(backend):
        out = fk.elastic_mlp(t["x"], t["w_up"], t["w_down"], width=width, w_gate=t["w_gate"], b_up=t["b_up"], b_down=t["b_down"])
    ref = reference.elastic_mlp(t["x"].double(), t["w_up"].double(), t["w_down"].double(), width=width,
                                w_gate=t["w_gate"].double(), b_up=t["b_up"].double(), b_down=t["b_down"].double())
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", True), (False, "gelu_tanh", False)])
@pytest.mark.parametrize("width_kind", ["per_token", "static"])
def test_recompute_gives_the_same_gradients_and_keeps_nothing_hidden_sized(backend, gated, activation, bias,
                                                                            width_kind, device):
    """recompute=True: the backward recomputes the first layer's pre-activations, so autograd
    keeps no [T, width] tensor from the forward; outputs and every gradient are those of the
    default, which keeps them."""
    num_tokens, d_model, ffn = 21, 16, 40
    torch.manual_seed(13)
    mlp = fk.ElasticMLP(d_model, ffn, gated=gated, activation=activation, bias=bias).to(device)
    if bias:  # not the zeros they start as: a recompute without b_up would show
        with torch.no_grad():
            mlp.b_up.normal_()
            mlp.b_down.normal_()
    x = torch.randn(num_tokens, d_model, device=device, requires_grad=True)
    scale = torch.rand(num_tokens, device=device, requires_grad=True)
    width = torch.randint(0, ffn + 1, (num_tokens,)).to(device) if width_kind == "per_token" else 27
    results = {}
    for recompute in (False, True):
        mlp.recompute = recompute
        mlp.zero_grad(set_to_none=True)
        x.grad = scale.grad = None
        saved = []
        with fk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = mlp(x, width=width, scale=scale)
        out.square().sum().backward()
        results[recompute] = [out, x.grad, scale.grad] + [p.grad for p in mlp.parameters()]
        hidden_sized = [shape for shape in saved if shape == (num_tokens, 27 if width_kind == "static" else ffn)]
        assert bool(hidden_sized) != recompute, saved
    for keep, again in zip(results[False], results[True]):
        torch.testing.assert_close(again, keep, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_recompute_keeps_small_training_batches_off_the_decode_kernel(monkeypatch):
    # With recompute the forward saves nothing, yet a backward follows: at 64 tokens or
    # fewer it must still run the training kernels (the fused decode kernel is for inference).
    from flextron_kernels.ops import elastic_mlp_decode

    def no_decode_kernel(*args, **kwargs):
        raise AssertionError("the fused decode kernel ran in a training step")

    monkeypatch.setattr(elastic_mlp_decode, "forward_cuda", no_decode_kernel)
    mlp = fk.ElasticMLP(256, 512, recompute=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mlp(x, width=torch.full((8,), 256, device="cuda")).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_backward_twice_is_a_clear_error(device):
    mlp = fk.ElasticMLP(8, 16).to(device)
    out = mlp(torch.randn(3, 8, device=device), width=8).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        out.backward()


def _bad_cases():
    x, w_up, w_down, w_gate = torch.randn(4, 6), torch.randn(10, 6), torch.randn(6, 10), torch.randn(10, 6)
    base = dict(x=x, w_up=w_up, w_down=w_down, width=5)
    return [
        (dict(base, activation="swish"), ValueError, "activation: expected one of silu, gelu, gelu_tanh, relu, relu2 for an ungated MLP, got 'swish'"),
        (dict(base, w_gate=w_gate, activation="relu2"), ValueError, "activation: expected one of silu, gelu for a gated"),
        (dict(base, w_down=torch.randn(6, 9)), ValueError, "w_down: expected shape \\(6, 10\\), got \\(6, 9\\)"),
        (dict(base, w_up=torch.randn(10, 5)), ValueError, "w_up: expected shape \\[F, 6\\]"),
        (dict(base, w_gate=torch.randn(9, 6)), ValueError, "w_gate: expected shape \\(10, 6\\)"),
        (dict(base, b_up=torch.randn(6)), ValueError, "b_up: expected shape \\(10,\\)"),
        (dict(base, b_down=torch.randn(10)), ValueError, "b_down: expected shape \\(6,\\)"),
        (dict(base, width=11), ValueError, "width: expected an int in \\[0, 10\\], got 11"),
        (dict(base, width=torch.tensor([1, 2, 3, 11])), ValueError, "width: expected every width in \\[0, 10\\]"),
        (dict(base, width=torch.tensor([1, -2, 3, 1])), ValueError, "width: expected every width in \\[0, 10\\]"),
        (dict(base, width=torch.tensor([1.0, 2, 3, 1])), TypeError, "width: expected an integer tensor"),
        (dict(base, width=torch.tensor([1, 2])), ValueError, "width: expected shape \\(4,\\)"),
        (dict(base, width=torch.ones(4, dtype=torch.int64, device="meta")), ValueError, "width: expected a tensor on cpu"),
        (dict(base, width=None), TypeError, "width: expected an int or an integer tensor"),
        (dict(base, scale=torch.ones(3)), ValueError, "scale: expected shape \\(4,\\)"),
        (dict(base, scale=torch.ones(4, dtype=torch.int64)), TypeError, "scale: expected dtype in"),
        (dict(base, w_down=w_down.half()), TypeError, "w_down: expected dtype torch.float32"),
        (dict(base, recompute=1), TypeError, "recompute: expected a bool, got int"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        fk.elastic_mlp(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    tensors, gen = make(11, 12, 30, gated=True, bias=True, dtype=torch.float32, device=device, seed=9)
    t = tensors
    widths = torch.randint(0, 31, (11,), generator=gen).to(device)
    with fk.use_backend(backend):
        for w, fw in ((widths, 30), (None, 13)):
            for save in (True, False):
                torch.library.opcheck(
                    torch.ops.flextron.elastic_mlp_fwd,
                    (t["x"], t["w_up"], t["w_down"], t["w_gate"], t["b_up"], t["b_down"], w, fw, "silu", t["scale"], save),
                )
            out, up_pre, gate_pre = torch.ops.flextron.elastic_mlp_fwd(
                t["x"], t["w_up"], t["w_down"], t["w_gate"], t["b_up"], t["b_down"], w, fw, "silu", t["scale"], True
            )
            grads = [torch.zeros_like(t[n]) for n in ("w_up", "w_down", "w_gate", "b_up", "b_down")]
            torch.library.opcheck(
                torch.ops.flextron.elastic_mlp_bwd_,
                (*grads, torch.randn_like(out), t["x"], t["w_up"], t["w_down"], t["w_gate"], w, fw, "silu", t["scale"],
                 up_pre, gate_pre, True),
            )
            for w_gate in (t["w_gate"], None):
                torch.library.opcheck(torch.ops.flextron.elastic_mlp_pre,
                                      (t["x"], t["w_up"], w_gate, t["b_up"], w, fw, "silu"))


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_compile_fullgraph(recompute, device):
    torch.manual_seed(10)
    mlp = fk.ElasticMLP(12, 32, gated=True, bias=True, recompute=recompute).to(device)
    x = torch.randn(2, 5, 12, device=device)
    width = torch.randint(0, 33, (2, 5), device=device)
    scale = torch.rand(2, 5, device=device, requires_grad=True)
    eager = mlp(x, width=width, scale=scale)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in mlp.parameters()] + [scale.grad.clone()]
    mlp.zero_grad(set_to_none=True)
    scale.grad = None
    compiled = torch.compile(lambda x, w, s: mlp(x, width=w, scale=s), fullgraph=True, backend="aot_eager")
    out = compiled(x, width, scale)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip([p.grad for p in mlp.parameters()] + [scale.grad], eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_inference_at_a_static_width(device):
    # Eagerly, this path skips the custom op; compiled, it keeps it (no graph break).
    torch.manual_seed(11)
    mlp = fk.ElasticMLP(12, 32, gated=True, bias=True).to(device)
    x = torch.randn(2, 5, 12, device=device)
    with torch.no_grad():
        eager = mlp(x, width=20)
        compiled = torch.compile(lambda x: mlp(x, width=20), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh")])
@pytest.mark.parametrize("num_tokens,d_model,ffn", [(1, 4096, 11008), (333, 1000, 2750), (2048, 4096, 11008)])
def test_bf16_error_within_twice_torch(gated, activation, num_tokens, d_model, ffn):
    _check_bf16_error(gated, activation, num_tokens, d_model, ffn)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 2048])
def test_bf16_weight_tiles_through_tma(num_tokens, monkeypatch):
    # Every weight tile through TMA descriptors (B_TMA), on the decode and large row families.
    from flextron_kernels.ops.tiles import MATMUL_FAMILIES, override_tiles
    from flextron_kernels.triton import routed_matmul

    made = []
    descriptor = routed_matmul._b_descriptor
    monkeypatch.setattr(routed_matmul, "_b_descriptor", lambda *args: made.append(args) or descriptor(*args))
    with override_tiles(**{family: dict(B_TMA=True) for family in MATMUL_FAMILIES}):
        _check_bf16_error(True, "silu", num_tokens, 4096, 11008)
    # Every weight here allows TMA: up, gate, down; down.T, up.T, gate.T (see the CPU test).
    up, down = (4096, 1), (11008, 1)
    assert [args[1] for args in made] == [up, up, down, down[::-1], up[::-1], up[::-1]]


def _check_bf16_error(gated, activation, num_tokens, d_model, ffn):
    device = torch.device("cuda")
    tensors, gen = make(num_tokens, d_model, ffn, gated=gated, bias=True, dtype=torch.bfloat16, device=device, seed=11)
    fractions = torch.tensor([0.25, 0.5, 0.75, 1.0])
    width = (fractions[torch.randint(0, 4, (num_tokens,), generator=gen)] * ffn).long()
    grad = torch.randn(num_tokens, d_model, generator=gen).to(device, torch.bfloat16)
    got, exact = run("auto", tensors, width, activation, use_scale=True, grad=grad)
    names = [n for n, t in tensors.items() if t is not None]
    bf = {n: tensors[n].clone().requires_grad_() for n in names}
    torch_out = reference.elastic_mlp(
        bf["x"], bf["w_up"], bf["w_down"], width=width.to(device), w_gate=bf.get("w_gate"), b_up=bf.get("b_up"),
        b_down=bf.get("b_down"), activation=activation, scale=bf["scale"],
    )
    torch_out.backward(grad)
    # PyTorch's own bf16 error: the reference evaluated in bf16 on the same inputs.
    torch_bf16 = {"out": torch_out, **{f"d{n}" if n != "x" else "dx": bf[n].grad for n in names}}
    for name, e in exact.items():
        ours_err = (got[name].double().cpu() - e).abs().max().item()
        torch_err = (torch_bf16[name].double().cpu() - e).abs().max().item()
        assert torch.isfinite(got[name]).all(), name
        assert ours_err <= 2 * torch_err + 1e-6, (name, ours_err, torch_err)
