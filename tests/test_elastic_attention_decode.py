"""elastic_attention_decode against the reference: GQA and MHA, per-request and static head
counts, cache lengths from 0 to S_max, several KV splits, strided caches, both backends."""

import importlib

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference

decode_module = importlib.import_module("flextron_kernels.ops.elastic_attention_decode")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLEXTRON_POISON_OUTPUTS", "1")


def make(batch, q_heads, kv_heads, kv_len, head_dim, *, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    return q, k, v


def exact(q, k, v, cache_seqlens, heads, softmax_scale=None, window=None):
    """The reference in fp64 on the CPU, on the same (rounded) inputs."""
    heads = heads.cpu() if isinstance(heads, torch.Tensor) else heads
    return reference.elastic_attention_decode(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), cache_seqlens=cache_seqlens.cpu(), heads=heads,
        softmax_scale=softmax_scale, window=window,
    )


def unused(cache_seqlens, heads, q_heads):
    """``[B, Hq]`` bool: the heads whose output must be exactly zero."""
    batch = cache_seqlens.shape[0]
    counts = heads.cpu() if isinstance(heads, torch.Tensor) else torch.full((batch,), heads)
    return (torch.arange(q_heads) >= counts[:, None]) | (cache_seqlens.cpu() == 0)[:, None]


def check(out, ref, cache_seqlens, heads, tol):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten) elements"
    assert (out[unused(cache_seqlens, heads, out.shape[1])] == 0).all(), "unused heads are not exactly zero"
    denom = ref.norm().item()
    err = (out - ref).norm().item() / (denom if denom > 0 else 1.0)
    assert err < tol, err


def run(backend, q, k, v, cache_seqlens, heads, **kw):
    with fk.use_backend(backend):
        return fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads, **kw)


# Cache lengths 0, 1, S_max and odd ones; head counts 0 and Hq among them.
SEQLENS = [0, 1, 100, 37, 63]
LAYOUTS = {"gqa": (8, 2, [8, 0, 4, 8, 4]), "mha": (4, 4, [4, 1, 0, 3, 4])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_per_request_heads(backend, dtype, layout, device):
    q_heads, kv_heads, head_counts = LAYOUTS[layout]
    q, k, v = make(5, q_heads, kv_heads, 100, 16, dtype=dtype, device=device, seed=1)
    cache_seqlens = torch.tensor(SEQLENS, device=device, dtype=torch.int32)
    heads = torch.tensor(head_counts, device=device)
    out = run(backend, q, k, v, cache_seqlens, heads)
    assert out.dtype == dtype
    check(out, exact(q, k, v, cache_seqlens, heads), cache_seqlens, heads, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [0, 4, 8])
def test_matches_reference_int_heads(backend, heads, device):
    q, k, v = make(3, 8, 2, 45, 16, dtype=torch.float32, device=device, seed=2)
    cache_seqlens = torch.tensor([45, 0, 19], device=device)
    out = run(backend, q, k, v, cache_seqlens, heads)
    check(out, exact(q, k, v, cache_seqlens, heads), cache_seqlens, heads, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 7, 40, 200])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_sliding_window_matches_reference(backend, window, num_splits, device, monkeypatch):
    if num_splits is not None:  # short splits: some wholly before the window, some cut by it
        config = decode_module.decode_config
        monkeypatch.setattr(decode_module, "decode_config", lambda q, k_cache, active, window=0: dict(
            config(q, k_cache, active, window), BLOCK_N=16, num_splits=num_splits))
    q_heads, kv_heads, head_counts = LAYOUTS["gqa"]
    q, k, v = make(5, q_heads, kv_heads, 100, 16, dtype=torch.float32, device=device, seed=11)
    cache_seqlens = torch.tensor(SEQLENS, device=device, dtype=torch.int32)
    heads = torch.tensor(head_counts, device=device)
    out = run(backend, q, k, v, cache_seqlens, heads, window=window)
    want = exact(q, k, v, cache_seqlens, heads, window=window)
    check(out, want, cache_seqlens, heads, 1e-5)
    if window < 63:  # the window changes the result: a test of it can fail
        assert (exact(q, k, v, cache_seqlens, heads) - want).norm() > 1e-3 * want.norm()


def test_sliding_window_argument():
    q, k, v = make(2, 4, 2, 8, 16, dtype=torch.float32, device="cpu", seed=12)
    lens = torch.tensor([8, 3])
    with pytest.raises(ValueError, match="window: expected None or an int >= 1 .*got 0"):
        fk.elastic_attention_decode(q, k, v, cache_seqlens=lens, heads=4, window=0)


@pytest.mark.parametrize("num_splits,kv_len", [(1, 99), (3, 99), (64, 99), (200, 1121)])
def test_many_splits_are_combined(num_splits, kv_len, device, monkeypatch):
    # On a GPU the default would take one split at this size: force short blocks and many
    # splits (71 at 1121 positions: the combine reads them in two chunks).
    config = decode_module.decode_config

    def forced(q, k_cache, active_kv_heads, window=0):
        return dict(config(q, k_cache, active_kv_heads, window), BLOCK_N=16, num_splits=num_splits)

    monkeypatch.setattr(decode_module, "decode_config", forced)
    q, k, v = make(4, 8, 2, kv_len, 16, dtype=torch.float32, device=device, seed=3)
    cache_seqlens = torch.tensor([kv_len, 17, 50, 33], device=device)
    heads = torch.tensor([8, 4, 8, 4], device=device)
    out = run("triton", q, k, v, cache_seqlens, heads)
    check(out, exact(q, k, v, cache_seqlens, heads), cache_seqlens, heads, 1e-5)


def _strided(kind, device):
    gen = torch.Generator().manual_seed(4)
    batch, kv_heads, kv_len, head_dim = 3, 2, 40, 16
    q = torch.randn(batch, 8, head_dim, generator=gen).to(device)
    if kind == "slice_of_longer_cache":
        big = torch.randn(2, batch, kv_heads, 57, head_dim, generator=gen).to(device)
        return q, big[0, :, :, :kv_len], big[1, :, :, 5 : 5 + kv_len]
    if kind == "sequence_major":  # stored [S, B, Hkv, Dh]
        k = torch.randn(kv_len, batch, kv_heads, head_dim, generator=gen).to(device).permute(1, 2, 0, 3)
        v = torch.randn(kv_len, batch, kv_heads, head_dim, generator=gen).to(device).permute(1, 2, 0, 3)
        return q, k, v
    # "transposed_q_and_dim": q and the caches with a non-unit stride along Dh
    q = torch.randn(batch, head_dim, 8, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(batch, kv_heads, head_dim, kv_len, generator=gen).to(device).transpose(2, 3)
    v = torch.randn(batch, head_dim, kv_heads, kv_len, generator=gen).to(device).permute(0, 2, 3, 1)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["slice_of_longer_cache", "sequence_major", "transposed_q_and_dim"])
def test_strided_inputs(backend, kind, device):
    q, k, v = _strided(kind, device)
    assert not (k.is_contiguous() and v.is_contiguous())
    cache_seqlens = torch.tensor([40, 13, 1], device=device)
    heads = torch.tensor([8, 4, 0], device=device)
    out = run(backend, q, k, v, cache_seqlens, heads)
    assert out.is_contiguous()
    check(out, exact(q, k, v, cache_seqlens, heads), cache_seqlens, heads, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_not_a_power_of_two_and_custom_scale(backend, device):
    q, k, v = make(2, 4, 2, 30, 24, dtype=torch.float32, device=device, seed=5)
    cache_seqlens = torch.tensor([30, 11], device=device)
    heads = torch.tensor([4, 2], device=device)
    out = run(backend, q, k, v, cache_seqlens, heads, softmax_scale=0.3)
    check(out, exact(q, k, v, cache_seqlens, heads, softmax_scale=0.3), cache_seqlens, heads, 1e-5)


def test_triton_reads_nothing_outside_the_active_heads_and_cache(device):
    q, k, v = make(3, 8, 4, 50, 16, dtype=torch.float32, device=device, seed=6)
    cache_seqlens = torch.tensor([50, 21, 0], device=device)
    heads = torch.tensor([4, 6, 8], device=device)
    want = exact(q, k, v, cache_seqlens, heads)
    for b, (length, count) in enumerate(zip(cache_seqlens.tolist(), heads.tolist())):
        for t in (k, v):
            t[b, count // 2 :] = float("nan")  # KV heads the request does not use
            t[b, :, length:] = float("nan")  # positions past its cache
        q[b, count:] = float("nan")
    out = run("triton", q, k, v, cache_seqlens, heads)
    check(out, want, cache_seqlens, heads, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 9])
def test_positions_a_request_does_not_see_may_hold_anything(backend, window, device):
    """Caches allocated longer than any request has filled (as generation allocates them),
    NaN and inf at every position a request does not see; one request's lengths, then
    several."""
    for lengths in ([40, 40], [40, 13, 1, 0]):
        q, k, v = make(len(lengths), 8, 2, 60, 16, dtype=torch.float32, device=device, seed=8)
        cache_seqlens = torch.tensor(lengths, device=device)
        heads = torch.tensor([8, 4, 0, 8][: len(lengths)], device=device)
        want = exact(q, k, v, cache_seqlens, heads, window=window)
        for b, n in enumerate(lengths):
            k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
            if window:
                k[b, :, : max(n - window, 0)], v[b, :, : max(n - window, 0)] = float("inf"), float("nan")
        check(run(backend, q, k, v, cache_seqlens, heads, window=window), want, cache_seqlens, heads, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty_batch", "empty_caches"])
def test_empty(backend, case, device):
    batch, kv_len = (0, 10) if case == "empty_batch" else (2, 0)
    q, k, v = make(batch, 4, 2, kv_len, 16, dtype=torch.float32, device=device, seed=7)
    cache_seqlens = torch.zeros(batch, dtype=torch.int64, device=device)
    out = run(backend, q, k, v, cache_seqlens, torch.full((batch,), 4, device=device))
    assert out.shape == q.shape and (out == 0).all()


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda(device):
    q = torch.empty(1, 1, 16, device=device)
    with fk.use_backend("auto"):
        assert decode_module._select(q) == ("triton" if device.type == "cuda" else "torch")


def _bad_cases():
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    seqlens = torch.tensor([3, 10])
    base = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, heads=torch.tensor([8, 4]))
    return [
        (dict(base, q=q.long()), TypeError, "q: expected dtype in \\(torch.float32, torch.float16, torch.bfloat16\\), got torch.int64"),
        (dict(base, q=q.double()), TypeError, "q: expected dtype in .*got torch.float64"),
        (dict(base, q=q[0]), ValueError, "q: expected 3 dimensions, got shape \\(8, 16\\)"),
        (dict(base, k_cache=k.half()), TypeError, "k_cache: expected dtype torch.float32 \\(the dtype of q\\), got torch.float16"),
        (dict(base, v_cache=v.half()), TypeError, "v_cache: expected dtype torch.float32 \\(the dtype of q\\), got torch.float16"),
        (dict(base, k_cache=k.to("meta")), ValueError, "k_cache: expected a tensor on cpu \\(the device of the other inputs\\), got meta"),
        (dict(base, v_cache=v.to("meta")), ValueError, "v_cache: expected a tensor on cpu"),
        (dict(base, k_cache=k[0]), ValueError, "k_cache: expected 4 dimensions, got shape \\(2, 10, 16\\)"),
        (dict(base, k_cache=torch.randn(3, 2, 10, 16)), ValueError, "k_cache: expected shape \\[2, Hkv, S_max, 16\\] \\(B and Dh from q\\), got \\(3, 2, 10, 16\\)"),
        (dict(base, k_cache=torch.randn(2, 2, 10, 8)), ValueError, "k_cache: expected shape \\[2, Hkv, S_max, 16\\]"),
        (dict(base, v_cache=torch.randn(2, 2, 11, 16)), ValueError, "v_cache: expected shape \\(2, 2, 10, 16\\), got \\(2, 2, 11, 16\\)"),
        (dict(base, k_cache=torch.randn(2, 3, 10, 16), v_cache=torch.randn(2, 3, 10, 16)), ValueError,
         "q: expected a number of heads \\(q.shape\\[1\\] = 8\\) that is a positive multiple of the number of KV heads \\(k_cache.shape\\[1\\] = 3\\)"),
        (dict(base, q=torch.randn(2, 8, 300), k_cache=torch.randn(2, 2, 10, 300), v_cache=torch.randn(2, 2, 10, 300)),
         ValueError, "q: expected a head dimension \\(q.shape\\[2\\]\\) in \\[1, 256\\], got 300"),
        (dict(base, cache_seqlens=[3, 10]), TypeError, "cache_seqlens: expected a torch.Tensor, got list"),
        (dict(base, cache_seqlens=seqlens.float()), TypeError, "cache_seqlens: expected an integer tensor \\(int32 or int64\\), got dtype torch.float32"),
        (dict(base, cache_seqlens=seqlens[:1]), ValueError, "cache_seqlens: expected shape \\(2,\\), got \\(1,\\)"),
        (dict(base, cache_seqlens=seqlens.to("meta")), ValueError, "cache_seqlens: expected a tensor on cpu"),
        (dict(base, cache_seqlens=torch.tensor([3, 11])), ValueError,
         "cache_seqlens: expected every length in \\[0, 10\\] \\(S_max = k_cache.shape\\[2\\]\\), got values in \\[3, 11\\]"),
        (dict(base, cache_seqlens=torch.tensor([-1, 2])), ValueError, "cache_seqlens: expected every length in \\[0, 10\\]"),
        (dict(base, heads=None), TypeError, "heads: expected an int or an integer tensor of shape \\(2,\\), got None"),
        (dict(base, heads=4.0), TypeError, "heads: expected an int, got float"),
        (dict(base, heads=True), TypeError, "heads: expected an int, got bool"),
        (dict(base, heads=9), ValueError, "heads: expected an int in \\[0, 8\\], got 9"),
        (dict(base, heads=-4), ValueError, "heads: expected an int in \\[0, 8\\], got -4"),
        (dict(base, heads=6), ValueError, "heads: expected a multiple of the GQA group size 4 \\(Hq // Hkv = 8 // 2\\), got 6"),
        (dict(base, heads=torch.tensor([8, 2])), ValueError,
         "heads: expected every head count to be a multiple of the GQA group size 4 \\(Hq // Hkv = 8 // 2\\), got 2 for request 1"),
        (dict(base, heads=torch.tensor([12, 4])), ValueError, "heads: expected every width in \\[0, 8\\], got values in \\[4, 12\\]"),
        (dict(base, heads=torch.tensor([-4, 4])), ValueError, "heads: expected every width in \\[0, 8\\]"),
        (dict(base, heads=torch.tensor([8.0, 4.0])), TypeError, "heads: expected an integer tensor"),
        (dict(base, heads=torch.tensor([8, 4, 4])), ValueError, "heads: expected shape \\(2,\\), got \\(3,\\)"),
        (dict(base, heads=torch.tensor([8, 4], device="meta")), ValueError, "heads: expected a tensor on cpu"),
        (dict(base, softmax_scale="0.1"), TypeError, "softmax_scale: expected a float or None, got str"),
        (dict(base, softmax_scale=float("nan")), ValueError, "softmax_scale: expected a finite float > 0, got nan"),
        (dict(base, softmax_scale=0.0), ValueError, "softmax_scale: expected a finite float > 0, got 0.0"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = _bad_cases()[case]
    q, k, v = kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache")
    with pytest.raises(error, match=message):
        fk.elastic_attention_decode(q, k, v, **kwargs)


def test_value_checks_can_be_skipped():
    q, k, v = make(2, 4, 2, 10, 16, dtype=torch.float32, device="cpu", seed=8)
    with fk.skip_width_value_checks():  # a trusted caller: no host copy, no error
        fk.elastic_attention_decode(q, k, v, cache_seqlens=torch.tensor([3, 10]), heads=torch.tensor([4, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    q, k, v = make(3, 8, 2, 33, 16, dtype=torch.float32, device=device, seed=9)
    cache_seqlens = torch.tensor([33, 0, 9], device=device)
    heads = torch.tensor([8, 4, 0], device=device)
    with fk.use_backend(backend):
        for args in [(heads, 8, 0.25, 0), (None, 4, 0.25, 0), (heads, 8, 0.25, 5)]:
            torch.library.opcheck(torch.ops.flextron.elastic_attention_decode, (q, k, v, cache_seqlens, *args))


def test_torch_compile_fullgraph(device):
    q, k, v = make(3, 8, 2, 33, 16, dtype=torch.float32, device=device, seed=10)
    cache_seqlens = torch.tensor([33, 5, 20], device=device)
    heads = torch.tensor([8, 4, 0], device=device)

    def step(q, k, v, cache_seqlens, heads):
        return fk.elastic_attention_decode(q * 2, k, v, cache_seqlens=cache_seqlens, heads=heads, softmax_scale=0.125)

    eager = step(q, k, v, cache_seqlens, heads)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, cache_seqlens, heads)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# GPU: bf16 at model shapes against fp64, at most 2x PyTorch's own bf16 error; CUDA graphs
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("heads_kind", ["per_request", "int"])
@pytest.mark.parametrize("batch,kv_len", [(1, 4096), (16, 4096), (1, 32768), (16, 32768)])
def test_bf16_error_within_twice_torch(heads_kind, batch, kv_len):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    q_heads, kv_heads, head_dim = 32, 8, 128
    q, k, v = make(batch, q_heads, kv_heads, kv_len, head_dim, dtype=torch.bfloat16, device=device, seed=11)
    cache_seqlens = torch.randint(1, kv_len + 1, (batch,), generator=gen)
    cache_seqlens[0] = kv_len
    cache_seqlens = cache_seqlens.to(device)
    if heads_kind == "int":
        heads = 24
    else:
        heads = (torch.tensor([8, 16, 24, 32])[torch.randint(0, 4, (batch,), generator=gen)]).to(device)
        heads[0] = 32
    ours = fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads)
    # PyTorch's own bf16 error: the reference evaluated in bf16 on the same inputs.
    torch_bf16 = reference.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads)
    want = reference.elastic_attention_decode(q.double(), k.double(), v.double(), cache_seqlens=cache_seqlens, heads=heads)
    assert torch.isfinite(ours).all()
    assert (ours.cpu()[unused(cache_seqlens, heads, q_heads)] == 0).all()
    ours_err = (ours.double() - want).abs().max().item()
    torch_err = (torch_bf16.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [100, 4096])
def test_bf16_sliding_window_within_twice_torch(window):
    device = torch.device("cuda")
    q, k, v = make(4, 32, 8, 8192, 128, dtype=torch.bfloat16, device=device, seed=13)
    cache_seqlens = torch.tensor([8192, 1, 5000, 99], device=device)
    heads = torch.tensor([32, 8, 16, 24], device=device)
    ours = fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads, window=window)
    torch_bf16 = reference.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads, window=window)
    want = reference.elastic_attention_decode(q.double(), k.double(), v.double(), cache_seqlens=cache_seqlens,
                                              heads=heads, window=window)
    assert torch.isfinite(ours).all()
    ours_err = (ours.double() - want).abs().max().item()
    torch_err = (torch_bf16.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [dict(BLOCK_N=128, PROGRAMS_PER_SM=4, num_stages=2),
                                   dict(BLOCK_N=32, PROGRAMS_PER_SM=2, num_stages=4)])
def test_bf16_other_decode_tiles(tiles):
    # The tile sweep's other candidates: longer or shorter blocks, fewer splits.
    from flextron_kernels.ops.tiles import override_tiles

    device = torch.device("cuda")
    q, k, v = make(3, 32, 8, 5000, 128, dtype=torch.bfloat16, device=device, seed=13)
    cache_seqlens = torch.tensor([5000, 1, 3333], device=device)
    heads = torch.tensor([32, 8, 16], device=device)
    with override_tiles(attention_decode=tiles):
        ours = fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads)
    torch_bf16 = reference.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads)
    want = reference.elastic_attention_decode(q.double(), k.double(), v.double(), cache_seqlens=cache_seqlens, heads=heads)
    assert torch.isfinite(ours).all()
    assert (ours.double() - want).abs().max() <= 2 * (torch_bf16.double() - want).abs().max() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("heads_kind", ["per_request", "int"])
def test_cuda_graph_capture_and_replay(heads_kind):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    batch, kv_len = 4, 1000
    q, k, v = make(batch, 32, 8, kv_len, 128, dtype=torch.bfloat16, device=device, seed=12)
    cache_seqlens = torch.tensor([1000, 1, 0, 517], device=device)
    heads = torch.tensor([32, 8, 16, 24], device=device) if heads_kind == "per_request" else 16

    def call():
        return fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=heads)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for step in range(3):
        # New query, new cache lengths and head counts, written in place into the captured inputs.
        q.copy_(torch.randn(q.shape, generator=gen).to(device, q.dtype))
        cache_seqlens.copy_(torch.randint(0, kv_len + 1, (batch,), generator=gen).to(device))
        if heads_kind == "per_request":
            heads.copy_(torch.tensor([8, 16, 24, 32])[torch.randint(0, 4, (batch,), generator=gen)].to(device))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, call()), step


def test_argument_values_are_checked_with_one_copy_to_the_host(host_copies, device):
    # Lengths, head counts and their GQA multiples: one wait for the device per call, not four.
    # (The Triton path: the torch backend on a CPU reads the longest length on the host.)
    q, k, v = make(3, 8, 2, 40, 16, dtype=torch.float32, device=device, seed=3)
    lens = torch.tensor([40, 0, 17], device=device)
    heads = torch.tensor([8, 4, 0], device=device)
    with torch.no_grad(), fk.use_backend("triton"):
        fk.elastic_attention_decode(q, k, v, cache_seqlens=lens, heads=heads)
    assert host_copies == [("tolist", "checks.py")]
    with pytest.raises(ValueError, match="got 5 for request 1"):
        fk.elastic_attention_decode(q, k, v, cache_seqlens=lens, heads=torch.tensor([8, 5, 0], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_as_long_as_the_cache_or_longer_hides_nothing(backend, device):
    q, k, v = make(3, 8, 2, 40, 16, dtype=torch.float32, device=device, seed=14)
    lens = torch.tensor([40, 7, 0], device=device)
    heads = torch.tensor([8, 4, 8], device=device)
    plain = run(backend, q, k, v, lens, heads)
    for window in (40, 2**31 - 1, 2**31 + 5, 10**12):
        assert torch.equal(run(backend, q, k, v, lens, heads, window=window), plain), window
    assert not torch.equal(run(backend, q, k, v, lens, heads, window=39), plain)
