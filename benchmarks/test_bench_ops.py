"""pytest-benchmark suites for the ops: ``pytest benchmarks/ --benchmark-only``.

On a GPU the cases use Llama-2-7B layer shapes; on a CPU they shrink to sizes that CI
runs once as a smoke test (``--benchmark-disable``: each case executes once, untimed).
"""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels.bench.workloads import mixed_widths

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
D_MODEL, FFN, TOKENS = (4096, 11008, 4096) if ON_GPU else (64, 256, 64)
HEADS, KV_HEADS, HEAD_DIM, SEQ = (32, 8, 128, 2048) if ON_GPU else (4, 2, 16, 32)


def _sync(fn):
    def run():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("mix", ["uniform", "skewed"])
def test_elastic_linear_per_token(benchmark, mix):
    x = torch.randn(TOKENS, D_MODEL, device=DEVICE, dtype=DTYPE)
    w = torch.randn(FFN, D_MODEL, device=DEVICE, dtype=DTYPE)
    widths = mixed_widths(FFN, TOKENS, mix, DEVICE)
    with fk.skip_width_value_checks():
        out = benchmark(_sync(lambda: fk.elastic_linear(x, w, out_features=widths)))
    assert out.shape == (TOKENS, FFN)


@pytest.mark.parametrize("mix", ["uniform", "all100"])
def test_elastic_mlp_per_token(benchmark, mix):
    mlp = fk.ElasticMLP(D_MODEL, FFN, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    x = torch.randn(TOKENS, D_MODEL, device=DEVICE, dtype=DTYPE)
    widths = mixed_widths(FFN, TOKENS, mix, DEVICE)
    with fk.skip_width_value_checks():
        out = benchmark(_sync(lambda: mlp(x, width=widths)))
    assert out.shape == x.shape


@pytest.mark.parametrize("batch", [1, 16])
def test_elastic_mlp_decode_mixed(benchmark, batch):
    mlp = fk.ElasticMLP(D_MODEL, FFN, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    x = torch.randn(batch, D_MODEL, device=DEVICE, dtype=DTYPE)
    widths = mixed_widths(FFN, batch, "uniform", DEVICE)
    with torch.no_grad(), fk.skip_width_value_checks():
        out = benchmark(_sync(lambda: fk.elastic_mlp_decode(x, mlp.w_up, mlp.w_down, width=widths, w_gate=mlp.w_gate)))
    assert out.shape == x.shape


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_elastic_attention_prefill(benchmark, fraction):
    batch = 8 if ON_GPU else 2
    q = torch.randn(batch * SEQ, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    kv = torch.randn(batch * SEQ, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    cu = torch.arange(0, batch * SEQ + 1, SEQ, device=DEVICE, dtype=torch.int32)
    heads = int(HEADS * fraction)
    out = benchmark(_sync(lambda: fk.elastic_attention(q, kv, kv, heads=heads, cu_seqlens=cu)))
    assert out.shape == q.shape


def test_routing_metadata(benchmark):
    widths = mixed_widths(FFN, TOKENS * 4, "uniform", DEVICE)
    boundaries = fk.default_boundaries(FFN, DEVICE)
    meta = benchmark(_sync(lambda: fk.routing_metadata(widths, boundaries, 128)))
    assert meta.sorted_token_idx.numel() == TOKENS * 4
