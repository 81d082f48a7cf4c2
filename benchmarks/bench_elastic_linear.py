"""elastic_linear benchmark: static and per-token widths against cuBLAS baselines from the same run.

Reports, per projection shape, token count M and width:
- static forward: throughput relative to cuBLAS on a contiguous copy of the same
  sub-matrix (target >= 0.97);
- static backward (dx and the prefix-accumulating dW): relative to cuBLAS's dense
  backward of the same reduced shape (target >= 0.95), and the peak extra memory
  against the used part of the weight gradient;
- per-token mixed widths (uniform over 25/50/75/100%, and skewed: 70% at 25%):
  forward and forward+backward time over the FLOP-proportional ideal (dense
  full-width time x mean width fraction; targets <= 1.15 and <= 1.25), and the torch
  bucketed loop.

Usage: ``python benchmarks/bench_elastic_linear.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import copy_bandwidth_tbps, format_table, matmul_tflops, time_ms, write_results
from flextron_kernels.bench.workloads import FRACTIONS, mixed_widths, routed_tile_work, width_groups, width_of
from flextron_kernels.ops.tiles import matmul_config

SHAPES = {
    # name: (N, K, elastic axis); the elastic axis is the MLP hidden size.
    "llama2-7b.up": (11008, 4096, "out"),
    "llama2-7b.down": (4096, 11008, "in"),
    "llama2-7b.qkvo": (4096, 4096, "out"),
    "llama3-8b.up": (14336, 4096, "out"),
    "llama3-8b.down": (4096, 14336, "in"),
}
def bucketed_forward(x, weight, widths, axis):
    """The torch baseline: sort tokens by width, one F.linear per width (one host sync)."""
    out = x.new_zeros(x.shape[0], weight.shape[0])
    for w, idx in width_groups(widths):
        if axis == "out":
            out[idx, :w] = F.linear(x.index_select(0, idx), weight[:w])
        else:
            out[idx] = F.linear(x.index_select(0, idx)[:, :w], weight[:, :w])
    return out


def static_cases(name, n_full, k_full, axis, m, dtype, device):
    rows = []
    x_full = torch.randn(m, k_full, device=device, dtype=dtype)
    weight = torch.randn(n_full, k_full, device=device, dtype=dtype) / k_full**0.5
    for fraction in FRACTIONS:
        n = width_of(n_full, fraction) if axis == "out" else n_full
        k = width_of(k_full, fraction) if axis == "in" else k_full
        x = x_full[:, :k].contiguous()
        sub = weight[:n, :k].contiguous()
        t_ours = time_ms(lambda: fk.elastic_linear(x, weight, out_features=n, in_features=k))
        t_cublas = time_ms(lambda: F.linear(x, sub))

        dy = torch.randn(m, n, device=device, dtype=dtype)
        grad_w = torch.zeros_like(weight)
        ops = torch.ops.flextron

        def ours_backward():
            ops.elastic_linear_grad_input(dy, weight, None, None, k, k)
            ops.elastic_linear_grad_weight_(grad_w, None, dy, x, None, None, k)

        def dense_backward():
            dy @ sub
            dy.T @ x

        t_ours_bwd = time_ms(ours_backward)
        t_dense_bwd = time_ms(dense_backward)
        extra = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ours_backward()
            torch.cuda.synchronize()
            # dx is the backward's own output; anything above it is temporary.
            extra = (torch.cuda.max_memory_allocated() - base - m * k * x.element_size()) / max(n * k * x.element_size(), 1)
        rows.append(
            dict(
                shape=name, m=m, width=fraction, kind="static",
                fwd_ms=t_ours, cublas_fwd_ms=t_cublas, fwd_vs_cublas=t_cublas / t_ours,
                bwd_ms=t_ours_bwd, cublas_bwd_ms=t_dense_bwd, bwd_vs_cublas=t_dense_bwd / t_ours_bwd,
                bwd_extra_mem_vs_used_grad=extra,
            )
        )
    return rows


def per_token_cases(name, n_full, k_full, axis, m, dtype, device):
    rows = []
    x = torch.randn(m, k_full, device=device, dtype=dtype)
    weight = (torch.randn(n_full, k_full, device=device, dtype=dtype) / k_full**0.5).requires_grad_()
    t_dense = time_ms(lambda: F.linear(x, weight))
    xg = x.clone().requires_grad_()
    dy = torch.randn(m, n_full, device=device, dtype=dtype)

    def dense_fwd_bwd():
        F.linear(xg, weight).backward(dy)

    t_dense_fb = time_ms(dense_fwd_bwd)
    size = n_full if axis == "out" else k_full
    for mix in ("uniform", "skewed"):
        widths = mixed_widths(size, m, mix, device)
        mean_fraction = widths.double().mean().item() / size
        kw = dict(out_features=widths) if axis == "out" else dict(in_features=widths)
        with fk.skip_width_value_checks():
            t_ours = time_ms(lambda: fk.elastic_linear(x, weight.detach(), **kw))
            layer = fk.ElasticLinear(k_full, n_full, bias=False, device=device, dtype=dtype)
            layer.weight.data.copy_(weight.detach())

            def ours_fwd_bwd():
                layer(xg, **kw).backward(dy)

            t_ours_fb = time_ms(ours_fwd_bwd)
        t_bucketed = time_ms(lambda: bucketed_forward(x, weight.detach(), widths, axis))
        ideal = t_dense * mean_fraction
        ideal_fb = t_dense_fb * mean_fraction
        config = matmul_config(x, m)
        tile_work = routed_tile_work(widths, size, config["BLOCK_M"], config["BLOCK_N" if axis == "out" else "BLOCK_K"])
        rows.append(
            dict(
                shape=name, m=m, width=mix, kind="per-token", mean_fraction=mean_fraction,
                fwd_tile_work_vs_ideal=tile_work,
                fwd_ms=t_ours, ideal_fwd_ms=ideal, fwd_vs_ideal=t_ours / ideal,
                bucketed_fwd_ms=t_bucketed, fwd_vs_bucketed=t_ours / t_bucketed,
                fwd_bwd_ms=t_ours_fb, ideal_fwd_bwd_ms=ideal_fb, fwd_bwd_vs_ideal=t_ours_fb / ideal_fb,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per model, M in {16, 4096}")
    parser.add_argument("--out", default="benchmarks/results/elastic_linear.json")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        shapes = {"tiny.up": (256, 128, "out"), "tiny.down": (128, 256, "in")}
        token_counts, dtype = (16, 64), torch.float32
    elif args.quick:
        shapes = {k: SHAPES[k] for k in ("llama2-7b.up", "llama2-7b.down")}
        token_counts = (16, 4096)
    else:
        shapes = SHAPES
        token_counts = (1, 16, 512, 4096, 16384)

    ceilings = dict(copy_tbps=copy_bandwidth_tbps(device), matmul_tflops=matmul_tflops(device, dtype))
    rows = []
    for name, (n_full, k_full, axis) in shapes.items():
        for m in token_counts:
            print(f"  {name} M={m}", file=sys.stderr, flush=True)
            rows += static_cases(name, n_full, k_full, axis, m, dtype, device)
            rows += per_token_cases(name, n_full, k_full, axis, m, dtype, device)

    static = [r for r in rows if r["kind"] == "static"]
    routed = [r for r in rows if r["kind"] == "per-token"]
    print(f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s, matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    print(format_table(static, ["shape", "m", "width", "fwd_ms", "fwd_vs_cublas", "bwd_ms", "bwd_vs_cublas", "bwd_extra_mem_vs_used_grad"]))
    print(format_table(routed, ["shape", "m", "width", "fwd_ms", "fwd_vs_ideal", "fwd_tile_work_vs_ideal", "fwd_vs_bucketed",
                                  "fwd_bwd_vs_ideal"]))
    summary = {
        "static_fwd_vs_cublas_min": min(r["fwd_vs_cublas"] for r in static),
        "static_bwd_vs_cublas_min": min(r["bwd_vs_cublas"] for r in static),
        "per_token_fwd_vs_ideal_max": max(r["fwd_vs_ideal"] for r in routed),
        "per_token_fwd_bwd_vs_ideal_max": max(r["fwd_bwd_vs_ideal"] for r in routed),
    }
    print("summary:", summary)
    path = write_results(args.out, dict(benchmark="elastic_linear", dtype=str(dtype), ceilings=ceilings, summary=summary, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
