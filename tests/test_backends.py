"""Backend selection, build_info, and the package importing without the extension."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import backends
from flextron_kernels.backends import requested_backend, select_backend


def test_use_backend_nests_and_restores():
    base = requested_backend()
    with fk.use_backend("torch"):
        assert requested_backend() == "torch"
        with fk.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "torch"
    assert requested_backend() == base


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend: expected one of auto, torch, triton, cuda, got 'cublas'"):
        with fk.use_backend("cublas"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FLEXTRON_BACKEND", "torch")
    assert requested_backend() == "torch"
    monkeypatch.setenv("FLEXTRON_BACKEND", "fast")
    with pytest.raises(ValueError, match="FLEXTRON_BACKEND: expected one of"):
        requested_backend()


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fk.use_backend("triton"):
        with pytest.raises(ValueError, match="backend 'triton' is not available for cpu tensors here; available: torch"):
            fk.elastic_linear(torch.randn(2, 3), torch.randn(4, 3))


def test_auto_prefers_in_order():
    cpu = torch.device("cpu")
    assert select_backend("op", cpu, ("triton", "torch"), ("torch", "triton")) == "torch"
    with fk.use_backend("triton"):
        expected = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else None
        if expected:
            assert select_backend("op", cpu, ("triton", "torch"), ("torch", "triton")) == "triton"
            # An op with no Triton implementation uses its own choice.
            assert select_backend("op", cpu, ("cuda", "torch"), ("cuda", "torch")) in ("cuda", "torch")


def test_build_info_keys():
    info = fk.build_info()
    for key in ("version", "extension", "extension_build", "torch", "triton", "cuda_available", "backends"):
        assert key in info
    assert info["version"] == fk.__version__
    assert "torch" in info["backends"]["cpu"]
    if info["extension"]:
        assert set(info["extension_build"]) >= {"cuda", "cuda_archs", "cxx_compiler"}


@pytest.mark.skipif(os.environ.get("FLEXTRON_EXPECT_EXT") != "1", reason="the test command did not ask for the extension")
def test_extension_was_built_and_installed():
    info = fk.build_info()
    assert info["extension"], f"flextron_kernels._C did not import: {info['extension_error']}"
    assert "cuda" in info["backends"]["cpu"]


def test_package_works_without_extension():
    code = (
        "import torch, flextron_kernels as fk\n"
        "info = fk.build_info()\n"
        "assert not info['extension'] and 'cuda' not in info['backends']['cpu'], info\n"
        "w = torch.tensor([3, 0, 5])\n"
        "m = fk.routing_metadata(w, torch.tensor([2, 5]), 2)\n"
        "assert m.sorted_token_idx.tolist() == [1, 0, 2]\n"
        "y = fk.elastic_linear(torch.randn(3, 4), torch.randn(5, 4), out_features=w)\n"
        "assert (y[1] == 0).all()\n"
    )
    env = dict(os.environ, FLEXTRON_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def _op_runs(kind, device):
    """A forward of one op (its output) that a backward will run through."""
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        x = torch.randn(6, 8, generator=gen).to(device).requires_grad_()
        return fk.elastic_linear(x, torch.randn(12, 8, generator=gen).to(device).requires_grad_(),
                                 out_features=torch.tensor([3, 12, 5, 0, 7, 12]).to(device))
    if kind == "mlp":
        mlp = fk.ElasticMLP(8, 16).to(device)
        x = torch.randn(6, 8, generator=gen).to(device).requires_grad_()
        return mlp(x, width=torch.tensor([3, 16, 5, 0, 7, 16]).to(device))
    q = torch.randn(6, 2, 16, generator=gen).to(device).requires_grad_()
    kv = torch.randn(6, 1, 16, generator=gen).to(device).requires_grad_()
    return fk.elastic_attention(q, kv, kv, heads=torch.tensor([1, 2, 2, 1, 2, 2]).to(device))


@pytest.mark.parametrize("kind", ["linear", "mlp", "attention"])
def test_backward_on_another_thread_keeps_the_forwards_settings(kind, device, monkeypatch):
    """On a GPU, autograd runs the backward on a thread of its own, where use_backend and
    the other dispatch settings of the caller would be unset: the forward saves them."""
    seen = []
    original = backends.requested_backend
    monkeypatch.setattr(backends, "requested_backend", lambda: seen.append(original()) or seen[-1])
    with fk.use_backend("torch"), fk.skip_width_value_checks():
        out = _op_runs(kind, device)
    seen.clear()
    worker = threading.Thread(target=lambda: out.square().sum().backward())  # a fresh context, as autograd's threads
    worker.start()
    worker.join()
    assert seen and set(seen) == {"torch"}


def _public_calls():
    """Each public op once on small inputs, as ``{name: call}``."""
    gen = torch.Generator().manual_seed(0)
    x, w, w_down = (torch.randn(*shape, generator=gen) for shape in ((5, 16), (24, 16), (16, 24)))
    widths = torch.tensor([0, 3, 24, 8, 17])
    q, k = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    cache = torch.randn(2, 2, 7, 16, generator=gen)
    return {
        "elastic_linear": lambda: fk.elastic_linear(x, w, out_features=widths.clamp(max=24)),
        "elastic_mlp": lambda: fk.elastic_mlp(x, w, w_down, width=widths, w_gate=w),
        "elastic_mlp_decode": lambda: fk.elastic_mlp_decode(x, w, w_down, width=widths, w_gate=w),
        "elastic_attention": lambda: fk.elastic_attention(q, k, k, heads=torch.tensor([4, 2, 2, 0, 4])),
        "elastic_attention_decode": lambda: fk.elastic_attention_decode(
            q[:2], cache, cache, cache_seqlens=torch.tensor([3, 7]), heads=2),
    }


@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_eager_inference_runs_the_implementation_without_the_custom_op(name, monkeypatch):
    # The dispatcher costs tens of microseconds of host time per call: eager calls with
    # nothing to record for autograd skip it, and give the op's results.
    with torch.no_grad():
        expected = _public_calls()[name]()

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called")

    for op in ("elastic_linear", "elastic_mlp_fwd", "elastic_attention_fwd", "elastic_attention_decode"):
        monkeypatch.setattr(torch.ops.flextron, op, refuse)
    with torch.no_grad():
        assert torch.equal(_public_calls()[name](), expected)


@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_fake_tensors_go_through_the_custom_ops(name):
    # Under a dispatch mode (here fake tensors, as tracing uses) the ops' registrations are
    # needed: the implementation is not called directly.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad():
        expected = _public_calls()[name]()
    with FakeTensorMode(), torch.no_grad(), fk.skip_width_value_checks():
        fake = _public_calls()[name]()
    assert type(fake).__name__ == "FakeTensor" and fake.shape == expected.shape and fake.dtype == expected.dtype


def test_calls_that_record_autograd_go_through_the_custom_op(monkeypatch):
    # With plain tensors that require grad, the op's registered autograd formula is used.
    calls = []
    original = torch.ops.flextron.elastic_linear

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(torch.ops.flextron, "elastic_linear", spy)
    x = torch.randn(3, 8, requires_grad=True)
    fk.elastic_linear(x, torch.randn(6, 8), out_features=torch.tensor([1, 6, 3])).sum().backward()
    assert len(calls) == 1 and x.grad is not None


@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_meta_tensors_go_through_the_custom_ops(name):
    # Shape inference on the meta device (deferred initialisation): the ops' fake results.
    with torch.no_grad():
        expected = _public_calls()[name]()
    with torch.device("meta"), torch.no_grad(), fk.skip_width_value_checks():
        meta = _public_calls()[name]()
    assert meta.is_meta and meta.shape == expected.shape and meta.dtype == expected.dtype


def test_profiled_calls_go_through_the_custom_ops():
    # Profiles name the ops.
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fk.elastic_linear(x, w, out_features=torch.tensor([1, 6, 3]))
    assert any("flextron::elastic_linear" in event.key for event in prof.key_averages())


def test_in_place_gradient_kernels_bump_version_counters(device):
    layer = fk.ElasticLinear(8, 6).to(device)
    layer(torch.randn(5, 8, device=device), out_features=torch.tensor([1, 6, 3, 0, 2], device=device)).sum().backward()
    before = layer.weight.grad._version
    with fk.use_backend("triton"):
        layer(torch.randn(5, 8, device=device), out_features=torch.tensor([1, 6, 3, 0, 2], device=device)).sum().backward()
    assert layer.weight.grad._version > before


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_autocast_runs_the_ops_in_its_dtype(name, backend, dtype):
    # As autocast runs F.linear and scaled_dot_product_attention: floating inputs cast to
    # its dtype, output in it, on either backend (the interpreter's bf16 is wrong: fp16 there).
    if name == "elastic_mlp_decode" and backend == "triton":
        backend = "auto"  # the decode op's own choice among its backends
    with torch.no_grad():
        full = _public_calls()[name]()
        with fk.use_backend(backend), torch.autocast("cpu", dtype=dtype):
            low = _public_calls()[name]()
    assert low.dtype == dtype
    assert (low.float() - full).norm() <= 2e-2 * full.norm() + 1e-6


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_training_gives_full_precision_gradients(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, generator=gen)
    widths = torch.randint(0, 25, (20,), generator=gen)
    torch.manual_seed(0)
    linear, mlp = fk.ElasticLinear(16, 24), fk.ElasticMLP(24, 32)
    with fk.use_backend(backend):
        with torch.autocast("cpu", dtype=dtype):
            loss = mlp(linear(x, out_features=widths), width=widths).float().square().mean()
        loss.backward()
        grads = [p.grad for p in (*linear.parameters(), *mlp.parameters())]
        for p in (*linear.parameters(), *mlp.parameters()):
            p.grad = None
        mlp(linear(x, out_features=widths), width=widths).square().mean().backward()
    for grad, p in zip(grads, (*linear.parameters(), *mlp.parameters())):
        assert grad is not None and grad.dtype == torch.float32
        assert (grad - p.grad).norm() <= 5e-2 * p.grad.norm() + 1e-6
