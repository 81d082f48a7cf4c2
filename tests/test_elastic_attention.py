"""elastic_attention (prefill) against the fp64 reference: sequences, heads, GQA, causal, gradients."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")


def rel_err(out, ref):
    assert out.shape == ref.shape
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten) elements"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_inputs(lengths, q_heads, kv_heads, heads_kind, dtype, device, seed=0, head_dim=16):
    """q, k, v, the output gradient, heads and cu_seqlens (heads and cu_seqlens on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    group = q_heads // kv_heads
    if heads_kind == "full":
        heads = q_heads
    elif heads_kind == "static":
        heads = max(q_heads - group, 0)
    elif heads_kind == "per_token":
        heads = torch.randint(0, q_heads // group + 1, (num_tokens,), generator=gen) * group
    else:  # per_sequence: every token of a sequence has its sequence's count
        per_seq = torch.randint(0, q_heads // group + 1, (len(lengths),), generator=gen) * group
        heads = per_seq.repeat_interleave(torch.tensor(lengths))
    q, k, v = (
        torch.randn(num_tokens, h, head_dim, generator=gen).to(device, dtype) for h in (q_heads, kv_heads, kv_heads)
    )
    grad = torch.randn(num_tokens, q_heads, head_dim, generator=gen).to(device, dtype)
    return (q, k, v), grad, heads, cu


def forward_backward(fn, tensors, grad, heads, cu, causal, device, **kwargs):
    """``[out, dq, dk, dv]`` of ``fn`` on copies of ``tensors`` moved to ``device``."""
    leaves = [t.detach().to(device).requires_grad_() for t in tensors]
    heads = heads.to(device) if isinstance(heads, torch.Tensor) else heads
    out = fn(*leaves, heads=heads, cu_seqlens=cu.to(device), causal=causal, **kwargs)
    out.backward(grad.to(device, out.dtype))
    return [out] + [t.grad for t in leaves]


def assert_within_twice_torch(ours, tensors, grad, heads, cu, device, **kwargs):
    """``ours`` (``[out, dq, dk, dv]`` of a causal bf16 run) within twice PyTorch's own bf16
    error (the reference evaluated in bf16 on the same inputs) of the fp64 reference."""
    torch_bf16 = forward_backward(reference.elastic_attention, tensors, grad, heads, cu, True, device, **kwargs)
    exact = forward_backward(reference.elastic_attention, [t.double() for t in tensors], grad, heads, cu, True, device,
                             **kwargs)
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, torch_bf16, exact):
        ours_err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        assert torch.isfinite(o).all(), name
        assert ours_err <= 2 * torch_err + 1e-6, (name, ours_err, torch_err)


def run(backend, lengths, q_heads, kv_heads, heads_kind, causal, dtype, device, seed=0, head_dim=16, **kwargs):
    """Ours under ``backend`` and the fp64 reference on the CPU, same inputs (``kwargs``:
    the ops' options, such as ``window``)."""
    tensors, grad, heads, cu = make_inputs(lengths, q_heads, kv_heads, heads_kind, dtype, device, seed, head_dim)
    with fk.use_backend(backend):
        ours = forward_backward(fk.elastic_attention, tensors, grad, heads, cu, causal, device, **kwargs)
    exact = forward_backward(reference.elastic_attention, [t.double() for t in tensors], grad, heads, cu, causal, "cpu",
                             **kwargs)
    return ours, exact


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("heads_kind", ["full", "static", "per_token", "per_sequence"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_fp32(backend, q_heads, kv_heads, heads_kind, causal, device):
    lengths = [1, 19, 0, 33, 2]  # a length-1 and an empty sequence among them
    got, want = run(backend, lengths, q_heads, kv_heads, heads_kind, causal, torch.float32, device)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        if r.abs().max() == 0:
            assert (o == 0).all(), name
        else:
            assert rel_err(o, r) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 5, 16, 23, 40])
def test_sliding_window_matches_reference(backend, window, device):
    """Windows shorter than a tile, a tile's width, longer, and longer than most sequences:
    the forward's and the dq kernel's cut key blocks, the dk/dv kernel's cut query blocks."""
    got, want = run(backend, [1, 19, 0, 70, 2], 4, 2, "per_token", True, torch.float32, device, seed=6,
                    window=window)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(o, r) < 1e-5, (name, window)
    if window < 19:  # the window changes the result: a test of it can fail
        plain, _ = run(backend, [1, 19, 0, 70, 2], 4, 2, "per_token", True, torch.float32, device, seed=6)
        assert rel_err(plain[0], want[0]) > 1e-3


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("overlap,kv_tma", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dkdv_tiles", [(16, 32), (32, 16)])
def test_sliding_window_with_other_tiles(overlap, kv_tma, dkdv_tiles, device, monkeypatch):
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_attention")
    default = module.attention_config

    def config(t, kernel, **kwargs):
        tiles = default(t, kernel, **kwargs)
        if kernel == "fwd":
            return dict(tiles, OVERLAP=overlap, KV_TMA=kv_tma, BLOCK_M=32, BLOCK_N=16)
        if kernel == "bwd_dkdv":
            return dict(tiles, BLOCK_M=dkdv_tiles[0], BLOCK_N=dkdv_tiles[1])
        return dict(tiles, KV_TMA=kv_tma, BLOCK_M=32, BLOCK_N=16)

    monkeypatch.setattr(module, "attention_config", config)
    for window in (7, 33):
        got, want = run("triton", [70, 3, 45], 4, 2, "per_sequence", True, torch.float32, device, seed=7, window=window)
        for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert rel_err(o, r) < 1e-5, (name, window)


def test_sliding_window_arguments():
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    for window, message in ((0, "window: expected None or an int >= 1 .*got 0"),
                            (2.0, "window: expected None or an int >= 1 .*got 2.0"),
                            (True, "window: expected None or an int >= 1 .*got True")):
        with pytest.raises(ValueError, match=message):
            fk.elastic_attention(q, k, k, heads=4, window=window)
    with pytest.raises(ValueError, match="window: a sliding window is causal .*got causal=False with window=3"):
        fk.elastic_attention(q, k, k, heads=4, window=3, causal=False)


@pytest.mark.parametrize("cpu_flash", [True, False])
@pytest.mark.parametrize("lengths", [[7, 7, 7], [1, 19, 0, 33, 2]])
@pytest.mark.parametrize("heads_kind", ["static", "per_token"])
@pytest.mark.parametrize("window", [None, 3])
def test_torch_backend_both_ways_to_attend(cpu_flash, lengths, heads_kind, window, monkeypatch):
    """The torch backend's two ways to attend: PyTorch's CPU flash attention (on a CPU) and
    einsums (elsewhere, or a torch without it); sequences of one length run in one call."""
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_attention")
    calls = []
    if cpu_flash:
        # Every torch the package supports (>= 2.4) has it: its absence would be a silent fallback.
        assert module._CPU_FLASH is not None and module._CPU_FLASH_BACKWARD is not None
        for name in ("_CPU_FLASH", "_CPU_FLASH_BACKWARD"):
            op = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _op=op, **kw: calls.append(a[1].shape[0]) or _op(*a, **kw))
    else:
        monkeypatch.setattr(module, "_CPU_FLASH", None)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-6), (torch.float16, 1e-3)):
        calls.clear()
        got, want = run("torch", lengths, 4, 2, heads_kind, True, dtype, "cpu", seed=4, window=window)
        for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert rel_err(o, r) < tolerance, (name, dtype)
        nonempty = [n for n in lengths if n]
        runs = [len(lengths)] if len(set(lengths)) == 1 else [1] * len(nonempty)
        assert calls == (2 * runs if cpu_flash else []), calls  # forward and backward, each run once
    # q, k, v and the output gradient with a strided last dimension (the flash op reads it
    # as contiguous: each run is made so).
    tensors, grad, heads, cu = make_inputs(lengths, 4, 2, heads_kind, torch.float32, "cpu", seed=5)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors + (grad,)]
    assert all(t.stride(-1) != 1 for t in strided)
    with fk.use_backend("torch"):
        got = forward_backward(fk.elastic_attention, strided[:3], strided[3], heads, cu, True, "cpu", window=window)
    want = forward_backward(reference.elastic_attention, [t.double() for t in tensors], grad, heads, cu, True, "cpu",
                            window=window)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(o, r) < 1e-5, (name, "strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dims_that_are_not_a_power_of_two(backend, head_dim, device):
    got, want = run(backend, [7, 12], 4, 2, "per_token", True, torch.float32, device, seed=2, head_dim=head_dim)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(o, r) < 1e-5, name


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_with_and_without_overlapped_softmax(overlap, causal, device, monkeypatch):
    # Sequences of several key blocks: the overlapped loop's body, its peeled last block,
    # and a phase of one block (the length 19 sequence's second tile).
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_attention")
    default = module.attention_config

    def config(t, kernel, **kwargs):
        tiles = default(t, kernel, **kwargs)
        return dict(tiles, OVERLAP=overlap) if kernel == "fwd" else tiles

    monkeypatch.setattr(module, "attention_config", config)
    got, want = run("triton", [1, 19, 0, 70, 2], 4, 2, "per_token", causal, torch.float32, device, seed=4)
    assert rel_err(got[0], want[0]) < 1e-5


# The scores of the infinite keys are nan before they are masked out.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_keys_and_values_through_tma_descriptors(overlap, causal, block_m, device, monkeypatch):
    """KV_TMA, forward and dq kernel: key and value blocks through descriptors, which read
    past a sequence's end into the next sequence's tokens. Those must get no weight, even
    when they hold inf (here the last sequence's keys and values): the other sequences'
    outputs and gradients stay exact. Query tiles of 32 have two masked key blocks on the
    causal diagonal."""
    from flextron_kernels.ops.tiles import override_tiles
    from flextron_kernels.triton import attention

    made = []
    descriptor = attention._heads_descriptor
    monkeypatch.setattr(attention, "_heads_descriptor", lambda *args: made.append(args[0].shape) or descriptor(*args))
    lengths = [1, 19, 0, 70, 2]
    tensors, grad, heads, cu = make_inputs(lengths, 4, 2, "per_token", torch.float32, device, seed=6)
    exact = forward_backward(reference.elastic_attention, [t.double() for t in tensors], grad, heads, cu, causal,
                             "cpu")
    q, k, v = (t.clone() for t in tensors)
    k[-2:], v[-2:] = float("inf"), float("inf")
    tiles = dict(BLOCK_M=block_m, BLOCK_N=16, KV_TMA=True)
    with override_tiles(attention_fwd=dict(tiles, OVERLAP=overlap), attention_bwd_dq=tiles), fk.use_backend("triton"):
        ours = forward_backward(fk.elastic_attention, (q, k, v), grad, heads, cu, causal, device)
    assert made == [k.shape, v.shape] * 2  # the forward's, then the dq kernel's
    for name, o, r in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert rel_err(o[:-2], r[:-2]) < 1e-5, name


def test_keys_and_values_take_tma_only_in_whole_heads():
    from flextron_kernels.triton.attention import _heads_descriptor

    assert _heads_descriptor(torch.randn(5, 2, 16), 16) is not None
    assert _heads_descriptor(torch.randn(5, 2, 24), 16) is None  # a head padded to 32 would reach the next one's
    assert _heads_descriptor(torch.randn(5, 4, 16)[:, :2], 16) is not None  # a slice of the heads: rows of 64
    assert _heads_descriptor(torch.randn(5, 16, 2).transpose(1, 2), 16) is None  # heads not contiguous


@pytest.mark.parametrize("dkdv_tiles", [(32, 16), (16, 16), (16, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_dkdv_kernel_takes_any_tiles(dkdv_tiles, causal, device, monkeypatch):
    # The dk/dv kernel's key tile and query step are free: fewer queries than keys per
    # step (causal masking over several steps), as many, or more.
    import importlib

    module = importlib.import_module("flextron_kernels.ops.elastic_attention")
    default = module.attention_config
    block_m, block_n = dkdv_tiles

    def config(t, kernel, **kwargs):
        tiles = default(t, kernel, **kwargs)
        return dict(tiles, BLOCK_M=block_m, BLOCK_N=block_n) if kernel == "bwd_dkdv" else tiles

    monkeypatch.setattr(module, "attention_config", config)
    got, want = run("triton", [1, 19, 0, 70, 2], 4, 2, "per_token", causal, torch.float32, device, seed=3)
    for name, o, r in zip(("dk", "dv"), got[2:], want[2:]):
        assert rel_err(o, r) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_sequences_than_one_step_of_the_tile_search(backend, device):
    # The kernels find their tile by reading cu_seqlens 64 sequences at a time: 150
    # sequences of 0 to 3 tokens (empty ones among them) take three steps.
    lengths = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    assert 0 in lengths
    got, want = run(backend, lengths, 2, 1, "per_token", True, torch.float32, device, seed=5, head_dim=16)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(o, r) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp16(backend, device):
    got, want = run(backend, [37, 5], 4, 1, "per_token", True, torch.float16, device, seed=1, head_dim=32)
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(o, r) < 2e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_heads_are_exact_zeros_and_one_sequence_default(backend, device):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(9, 4, 16, generator=gen).to(device)
    k = torch.randn(9, 2, 16, generator=gen).to(device)
    heads = torch.tensor([0, 2, 4, 4, 2, 0, 4, 2, 2]).to(device)
    with fk.use_backend(backend):
        out = fk.elastic_attention(q, k, k, heads=heads)
    assert (out[0] == 0).all() and (out[1, 2:] == 0).all() and (out[5] == 0).all()
    ref = reference.elastic_attention(q.double().cpu(), k.double().cpu(), k.double().cpu(), heads=heads.cpu())
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    q = torch.randn(0, 2, 16, device=device, requires_grad=True)
    k = torch.randn(0, 2, 16, device=device, requires_grad=True)
    with fk.use_backend(backend):
        out = fk.elastic_attention(q, k, k, heads=2, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32, device=device))
        out.sum().backward()
    assert out.shape == (0, 2, 16) and q.grad.shape == (0, 2, 16)


def test_softmax_scale_and_noncontiguous(device):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(12, 4, 2, 16, generator=gen).to(device)
    q = base[:, :, 0]  # non-contiguous
    kv = torch.randn(12, 16, 2, generator=gen).to(device).transpose(1, 2)  # last dim strided
    for backend, scale in zip(BACKENDS, (0.3, torch.tensor(0.3))):  # any real number: a 0-d tensor too
        with fk.use_backend(backend):
            out = fk.elastic_attention(q, kv, kv, heads=4, softmax_scale=scale)
        ref = reference.elastic_attention(q.double().cpu(), kv.double().cpu(), kv.double().cpu(), heads=4, softmax_scale=0.3)
        assert rel_err(out, ref) < 1e-5


def _bad_cases():
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    base = dict(q=q, k=k, v=k, heads=4, cu_seqlens=cu)
    return [
        (dict(base, heads=3), ValueError, "heads: expected a multiple of the GQA group 2"),
        (dict(base, heads=torch.tensor([2, 4, 1, 0, 2, 2])), ValueError, "heads: expected multiples of the GQA group 2 \\(Hq=4, Hkv=2\\), got \\[1\\]"),
        (dict(base, heads=6), ValueError, "heads: expected an int in \\[0, 4\\], got 6"),
        (dict(base, heads=torch.tensor([2, 4, 6, 0, 2, 2])), ValueError, "heads: expected every width in \\[0, 4\\]"),
        (dict(base, heads=torch.full((6,), 2.0)), TypeError, "heads: expected an integer tensor"),
        (dict(base, heads=torch.full((5,), 2)), ValueError, "heads: expected shape \\(6,\\)"),
        (dict(base, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), ValueError, "cu_seqlens: expected non-decreasing offsets from 0 to T=6, got \\[0, 4, 2, 6\\]"),
        (dict(base, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens: expected non-decreasing offsets from 0 to T=6"),
        (dict(base, cu_seqlens=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "cu_seqlens: expected non-decreasing offsets from 0"),
        (dict(base, cu_seqlens=cu.float()), TypeError, "cu_seqlens: expected dtype in"),
        (dict(base, cu_seqlens=cu.to("meta")), ValueError, "cu_seqlens: expected a tensor on cpu"),
        (dict(base, k=torch.randn(6, 3, 16), v=torch.randn(6, 3, 16)), ValueError, "k: expected a number of KV heads dividing Hq=4, got 3"),
        (dict(base, k=k.half(), v=k.half()), TypeError, "k: expected dtype torch.float32 \\(the dtype of q\\)"),
        (dict(base, v=torch.randn(6, 2, 8)), ValueError, "v: expected shape \\(6, 2, 16\\)"),
        (dict(base, k=torch.randn(5, 2, 16)), ValueError, "k: expected shape \\(6, Hkv, 16\\)"),
        (dict(base, q=torch.randn(6, 4, 300), k=torch.randn(6, 2, 300), v=torch.randn(6, 2, 300)), ValueError, "q: expected a head dimension in \\[1, 256\\], got 300"),
        (dict(base, k=k.to("meta")), ValueError, "k: expected a tensor on cpu"),
        (dict(base, softmax_scale=-0.5), ValueError, "softmax_scale: expected a finite float > 0, got -0.5"),
        (dict(base, softmax_scale=float("nan")), ValueError, "softmax_scale: expected a finite float > 0, got nan"),
        (dict(base, softmax_scale="0.1"), TypeError, "softmax_scale: expected a float or None, got str"),
        (dict(base, softmax_scale=10**400), ValueError, "softmax_scale: expected a finite float > 0"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = _bad_cases()[case]
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(error, match=message):
        fk.elastic_attention(q, k, v, **kwargs)


def test_the_custom_op_checks_the_softmax_scale_too():
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="softmax_scale: expected a finite float > 0, got -1.0"):
        torch.ops.flextron.elastic_attention_fwd(q, k, k, cu, None, 4, True, 0, -1.0)
    with pytest.raises(ValueError, match="window: expected None or an int >= 1 .*got -2"):
        torch.ops.flextron.elastic_attention_fwd(q, k, k, cu, None, 4, True, -2, 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(21, 4, 16, generator=gen).to(device)
    k = torch.randn(21, 2, 16, generator=gen).to(device)
    v = torch.randn(21, 2, 16, generator=gen).to(device)
    cu = torch.tensor([0, 5, 21], dtype=torch.int32, device=device)
    heads = (torch.randint(0, 3, (21,), generator=gen) * 2).to(device)
    ops = torch.ops.flextron
    with fk.use_backend(backend):
        for h, static, window in ((heads, 4, 0), (None, 2, 0), (heads, 4, 3)):
            torch.library.opcheck(ops.elastic_attention_fwd, (q, k, v, cu, h, static, True, window, 0.25))
            out, lse = ops.elastic_attention_fwd(q, k, v, cu, h, static, True, window, 0.25)
            torch.library.opcheck(ops.elastic_attention_bwd,
                                  (torch.randn_like(out), q, k, v, out, lse, cu, h, static, True, window, 0.25))


def test_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(14, 4, 16, generator=gen).to(device).requires_grad_()
    k = torch.randn(14, 2, 16, generator=gen).to(device).requires_grad_()
    cu = torch.tensor([0, 6, 14], dtype=torch.int32, device=device)
    heads = torch.tensor([2, 4] * 7, device=device)
    fn = lambda q, k: fk.elastic_attention(q, k, k, heads=heads, cu_seqlens=cu)  # noqa: E731
    eager = fn(q, k)
    eager.square().sum().backward()
    grads = (q.grad.clone(), k.grad.clone())
    q.grad = k.grad = None
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close((q.grad, k.grad), grads)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,heads_kind,kv_tma", [(8, "per_token", False), (32, "per_token", False),
                                                        (8, "static", False), (32, "static", False),
                                                        (8, "per_token", True)])
def test_bf16_error_within_twice_torch(kv_heads, heads_kind, kv_tma, monkeypatch):
    # kv_tma: the forward and dq kernels read keys and values through TMA descriptors.
    from flextron_kernels.ops.tiles import override_tiles
    from flextron_kernels.triton import attention

    made = []
    descriptor = attention._heads_descriptor
    monkeypatch.setattr(attention, "_heads_descriptor", lambda *args: made.append(descriptor(*args)) or made[-1])
    device = torch.device("cuda")
    lengths = [1, 700, 1023, 300]
    tensors, grad, heads, cu = make_inputs(lengths, 32, kv_heads, heads_kind, torch.bfloat16, device, seed=6, head_dim=128)
    with override_tiles(attention_fwd=dict(KV_TMA=kv_tma), attention_bwd_dq=dict(KV_TMA=kv_tma)):
        ours = forward_backward(fk.elastic_attention, tensors, grad, heads, cu, True, device)
    assert len(made) == (4 if kv_tma else 0) and all(d is not None for d in made)
    assert_within_twice_torch(ours, tensors, grad, heads, cu, device)


@pytest.mark.gpu
@pytest.mark.parametrize("window,overlap,kv_tma", [(100, True, False), (512, True, False), (100, False, False),
                                                   (512, True, True)])
def test_bf16_sliding_window_within_twice_torch(window, overlap, kv_tma):
    """The window's key blocks (cut, whole, skipped) at the GPU's tiles, forward and backward."""
    from flextron_kernels.ops.tiles import override_tiles

    device = torch.device("cuda")
    tensors, grad, heads, cu = make_inputs([1, 700, 1023, 300], 32, 8, "per_token", torch.bfloat16, device, seed=8,
                                           head_dim=128)
    with override_tiles(attention_fwd=dict(OVERLAP=overlap, KV_TMA=kv_tma), attention_bwd_dq=dict(KV_TMA=kv_tma)):
        ours = forward_backward(fk.elastic_attention, tensors, grad, heads, cu, True, device, window=window)
    assert_within_twice_torch(ours, tensors, grad, heads, cu, device, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_backward_keys_and_values_through_tma(causal, monkeypatch):
    # The dq kernel (and the forward) through TMA, on hardware: the one-token sequence's key
    # and value are inf, and the other sequences' outputs and gradients stay within 2x
    # torch's bf16 error of fp64.
    from flextron_kernels.ops.tiles import override_tiles
    from flextron_kernels.triton import attention

    made = []
    descriptor = attention._heads_descriptor
    monkeypatch.setattr(attention, "_heads_descriptor", lambda *args: made.append(descriptor(*args)) or made[-1])
    device = torch.device("cuda")
    tensors, grad, heads, cu = make_inputs([700, 1, 300], 32, 8, "per_token", torch.bfloat16, device, seed=9,
                                           head_dim=128)
    torch_bf16 = forward_backward(reference.elastic_attention, tensors, grad, heads, cu, causal, device)
    exact = forward_backward(reference.elastic_attention, [t.double() for t in tensors], grad, heads, cu, causal,
                             device)
    q, k, v = (t.clone() for t in tensors)
    k[700], v[700] = float("inf"), float("inf")
    with override_tiles(attention_fwd=dict(KV_TMA=True), attention_bwd_dq=dict(KV_TMA=True)):
        ours = forward_backward(fk.elastic_attention, (q, k, v), grad, heads, cu, causal, device)
    assert len(made) == 4 and all(d is not None for d in made)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    others[700] = False
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, torch_bf16, exact):
        o, t, e = o[others], t[others], e[others]
        assert torch.isfinite(o).all(), name
        assert (o.double() - e).abs().max() <= 2 * (t.double() - e).abs().max() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("overlap,kv_tma,head_dim", [(True, False, 128), (False, False, 128), (True, True, 128),
                                                     (False, True, 128), (True, True, 64)])
def test_bf16_forward_both_loop_schedules(overlap, kv_tma, head_dim, causal, monkeypatch):
    # The forward's overlapped and sequential key loops, keys and values through pointers
    # or TMA (the tile sweep may pick any of them). The one-token sequence's key and value
    # are inf: the key blocks of the first sequence that read past its end must not weigh them.
    from flextron_kernels.ops.tiles import override_tiles
    from flextron_kernels.triton import attention

    made = []
    descriptor = attention._heads_descriptor
    monkeypatch.setattr(attention, "_heads_descriptor", lambda *args: made.append(descriptor(*args)) or made[-1])
    device = torch.device("cuda")
    tensors, grad, heads, cu = make_inputs([700, 1, 300], 32, 8, "per_token", torch.bfloat16, device, seed=8,
                                           head_dim=head_dim)
    packing = dict(heads=heads.to(device), cu_seqlens=cu.to(device), causal=causal)
    torch_bf16 = reference.elastic_attention(*tensors, **packing)
    exact = reference.elastic_attention(*[t.double() for t in tensors], **packing)
    q, k, v = tensors
    k, v = k.clone(), v.clone()
    k[700], v[700] = float("inf"), float("inf")
    with override_tiles(attention_fwd=dict(OVERLAP=overlap, KV_TMA=kv_tma)):
        out = fk.elastic_attention(q, k, v, **packing)
    assert len(made) == (2 if kv_tma else 0) and all(d is not None for d in made)
    others = torch.ones(out.shape[0], dtype=torch.bool, device=device)
    others[700] = False
    out, torch_bf16, exact = out[others], torch_bf16[others], exact[others]
    assert torch.isfinite(out).all()
    assert (out.double() - exact).abs().max() <= 2 * (torch_bf16.double() - exact).abs().max() + 1e-6


def test_one_sequence_default_is_built_on_the_device(device):
    from flextron_kernels.ops.elastic_attention import one_sequence

    cu = one_sequence(37, device)
    assert cu.dtype == torch.int32 and cu.device.type == device.type and cu.tolist() == [0, 37]


@pytest.mark.gpu
def test_cuda_graph_capture_without_cu_seqlens():
    """The default single sequence is made on the device: the call can be captured."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(300, 8, 64, generator=gen).cuda().bfloat16()
    kv = torch.randn(300, 2, 64, generator=gen).cuda().bfloat16()
    heads = torch.tensor([4, 8], device="cuda")[torch.arange(300, device="cuda") % 2]
    eager = fk.elastic_attention(q, kv, kv, heads=heads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fk.elastic_attention(q, kv, kv, heads=heads)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fk.elastic_attention(q, kv, kv, heads=heads)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def test_argument_values_are_checked_with_one_copy_to_the_host(host_copies, device):
    # cu_seqlens, the head counts' range and their GQA multiples: one wait for the device per
    # call, not three.
    # (The Triton path: the torch backend walks the sequences on the host.)
    tensors, _, heads, cu = make_inputs([5, 9], 4, 2, "per_token", torch.float32, device, seed=2)
    with torch.no_grad(), fk.use_backend("triton"):
        fk.elastic_attention(*tensors, heads=heads.to(device), cu_seqlens=cu.to(device))
    assert host_copies == [("tolist", "checks.py")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_as_long_as_the_sequences_or_longer_hides_nothing(backend, device):
    """Windows up to and past 32-bit positions (the kernels' arithmetic) run as no window."""
    tensors, _, heads, cu = make_inputs([5, 40], 4, 2, "per_token", torch.float32, device, seed=9)
    q, k, v = tensors
    heads, cu = heads.to(device), cu.to(device)
    grad = torch.randn_like(q)
    with fk.use_backend(backend):
        plain = forward_backward(fk.elastic_attention, tensors, grad, heads, cu, True, device)
        for window in (40, 45, 2**31 - 1, 2**31 + 5, 2**32 + 5, 10**12):
            got = forward_backward(fk.elastic_attention, tensors, grad, heads, cu, True, device, window=window)
            assert all(torch.equal(a, b) for a, b in zip(got, plain)), window
        assert not torch.equal(fk.elastic_attention(q, k, v, heads=heads, cu_seqlens=cu, window=39), plain[0])
