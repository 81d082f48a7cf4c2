"""ElasticAttention: the block equals a dense attention block sliced to the heads used."""

import pytest
import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.nn import ElasticAttention, KVCache
from flextron_kernels.nn.attention import apply_rotary, rotary_cos_sin

BACKENDS = ["torch", "triton"]


def dense_block(block: ElasticAttention, x, heads, rotary=True):
    """One sequence through a plain attention block holding only the first ``heads`` heads."""
    dh, g = block.head_dim, block.group
    kv = heads // g

    def proj(layer, rows):
        return F.linear(x, layer.weight[:rows], None if layer.bias is None else layer.bias[:rows])

    q = proj(block.q_proj, heads * dh).view(-1, heads, dh)
    k = proj(block.k_proj, kv * dh).view(-1, kv, dh)
    v = proj(block.v_proj, kv * dh).view(-1, kv, dh)
    if rotary:
        cos, sin = rotary_cos_sin(torch.arange(x.shape[0]), dh, block.rope_theta, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1), v.repeat_interleave(g, 1).transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    o = block.o_proj
    return F.linear(attn.reshape(x.shape[0], heads * dh), o.weight[:, : heads * dh], o.bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotary,bias", [(True, False), (False, True)])
def test_prefill_equals_dense_block_per_sequence(backend, rotary, bias, device):
    torch.manual_seed(0)
    block = ElasticAttention(32, 4, 2, qkv_bias=bias, out_bias=bias, rotary=rotary).to(device)
    lengths, seq_heads = [5, 1, 9], [2, 4, 4]
    x = torch.randn(sum(lengths), 32, device=device)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    heads = torch.tensor(seq_heads).repeat_interleave(torch.tensor(lengths)).to(device)
    with fk.use_backend(backend):
        out = block(x, heads=heads, cu_seqlens=cu)
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want = dense_block(block, x[start:end], seq_heads[b], rotary)
        torch.testing.assert_close(out[start:end], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_below_the_cap_use_fewer_query_heads(backend, device):
    """Per-token heads under a sequence cap: token t's output uses only its heads, keys
    come from the cap's KV heads."""
    torch.manual_seed(1)
    block = ElasticAttention(32, 4, 2).to(device)
    x = torch.randn(7, 32, device=device)
    heads = torch.tensor([4, 2, 4, 2, 2, 4, 0], device=device)
    with fk.use_backend(backend):
        out = block(x, heads=heads)
    full = dense_block(block, x, 4)
    # A token with all 4 heads equals the dense block; a token with 0 heads outputs the O bias (none: 0).
    torch.testing.assert_close(out[heads == 4], full[heads.cpu() == 4], rtol=1e-4, atol=1e-5)
    assert (out[6] == 0).all()


def test_decode_after_prefill_equals_prefill(device):
    torch.manual_seed(2)
    block = ElasticAttention(32, 4, 2).to(device)
    x = torch.randn(2, 6, 32, device=device)
    heads = torch.tensor([2, 4], device=device)
    cache = KVCache.empty(2, 2, 8, block.head_dim, device=device)
    outs = [block.decode(x[:, t], cache, heads=heads) for t in range(6)]
    assert cache.seqlens.tolist() == [6, 6]
    for b in range(2):
        want = dense_block(block, x[b], int(heads[b]))
        got = torch.stack([o[b] for o in outs])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_kv_cap():
    block = ElasticAttention(32, 4, 2)
    with pytest.raises(ValueError, match="kv_cap: expected every token's cap to be at least its heads"):
        block(torch.randn(3, 32), heads=torch.tensor([4, 2, 2]), kv_cap=2)
    with pytest.raises(ValueError, match="kv_heads: expected a divisor of q_heads=4, got 3"):
        ElasticAttention(32, 4, 3)


@pytest.mark.parametrize("heads", [4, 2, "per_request"])
@pytest.mark.parametrize("window", [None, 3])
def test_extend_after_prefill_equals_one_prefill(heads, window):
    torch.manual_seed(0)
    block = ElasticAttention(64, 4, 2, 16, rotary=True, window=window).eval()
    x = torch.randn(12, 64)
    caps = torch.tensor([4, 2]) if heads == "per_request" else heads
    token_caps = caps.repeat_interleave(torch.tensor([7, 5])) if heads == "per_request" else heads
    with torch.no_grad():
        whole = block(x, heads=token_caps, cu_seqlens=torch.tensor([0, 7, 12], dtype=torch.int32))
        cache = KVCache.empty(2, 2, 10, 16)
        block(torch.cat([x[:4], x[7:9]]), heads=caps.repeat_interleave(torch.tensor([4, 2])) if heads == "per_request"
              else heads, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), cache=cache)
        out = block.extend(torch.cat([x[4:7], x[9:]]), cache, cu_seqlens=torch.tensor([0, 3, 6]), heads=caps)
    torch.testing.assert_close(out, torch.cat([whole[4:7], whole[9:]]), rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [7, 5]


def test_extend_refuses_arguments_before_changing_the_cache():
    block = ElasticAttention(64, 4, 2, 16).eval()
    cache = KVCache.empty(2, 2, 8, 16)
    with torch.no_grad():
        block(torch.randn(9, 64), heads=4, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), cache=cache)
        before = cache.seqlens.clone(), cache.k.clone()
        x = torch.randn(4, 64)
        for kwargs, message in [
            (dict(cu_seqlens=torch.tensor([0, 4]), heads=4), "cu_seqlens: expected shape \\(3,\\), got \\(2,\\)"),
            (dict(cu_seqlens=torch.tensor([0, 0, 4]), heads=4), "cache: a request would hold 9 positions after this extension"
                                                                 ", past its 8"),
            (dict(cu_seqlens=torch.tensor([0, 2, 4]), heads=2), "heads: expected each request's KV cap as its cache was "
                                                                  "filled \\(request 0: 4 query heads\\), got 2"),
            (dict(cu_seqlens=torch.tensor([0, 2, 4]), heads=torch.tensor([4, 3])), "heads: expected every head count to be "
                                                                                     "a multiple of the GQA group size 2"),
        ]:
            with pytest.raises(ValueError, match=message):
                block.extend(x, cache, **kwargs)
            assert torch.equal(cache.seqlens, before[0]) and torch.equal(cache.k, before[1])


def test_a_request_that_held_nothing_starts_at_the_caps_of_its_first_extension():
    block = ElasticAttention(64, 4, 2, 16).eval()
    cache = KVCache.empty(2, 2, 8, 16)
    with torch.no_grad():
        block(torch.randn(3, 64), heads=4, cu_seqlens=torch.tensor([0, 3, 3], dtype=torch.int32), cache=cache)
        block.extend(torch.randn(2, 64), cache, cu_seqlens=torch.tensor([0, 0, 2]), heads=torch.tensor([4, 2]))
        assert cache.heads.tolist() == [4, 2]
        block.extend(torch.randn(2, 64), cache, cu_seqlens=torch.tensor([0, 1, 2]), heads=torch.tensor([4, 2]))
        with pytest.raises(ValueError, match="request 1: 2 query heads\\), got 4"):
            block.extend(torch.randn(1, 64), cache, cu_seqlens=torch.tensor([0, 0, 1]), heads=4)
