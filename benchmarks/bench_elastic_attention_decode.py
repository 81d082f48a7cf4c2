"""elastic_attention_decode benchmark: bandwidth of the decode step against the copy ceiling and SDPA.

Per batch B, cache length S (every request's cache full), KV head count and fraction of
active heads (25/50/75/100%, the same for every request), reports:
- the op's time with per-request head counts (a ``[B]`` tensor) and with an int head count;
- SDPA (``scaled_dot_product_attention``, flash backend where available) on dense
  tensors that hold only the active heads: the dense decode at that head count;
- bandwidth: the active heads' K and V bytes over the op's time, as a fraction of the
  device-to-device copy rate measured in the same run (target >= 0.70);
- the same against a copy of the same size (as many bytes read plus written as the step
  reads), also replayed from a CUDA graph: the rate a copy reaches at that size, where a
  small copy is launch-bound too (``bw_vs_same_size_copy``).

On a GPU every call is captured once in a CUDA graph and the graph's replay is timed:
the small cases take a few microseconds, below the cost of launching from Python.

Usage: ``python benchmarks/bench_elastic_attention_decode.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import copy_bandwidth_tbps, format_table, graph_replay, time_ms, write_results
from flextron_kernels.bench.workloads import FRACTIONS


def sdpa_decode(q, k, v):
    """``q [B, H, Dh]`` against ``k, v [B, Hkv, S, Dh]``, dense."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=q.shape[1] != k.shape[1]).squeeze(2)


def cases(batch, kv_len, q_heads, kv_heads, head_dim, dtype, device, copy_tbps):
    gen = torch.Generator().manual_seed(0)
    group = q_heads // kv_heads
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype)
    cache_seqlens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    rows = []
    for fraction in FRACTIONS:
        heads = max(group, int(round(q_heads * fraction / group)) * group)
        active_kv = heads // group
        head_counts = torch.full((batch,), heads, device=device)

        def ours(h=head_counts):
            return fk.elastic_attention_decode(q, k, v, cache_seqlens=cache_seqlens, heads=h)

        with fk.skip_width_value_checks():
            t_ours = time_ms(graph_replay(ours))
            t_ours_int = time_ms(graph_replay(lambda: ours(heads)))
        dq, dk, dv = q[:, :heads].contiguous(), k[:, :active_kv].contiguous(), v[:, :active_kv].contiguous()
        t_sdpa = time_ms(graph_replay(lambda: sdpa_decode(dq, dk, dv)))
        kv_bytes = 2 * batch * active_kv * kv_len * head_dim * k.element_size()
        src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t_copy_same = time_ms(graph_replay(lambda: dst.copy_(src)))
        del src, dst
        tbps = kv_bytes / (t_ours * 1e-3) / 1e12
        rows.append(
            dict(
                batch=batch, kv_len=kv_len, kv_heads=kv_heads, heads=heads, active=fraction,
                kv_mib=kv_bytes / 2**20, ours_us=t_ours * 1e3, ours_int_us=t_ours_int * 1e3, sdpa_us=t_sdpa * 1e3,
                ours_tbps=tbps, bw_vs_copy=tbps / copy_tbps, int_bw_vs_copy=tbps * t_ours / t_ours_int / copy_tbps,
                sdpa_bw_vs_copy=tbps * t_ours / t_sdpa / copy_tbps, ours_vs_sdpa=t_ours / t_sdpa,
                copy_same_us=t_copy_same * 1e3, bw_vs_same_size_copy=t_copy_same / t_ours,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Hkv=8 only")
    parser.add_argument("--out", default="benchmarks/results/elastic_attention_decode.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        configs, dtype = [(2, 64, 4, 2, 16)], torch.float32
    else:
        kv_head_counts = (8,) if args.quick else (8, 32)
        configs = [(b, s, 32, kv, 128) for kv in kv_head_counts for b in (1, 16) for s in (4096, 32768)]

    copy_tbps = copy_bandwidth_tbps(device)
    rows = []
    for batch, kv_len, q_heads, kv_heads, head_dim in configs:
        print(f"  B={batch} S={kv_len} Hq={q_heads} Hkv={kv_heads} Dh={head_dim}", file=sys.stderr, flush=True)
        rows += cases(batch, kv_len, q_heads, kv_heads, head_dim, dtype, device, copy_tbps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"ceiling: copy {copy_tbps:.2f} TB/s")
    print(format_table(rows, ["batch", "kv_len", "kv_heads", "heads", "kv_mib", "ours_us", "ours_int_us", "sdpa_us",
                              "bw_vs_copy", "int_bw_vs_copy", "sdpa_bw_vs_copy", "ours_vs_sdpa", "copy_same_us",
                              "bw_vs_same_size_copy"]))
    # Below a few MiB of KV the step is launch-bound (a few microseconds) whatever the kernel.
    large = [r for r in rows if r["kv_mib"] >= 64] or rows
    summary = {
        "bw_vs_copy_min": min(r["bw_vs_copy"] for r in rows),
        "bw_vs_copy_min_kv_64mib_plus": min(r["bw_vs_copy"] for r in large),
        "ours_vs_sdpa_max": max(r["ours_vs_sdpa"] for r in rows),
        "bw_vs_same_size_copy_min": min(r["bw_vs_same_size_copy"] for r in rows),
    }
    print("summary:", summary)
    payload = dict(
        benchmark="elastic_attention_decode", dtype=str(dtype), ceilings=dict(copy_tbps=copy_tbps), summary=summary, rows=rows
    )
    path = write_results(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
