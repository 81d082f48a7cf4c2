"""elastic_attention_extend against the reference: new tokens of each request against a cache
that already holds them; GQA and MHA, per-request and static head counts, windows,
requests without new tokens, and its agreement with the prefill and decode ops."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels import reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make(new_tokens, cache_lengths, q_heads, kv_heads, kv_len, head_dim, *, dtype, device, seed):
    """q of the new tokens, caches, cu_seqlens and cache_seqlens (on ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(new_tokens)
    q = torch.randn(sum(new_tokens), q_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0] + new_tokens).cumsum(0).to(device)
    return q, k, v, cu, torch.tensor(cache_lengths, dtype=torch.int64, device=device)


def exact(q, k, v, cu, cache_seqlens, heads, **kw):
    heads = heads.cpu() if isinstance(heads, torch.Tensor) else heads
    return reference.elastic_attention_extend(q.double().cpu(), k.double().cpu(), v.double().cpu(), cu_seqlens=cu.cpu(),
                                              cache_seqlens=cache_seqlens.cpu(), heads=heads, **kw)


def check(out, ref, cu, heads, tol):
    assert out.shape == ref.shape
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    counts = heads.cpu() if isinstance(heads, torch.Tensor) else torch.full((cu.numel() - 1,), heads)
    per_token = counts.repeat_interleave((cu[1:] - cu[:-1]).cpu())
    assert (out[torch.arange(out.shape[1]) >= per_token[:, None]] == 0).all(), "unused heads are not exactly zero"
    assert (out - ref).norm() / max(ref.norm(), 1e-30) < tol


# New tokens per request (none, one, several) and what its cache holds, new tokens included.
NEW, HELD = [3, 0, 5, 1], [10, 4, 5, 17]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("q_heads,kv_heads,heads", [(8, 2, [8, 4, 0, 4]), (8, 2, 4), (4, 4, [4, 1, 3, 0]), (4, 4, 4)])
@pytest.mark.parametrize("window", [None, 1, 3, 40])
def test_matches_reference(dtype, q_heads, kv_heads, heads, window, device):
    q, k, v, cu, held = make(NEW, HELD, q_heads, kv_heads, 20, 16, dtype=dtype, device=device, seed=1)
    heads = torch.tensor(heads, device=device) if isinstance(heads, list) else heads
    out = fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=heads, window=window)
    assert out.dtype == dtype
    check(out, exact(q, k, v, cu, held, heads, window=window), cu, heads, TOL[dtype])


def test_a_cache_of_only_the_new_tokens_is_a_prefill(device):
    q, k, v, cu, held = make([6, 3], [6, 3], 4, 2, 8, 16, dtype=torch.float32, device=device, seed=2)
    out = fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=4, window=4)
    packed_k = torch.cat([k[0, :, :6].transpose(0, 1), k[1, :, :3].transpose(0, 1)])
    packed_v = torch.cat([v[0, :, :6].transpose(0, 1), v[1, :, :3].transpose(0, 1)])
    prefill = fk.elastic_attention(q, packed_k, packed_v, heads=4, cu_seqlens=cu.to(torch.int32), window=4)
    torch.testing.assert_close(out, prefill, rtol=1e-5, atol=1e-5)


def test_one_new_token_per_request_is_a_decode_step(device):
    q, k, v, cu, held = make([1, 1, 1], [9, 1, 14], 8, 2, 16, 16, dtype=torch.float32, device=device, seed=3)
    heads = torch.tensor([8, 4, 0], device=device)
    out = fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=heads, window=5)
    decode = fk.elastic_attention_decode(q, k, v, cache_seqlens=held, heads=heads, window=5)
    torch.testing.assert_close(out, decode, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no_request", "no_new_token"])
def test_empty(case, device):
    new, held = ([], []) if case == "no_request" else ([0, 0], [3, 0])
    q, k, v, cu, held = make(new, held, 4, 2, 6, 16, dtype=torch.float32, device=device, seed=4)
    out = fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=4)
    assert out.shape == q.shape == (0, 4, 16)


def test_positions_past_a_request_s_cache_are_never_read(device):
    q, k, v, cu, held = make(NEW, HELD, 8, 2, 20, 16, dtype=torch.float32, device=device, seed=5)
    want = exact(q, k, v, cu, held, 8)
    for b, n in enumerate(HELD):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
    check(fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=8), want, cu, 8, 1e-5)


def _bad_cases():
    q, k, v, cu, held = make([2, 1], [5, 3], 8, 2, 10, 16, dtype=torch.float32, device="cpu", seed=6)
    base = dict(q=q, k_cache=k, v_cache=v, cu_seqlens=cu, cache_seqlens=held, heads=torch.tensor([8, 4]))
    return [
        (dict(base, q=q.double()), TypeError, "q: expected dtype in .*got torch.float64"),
        (dict(base, cu_seqlens=cu.float()), TypeError, "cu_seqlens: expected an integer tensor of B \\+ 1 offsets"),
        (dict(base, cu_seqlens=torch.tensor([0, 2, 4])), ValueError,
         "cu_seqlens: expected non-decreasing offsets from 0 to T=3, got \\[0, 2, 4\\]"),
        (dict(base, cu_seqlens=torch.tensor([0, 2, 1, 3])), ValueError,
         "k_cache: expected shape \\[3, Hkv, S_max, 16\\] \\(B from cu_seqlens, Dh from q\\), got \\(2, 2, 10, 16\\)"),
        (dict(base, k_cache=k.half()), TypeError, "k_cache: expected dtype torch.float32 \\(the dtype of q\\)"),
        (dict(base, v_cache=v.to("meta")), ValueError, "v_cache: expected a tensor on cpu"),
        (dict(base, cache_seqlens=held.float()), TypeError, "cache_seqlens: expected an integer tensor"),
        (dict(base, cache_seqlens=held[:1]), ValueError, "cache_seqlens: expected shape \\(2,\\), got \\(1,\\)"),
        (dict(base, cache_seqlens=torch.tensor([5, 11])), ValueError,
         "cache_seqlens: expected every length in \\[0, 10\\] \\(S_max = k_cache.shape\\[2\\]\\), got values in \\[5, 11\\]"),
        (dict(base, cache_seqlens=torch.tensor([1, 3])), ValueError,
         "cache_seqlens: expected each request's cache to hold its new tokens .* got a request with 1 fewer positions"),
        (dict(base, heads=6), ValueError, "heads: expected a multiple of the GQA group size 4"),
        (dict(base, heads=torch.tensor([8, 2])), ValueError,
         "heads: expected every head count to be a multiple of the GQA group size 4 .* got 2 for request 1"),
        (dict(base, heads=torch.tensor([12, 4])), ValueError, "heads: expected every width in \\[0, 8\\]"),
        (dict(base, heads=torch.tensor([8, 4, 4])), ValueError, "heads: expected shape \\(2,\\), got \\(3,\\)"),
        (dict(base, window=0), ValueError, "window: expected None or an int >= 1"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = _bad_cases()[case]
    q, k, v = kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache")
    with pytest.raises(error, match=message):
        fk.elastic_attention_extend(q, k, v, **kwargs)


def test_opcheck(device):
    q, k, v, cu, held = make(NEW, HELD, 8, 2, 20, 16, dtype=torch.float32, device=device, seed=7)
    heads = torch.tensor([8, 4, 0, 8], device=device)
    for args in [(heads, 8, 0.25, 0), (None, 4, 0.25, 0), (heads, 8, 0.25, 3)]:
        torch.library.opcheck(torch.ops.flextron.elastic_attention_extend, (q, k, v, cu, held, *args))


def test_torch_compile_fullgraph(device):
    q, k, v, cu, held = make(NEW, HELD, 8, 2, 20, 16, dtype=torch.float32, device=device, seed=8)

    def step(q, k, v, cu, held):
        return fk.elastic_attention_extend(q * 2, k, v, cu_seqlens=cu, cache_seqlens=held, heads=4)

    with fk.skip_width_value_checks():  # compiled code skips them anyway (no host copy in a graph)
        eager = step(q, k, v, cu, held)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, cu, held)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 3])
def test_bf16_error_within_twice_torch(window):
    """On a GPU in bf16: within twice PyTorch's own bf16 error (the reference evaluated in
    bf16 on the same inputs) of the fp64 reference."""
    q, k, v, cu, held = make(NEW, HELD, 8, 2, 20, 64, dtype=torch.bfloat16, device="cuda", seed=9)
    heads = torch.tensor([8, 4, 0, 8], device="cuda")
    ours = fk.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=heads, window=window)
    torch_bf16 = reference.elastic_attention_extend(q, k, v, cu_seqlens=cu, cache_seqlens=held, heads=heads, window=window)
    want = exact(q, k, v, cu, held, heads, window=window)
    ours_err = (ours.double().cpu() - want).abs().max().item()
    torch_err = (torch_bf16.double().cpu() - want).abs().max().item()
    assert torch.isfinite(ours).all() and ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)
