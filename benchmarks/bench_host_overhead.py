"""Host overhead per op call: the CPU time to issue a call, against the GPU time the same
call takes when replayed from a CUDA graph, and the eager time (``do_bench``), from the
same run. Where ``host_us`` exceeds ``graph_us`` the eager op is bound by Python and
launch overhead, not by its kernels. Ends with profiles (cProfile, top functions by own
time) of the two most host-bound elastic calls, to show where that host time goes.

Usage: ``python benchmarks/bench_host_overhead.py [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import format_table, graph_replay, time_ms, write_results
from flextron_kernels.bench.workloads import mixed_widths


def host_us(fn, calls: int = 50, repeats: int = 7) -> float:
    """Median microseconds to issue one call (``calls`` back to back, the queue not full)."""
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return statistics.median(samples)


def cases(device, dtype):
    gpu = device.type == "cuda"
    d_model, ffn, tokens, decode = (4096, 11008, 512, 16) if gpu else (64, 256, 32, 4)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    x_decode = x[:decode]
    weight = torch.randn(ffn, d_model, device=device, dtype=dtype) / d_model**0.5
    mlp = fk.ElasticMLP(d_model, ffn, gated=True, device=device, dtype=dtype)
    widths = mixed_widths(ffn, tokens, "uniform", device)
    heads_q, heads_kv, head_dim = (32, 8, 128) if gpu else (4, 2, 16)
    q = torch.randn(tokens, heads_q, head_dim, device=device, dtype=dtype)
    kv = torch.randn(tokens, heads_kv, head_dim, device=device, dtype=dtype)
    heads = torch.tensor([heads_q // 4, heads_q // 2, heads_q], device=device)[torch.arange(tokens, device=device) % 3]
    boundaries = torch.tensor([ffn // 4, ffn // 2, 3 * ffn // 4, ffn], device=device, dtype=torch.int32)
    return {
        "F.linear (cuBLAS), decode rows": lambda: F.linear(x_decode, weight),
        "elastic_linear, per-token out widths, decode rows": lambda: fk.elastic_linear(
            x_decode, weight, out_features=widths[:decode]),
        f"routing_metadata, {tokens} tokens": lambda: fk.routing_metadata(widths, boundaries, 128),
        f"elastic_mlp, per-token widths, {tokens} tokens": lambda: mlp(x, width=widths),
        f"elastic_attention, per-token heads, {tokens} tokens": lambda: fk.elastic_attention(q, kv, kv, heads=heads),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/host_overhead.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
    rows = []
    with torch.no_grad(), fk.skip_width_value_checks():
        calls = cases(device, dtype)
        for name, fn in calls.items():
            print(f"  {name}", file=sys.stderr, flush=True)
            fn()  # compile
            row = dict(op=name, host_us=host_us(fn), eager_us=1e3 * time_ms(fn))
            row["graph_us"] = 1e3 * time_ms(graph_replay(fn))
            row["host_over_graph"] = row["host_us"] / row["graph_us"]
            rows.append(row)
        host_bound = sorted((r for r in rows if not r["op"].startswith("F.linear")), key=lambda r: -r["host_over_graph"])
        profiles = {}
        for row in host_bound[:2]:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(100):
                calls[row["op"]]()
            profiler.disable()
            profiles[row["op"]] = profiler
    print(format_table(rows, ["op", "host_us", "eager_us", "graph_us", "host_over_graph"]))
    for name, profiler in profiles.items():
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
        print(f"profile of 100 calls of {name} (own time):")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-3000:])
    summary = {"host_over_graph_max": max(r["host_over_graph"] for r in rows)}
    path = write_results(args.out, dict(benchmark="host_overhead", device_type=device.type, summary=summary, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
