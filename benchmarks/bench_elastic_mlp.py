"""elastic_mlp benchmark: the routed SwiGLU MLP against dense cuBLAS baselines from the same run.

Per MLP shape, token count T and width mix (uniform over 25/50/75/100%, all 25%, all
100%, skewed with 70% at 25%), reports:
- forward time over the FLOP-proportional ideal (dense full-width SwiGLU x mean width
  fraction; target <= 1.10), over the dense MLP at all-100% (target <= 1.05), and the
  torch bucketed loop and compute-all-then-mask baselines;
- forward+backward time over the ideal (dense forward+backward x mean width fraction;
  target <= 1.20);
- peak memory of forward+backward over that of a dense MLP at the mean width;
- for the uniform mix, the backward that recomputes the first layer's pre-activations
  (``recompute=True``) against the default, which keeps them: forward+backward time, and
  the memory each forward leaves for its backward.

Usage: ``python benchmarks/bench_elastic_mlp.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import copy_bandwidth_tbps, format_table, matmul_tflops, time_ms, write_results
from flextron_kernels.bench.workloads import MIXES, MLP_SHAPES, mixed_widths, routed_tile_work, width_groups
from flextron_kernels.ops.tiles import matmul_config


def dense_mlp(x, w_gate, w_up, w_down, width):
    return F.linear(F.silu(F.linear(x, w_gate[:width])) * F.linear(x, w_up[:width]), w_down[:, :width])


def bucketed_mlp(x, w_gate, w_up, w_down, widths):
    """The torch baseline: sort tokens by width, a dense MLP per width (one host sync)."""
    out = torch.empty_like(x)
    for w, idx in width_groups(widths):
        out.index_copy_(0, idx, dense_mlp(x.index_select(0, idx), w_gate, w_up, w_down, w))
    return out


def masked_mlp(x, w_gate, w_up, w_down, widths):
    """The other torch baseline: the full-width MLP with the hidden units past each width zeroed."""
    hidden = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    keep = torch.arange(w_up.shape[0], device=x.device) < widths[:, None]
    return F.linear(hidden * keep, w_down)


def peak_bytes(fn) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def held_bytes(forward) -> int | None:
    """The memory ``forward()`` leaves allocated for its backward, its output aside."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = forward()
    held = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    del out
    return held


def cases(name, d_model, ffn, num_tokens, dtype, device):
    gen = torch.Generator().manual_seed(0)
    mlp = fk.ElasticMLP(d_model, ffn, gated=True, activation="silu", device=device, dtype=dtype)
    w_gate, w_up, w_down = (p.detach() for p in (mlp.w_gate, mlp.w_up, mlp.w_down))
    x = torch.randn(num_tokens, d_model, generator=gen).to(device, dtype)
    xg = x.clone().requires_grad_()
    dy = torch.randn(num_tokens, d_model, generator=gen).to(device, dtype)
    dense_params = [p.detach().clone().requires_grad_() for p in (w_gate, w_up, w_down)]

    def dense_fwd_bwd(width):
        dense_mlp(xg, *dense_params, width).backward(dy)

    t_dense = time_ms(lambda: dense_mlp(x, w_gate, w_up, w_down, ffn))
    t_dense_fb = time_ms(lambda: dense_fwd_bwd(ffn))
    rows = []
    for mix in MIXES:
        widths = mixed_widths(ffn, num_tokens, mix, device)
        mean_fraction = widths.double().mean().item() / ffn
        mean_width = int(round(mean_fraction * ffn))
        with fk.skip_width_value_checks():
            with torch.no_grad():
                t_ours = time_ms(lambda: mlp(x, width=widths))

            def ours_fwd_bwd():
                mlp(xg, width=widths).backward(dy)

            t_ours_fb = time_ms(ours_fwd_bwd)
            mem_ours = peak_bytes(ours_fwd_bwd)
            recompute = {}
            if mix == "uniform":
                held_keep = held_bytes(lambda: mlp(xg, width=widths))
                mlp.recompute = True
                try:
                    t_recompute_fb = time_ms(ours_fwd_bwd)
                    held_recompute = held_bytes(lambda: mlp(xg, width=widths))
                finally:
                    mlp.recompute = False
                mib = 2.0**-20
                recompute = dict(
                    fwd_bwd_recompute_ms=t_recompute_fb, recompute_vs_keep=t_recompute_fb / t_ours_fb,
                    held_mib_keep=held_keep * mib if held_keep is not None else None,
                    held_mib_recompute=held_recompute * mib if held_recompute is not None else None,
                )
        mem_dense = peak_bytes(lambda: dense_fwd_bwd(mean_width))
        t_bucketed = time_ms(lambda: bucketed_mlp(x, w_gate, w_up, w_down, widths))
        t_masked = time_ms(lambda: masked_mlp(x, w_gate, w_up, w_down, widths))
        ideal, ideal_fb = t_dense * mean_fraction, t_dense_fb * mean_fraction
        # The gate/up kernel (two thirds of the FLOPs) is routed along its output, the down
        # projection along its reduction.
        block_m = matmul_config(x, num_tokens)["BLOCK_M"]
        first_block = matmul_config(x, num_tokens, gated=True)["BLOCK_N"]
        tile_work = (2 * routed_tile_work(widths, ffn, block_m, first_block)
                     + routed_tile_work(widths, ffn, block_m, matmul_config(x, num_tokens)["BLOCK_K"])) / 3
        rows.append(
            dict(
                shape=name, tokens=num_tokens, mix=mix, mean_fraction=mean_fraction, fwd_tile_work_vs_ideal=tile_work,
                fwd_ms=t_ours, ideal_fwd_ms=ideal, fwd_vs_ideal=t_ours / ideal, fwd_vs_dense=t_ours / t_dense,
                bucketed_ms=t_bucketed, bucketed_vs_ideal=t_bucketed / ideal,
                masked_ms=t_masked, masked_vs_ideal=t_masked / ideal,
                fwd_bwd_ms=t_ours_fb, ideal_fwd_bwd_ms=ideal_fb, fwd_bwd_vs_ideal=t_ours_fb / ideal_fb,
                peak_mem_vs_dense_at_mean=(mem_ours / mem_dense) if mem_dense else None,
                **recompute,
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama-2-7B MLP, T in {512, 4096}")
    parser.add_argument("--out", default="benchmarks/results/elastic_mlp.json")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        shapes, token_counts, dtype = {"tiny": (64, 256)}, (64,), torch.float32
    elif args.quick:
        shapes, token_counts = {"llama2-7b": MLP_SHAPES["llama2-7b"]}, (512, 4096)
    else:
        shapes, token_counts = MLP_SHAPES, (512, 4096, 16384)

    ceilings = dict(copy_tbps=copy_bandwidth_tbps(device), matmul_tflops=matmul_tflops(device, dtype))
    rows = []
    for name, (d_model, ffn) in shapes.items():
        for num_tokens in token_counts:
            print(f"  {name} T={num_tokens}", file=sys.stderr, flush=True)
            rows += cases(name, d_model, ffn, num_tokens, dtype, device)
    print(f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s, matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    print(format_table(rows, ["shape", "tokens", "mix", "fwd_ms", "fwd_vs_ideal", "fwd_tile_work_vs_ideal", "fwd_vs_dense",
                              "bucketed_vs_ideal", "masked_vs_ideal", "fwd_bwd_vs_ideal", "peak_mem_vs_dense_at_mean"]))
    uniform = [r for r in rows if "recompute_vs_keep" in r]
    print("the backward recomputing the pre-activations (recompute=True) against keeping them:")
    print(format_table(uniform, ["shape", "tokens", "fwd_bwd_ms", "fwd_bwd_recompute_ms", "recompute_vs_keep",
                                 "held_mib_keep", "held_mib_recompute"]))
    mixed = [r for r in rows if r["mix"] != "all100"]
    full = [r for r in rows if r["mix"] == "all100"]
    summary = {
        "fwd_vs_ideal_max": max(r["fwd_vs_ideal"] for r in mixed),
        "fwd_all100_vs_dense_max": max(r["fwd_vs_dense"] for r in full),
        "fwd_bwd_vs_ideal_max": max(r["fwd_bwd_vs_ideal"] for r in rows),
        "recompute_vs_keep_max": max(r["recompute_vs_keep"] for r in uniform),
    }
    print("summary:", summary)
    path = write_results(args.out, dict(benchmark="elastic_mlp", dtype=str(dtype), ceilings=ceilings, summary=summary, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
