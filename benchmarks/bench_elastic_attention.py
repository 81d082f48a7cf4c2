"""elastic_attention (prefill) benchmark against SDPA from the same run.

B sequences of S tokens, packed; Hq query heads, Hkv KV heads, Dh, causal; a fraction
of the heads active (the same count for every token). Baseline:
``scaled_dot_product_attention`` (flash backend where available) on dense
``[B, h, S, Dh]`` tensors holding only the active heads. Targets: forward <= 1.10x,
forward+backward <= 1.20x the baseline. A per-token mix (heads uniform over the four
fractions) is timed too, against the baseline at the mix's mean head count.

Usage: ``python benchmarks/bench_elastic_attention.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import format_table, time_ms, write_results
from flextron_kernels.bench.workloads import FRACTIONS


def sdpa(q, k, v):
    """Dense baseline: ``q [B, h, S, D]``, ``k, v [B, h_kv, S, D]``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def cases(batch, seq_len, q_heads, kv_heads, head_dim, dtype, device):
    group = q_heads // kv_heads
    num_tokens = batch * seq_len
    cu = torch.arange(0, num_tokens + 1, seq_len, device=device, dtype=torch.int32)
    q = torch.randn(num_tokens, q_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(num_tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(num_tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    rows = []
    mixes = [(f, max(group, int(round(q_heads * f / group)) * group)) for f in FRACTIONS]
    gen = torch.Generator().manual_seed(0)
    per_token = (torch.tensor([h for _, h in mixes])[torch.randint(0, 4, (num_tokens,), generator=gen)]).to(device)
    mixes.append(("mixed", per_token))
    for label, heads in mixes:
        active = heads if isinstance(heads, int) else int(round(per_token.float().mean().item() / group)) * group
        active_kv = active // group
        dq = q.detach()[:, :active].reshape(batch, seq_len, active, head_dim).transpose(1, 2).contiguous().requires_grad_()
        dk = k.detach()[:, :active_kv].reshape(batch, seq_len, active_kv, head_dim).transpose(1, 2).contiguous().requires_grad_()
        dv = v.detach()[:, :active_kv].reshape(batch, seq_len, active_kv, head_dim).transpose(1, 2).contiguous().requires_grad_()
        ddout = torch.randn_like(dq)
        with fk.skip_width_value_checks():
            with torch.no_grad():
                t_ours = time_ms(lambda: fk.elastic_attention(q, k, v, heads=heads, cu_seqlens=cu))
            t_ours_fb = time_ms(lambda: fk.elastic_attention(q, k, v, heads=heads, cu_seqlens=cu).backward(dout))
        with torch.no_grad():
            t_sdpa = time_ms(lambda: sdpa(dq, dk, dv))
        t_sdpa_fb = time_ms(lambda: sdpa(dq, dk, dv).backward(ddout))
        rows.append(
            dict(
                batch=batch, seq_len=seq_len, q_heads=q_heads, kv_heads=kv_heads, heads=label, active_heads=active,
                fwd_ms=t_ours, sdpa_fwd_ms=t_sdpa, fwd_vs_sdpa=t_ours / t_sdpa,
                fwd_bwd_ms=t_ours_fb, sdpa_fwd_bwd_ms=t_sdpa_fb, fwd_bwd_vs_sdpa=t_ours_fb / t_sdpa_fb,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Hkv=8 only")
    parser.add_argument("--out", default="benchmarks/results/elastic_attention.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        configs, dtype = [(2, 64, 4, 2, 16)], torch.float32
    else:
        configs = [(8, 2048, 32, kv, 128) for kv in ((8,) if args.quick else (8, 32))]
        dtype = torch.bfloat16
    rows = []
    for config in configs:
        print(f"  B, S, Hq, Hkv, Dh = {config}", file=sys.stderr, flush=True)
        rows += cases(*config, dtype, device)
    print(format_table(rows, ["kv_heads", "heads", "active_heads", "fwd_ms", "fwd_vs_sdpa", "fwd_bwd_ms", "fwd_bwd_vs_sdpa"]))
    uniform = [r for r in rows if r["heads"] != "mixed"]
    summary = {
        "fwd_vs_sdpa_max": max(r["fwd_vs_sdpa"] for r in uniform),
        "fwd_bwd_vs_sdpa_max": max(r["fwd_bwd_vs_sdpa"] for r in uniform),
    }
    print("summary:", summary)
    path = write_results(args.out, dict(benchmark="elastic_attention", dtype=str(dtype), summary=summary, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
