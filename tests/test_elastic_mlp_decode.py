"""elastic_mlp_decode (the decode-step MLP, up to 64 tokens) against the reference: every
backend, per-token and static widths, activations, biases, scale; the CUDA kernel in bf16
and fp16 on a GPU, in a CUDA graph, and as elastic_mlp's inference path."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference
from flextron_kernels.ops.tiles import has_tuned_tiles

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")


def make(num_tokens, d_model, ffn, *, gated, bias, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    return dict(
        x=randn(num_tokens, d_model),
        w_up=randn(ffn, d_model, scale=d_model**-0.5),
        w_down=randn(d_model, ffn, scale=ffn**-0.5),
        w_gate=randn(ffn, d_model, scale=d_model**-0.5) if gated else None,
        b_up=randn(ffn) if bias else None,
        b_down=randn(d_model) if bias else None,
        scale=(torch.rand(num_tokens, generator=gen) + 0.5).to(device, dtype),
    ), gen


def call(op, t, width, activation, use_scale, **kw):
    return op(t["x"], t["w_up"], t["w_down"], width=width, w_gate=t["w_gate"], b_up=t["b_up"], b_down=t["b_down"],
              activation=activation, scale=t["scale"] if use_scale else None, **kw)


def reference_out(t, width, activation, use_scale, dtype=torch.float64):
    """The reference in fp64 from the same inputs, on their device (fp64 on a GPU is quick)."""
    up = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    return call(reference.elastic_mlp, up, width, activation, use_scale)


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten) elements"
    return (out - ref).norm().item() / max(ref.norm().item(), 1e-30)


def per_token_widths(num_tokens, ffn, gen, device):
    widths = torch.randint(0, ffn + 1, (num_tokens,), generator=gen)
    if num_tokens >= 2:
        widths[0], widths[1] = 0, ffn
    return widths.to(device)


CASES = [  # (tokens, d_model, ffn, gated, activation, bias, scale)
    (1, 24, 40, True, "silu", False, False),
    (5, 16, 37, True, "gelu", True, True),
    (3, 19, 24, False, "gelu_tanh", True, False),
    (7, 16, 16, False, "relu2", False, True),
    (0, 16, 24, True, "silu", False, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-{c[4]}")
def test_matches_reference(backend, dtype, per_token, case, device):
    num_tokens, d_model, ffn, gated, activation, bias, use_scale = case
    if backend == "torch" and dtype == torch.float16 and device.type == "cpu":
        dtype = torch.float32  # fp16 matmuls on the CPU are the reference's business, not ours
    t, gen = make(num_tokens, d_model, ffn, gated=gated, bias=bias, dtype=dtype, device=device, seed=num_tokens + ffn)
    width = per_token_widths(num_tokens, ffn, gen, device) if per_token else ffn // 2 + 1
    with torch.no_grad(), fk.use_backend(backend):
        out = call(fk.elastic_mlp_decode, t, width, activation, use_scale)
    assert out.shape == t["x"].shape and out.dtype == dtype
    if num_tokens:
        assert rel_err(out, reference_out(t, width, activation, use_scale)) < TOL[dtype]


@pytest.mark.parametrize("width", [0, 40])
def test_width_zero_and_full(width, device):
    t, _ = make(4, 16, 40, gated=True, bias=True, dtype=torch.float32, device=device, seed=3)
    with torch.no_grad():
        out = call(fk.elastic_mlp_decode, t, width, "silu", False)
    assert rel_err(out, reference_out(t, width, "silu", False)) < 1e-5
    if width == 0:  # nothing but the output bias
        torch.testing.assert_close(out, t["b_down"].expand_as(out), rtol=0, atol=0)


def test_leading_batch_shape_and_64_tokens():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 8, 16, generator=gen)
    w_up, w_gate, w_down = torch.randn(24, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)
    widths = torch.randint(0, 25, (8, 8), generator=gen)
    with torch.no_grad():
        out = fk.elastic_mlp_decode(x, w_up, w_down, width=widths, w_gate=w_gate)
    want = reference.elastic_mlp(x.double(), w_up.double(), w_down.double(), width=widths, w_gate=w_gate.double())
    assert out.shape == x.shape and rel_err(out, want) < 1e-5


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    x, w_up, w_gate, w_down = (torch.randn(s, generator=gen) for s in ((3, 16), (24, 16), (24, 16), (16, 24)))
    b_down, scale = torch.randn(16, generator=gen), torch.rand(3, generator=gen)
    for widths, width in ((torch.tensor([0, 7, 24]), 24), (None, 9)):
        torch.library.opcheck(  # the op elastic_mlp_decode runs, with nothing saved
            torch.ops.flextron.elastic_mlp_fwd,
            (x, w_up, w_down, w_gate, None, b_down, widths, width, "silu", scale, False),
        )


def test_compiles_fullgraph():
    gen = torch.Generator().manual_seed(6)
    x, w_up, w_down = torch.randn(4, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)
    widths = torch.tensor([1, 24, 0, 13])

    def step(x, widths):
        return fk.elastic_mlp_decode(x, w_up, w_down, width=widths, activation="relu")

    with torch.no_grad(), fk.skip_width_value_checks():
        eager = step(x, widths)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, widths)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_bad_input():
    gen = torch.Generator().manual_seed(7)
    x, w_up, w_down = torch.randn(65, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)
    with torch.no_grad(), pytest.raises(ValueError, match="at most 64 tokens.*got 65"):
        fk.elastic_mlp_decode(x, w_up, w_down, width=8)
    with pytest.raises(ValueError, match="no backward.*requires grad"):
        fk.elastic_mlp_decode(x[:4], w_up.requires_grad_(), w_down, width=8)
    w_up.requires_grad_(False)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"width: expected every width in \[0, 24\]"):
            fk.elastic_mlp_decode(x[:2], w_up, w_down, width=torch.tensor([3, 25]))
        with pytest.raises(TypeError, match="width: expected an integer tensor"):
            fk.elastic_mlp_decode(x[:2], w_up, w_down, width=torch.tensor([3.0, 2.0]))
        with pytest.raises(ValueError, match="activation: expected one of silu, gelu for a gated MLP"):
            fk.elastic_mlp_decode(x[:2], w_up, w_down, width=3, w_gate=w_up, activation="relu")
        with pytest.raises(TypeError, match="w_down: expected dtype torch.float32"):
            fk.elastic_mlp_decode(x[:2], w_up, w_down.half(), width=3)


# --------------------------------------------------------------------------- #
# GPU: the CUDA kernel against fp64 (at most 2x PyTorch's own error), graph capture
# --------------------------------------------------------------------------- #
GPU_CASES = [  # (tokens, d_model, ffn, gated, activation, bias, scale)
    (1, 4096, 11008, True, "silu", False, False),
    (16, 4096, 11008, True, "silu", False, False),
    (5, 136, 200, True, "gelu", True, True),
    (17, 264, 96, False, "gelu_tanh", True, False),
    (33, 128, 136, False, "relu2", False, True),
    (64, 512, 1000, True, "silu", True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-{c[4]}")
def test_cuda_kernel_error_within_twice_torch(dtype, per_token, case):
    num_tokens, d_model, ffn, gated, activation, bias, use_scale = case
    device = torch.device("cuda")
    t, gen = make(num_tokens, d_model, ffn, gated=gated, bias=bias, dtype=dtype, device=device, seed=ffn)
    width = per_token_widths(num_tokens, ffn, gen, device) if per_token else (3 * ffn) // 4 + 1
    with torch.no_grad():
        with fk.use_backend("cuda"):
            ours = call(fk.elastic_mlp_decode, t, width, activation, use_scale)
        # PyTorch's own low-precision error: the reference evaluated in the same dtype.
        torch_low = call(reference.elastic_mlp, t, width, activation, use_scale)
    want = reference_out(t, width, activation, use_scale)
    assert torch.isfinite(ours).all()
    ours_err = (ours.double() - want).abs().max().item()
    torch_err = (torch_low.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.gpu
def test_elastic_mlps_inference_path_and_fallback():
    device = torch.device("cuda")
    t, gen = make(16, 256, 512, gated=True, bias=False, dtype=torch.bfloat16, device=device, seed=8)
    widths = per_token_widths(16, 512, gen, device)
    with torch.no_grad():
        with fk.use_backend("cuda"):
            fused = call(fk.elastic_mlp_decode, t, widths, "silu", False)
        with fk.use_backend("triton"):
            routed = call(fk.elastic_mlp_decode, t, widths, "silu", False)
        # No grad, 16 tokens: the decode path, through the Triton kernels where this GPU
        # has tuned decode tiles (they stream the weights faster), else the fused kernel.
        auto = call(fk.elastic_mlp, t, widths, "silu", False)
        assert torch.equal(auto, routed if has_tuned_tiles("matmul_decode", device) else fused)
        # A row that does not start on 16 bytes: the Triton path, same meaning.
        x_odd = torch.empty(16, 257, dtype=torch.bfloat16, device=device)[:, 1:]
        x_odd.copy_(t["x"])
        shifted = dict(t, x=x_odd)
        with fk.use_backend("cuda"):
            fallback = call(fk.elastic_mlp_decode, shifted, widths, "silu", False)
    torch.testing.assert_close(fallback, fused, rtol=2e-2, atol=2e-2)


def test_elastic_mlp_saves_nothing_for_backward_under_no_grad(monkeypatch):
    """Inference through a module whose weights require grad: the forward is asked for
    no saved pre-activations (on a GPU, the condition for the fused decode kernel)."""
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_mlp")
    saves = []
    original = module.forward_impl  # what the op runs; eager calls run it directly

    def spy(*args, **kwargs):
        saves.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward_impl", spy)
    mlp = fk.ElasticMLP(16, 24)
    x = torch.randn(3, 16)
    with torch.no_grad():
        mlp(x, width=torch.tensor([0, 8, 24]))
    mlp(x.requires_grad_(), width=8).sum().backward()
    assert saves == [False, True]
    assert mlp.w_up.grad is not None


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    device = torch.device("cuda")
    t, gen = make(8, 512, 1024, gated=True, bias=False, dtype=torch.bfloat16, device=device, seed=9)
    widths = per_token_widths(8, 1024, gen, device)

    def step():
        return call(fk.elastic_mlp_decode, t, widths, "silu", False)

    with torch.no_grad(), fk.use_backend("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for i in range(3):
            t["x"].copy_(torch.randn(t["x"].shape, generator=gen).to(device, t["x"].dtype))
            widths.copy_(torch.randint(0, 1025, (8,), generator=gen).to(device))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, step()), i
