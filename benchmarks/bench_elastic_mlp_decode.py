"""elastic_mlp_decode benchmark: the decode-step MLP against the copy ceiling and cuBLAS.

For a gated MLP (Llama-2-7B: D=4096, F=11008; Llama-3-8B: F=14336) and a batch of
tokens (1, a mixed batch of 16, 64), at widths 25/50/75/100% (every token the same) and
a mix (widths uniform over the four, one token at 100%), reports:
- the fused CUDA kernel, the Triton fallback and the torch backend (cuBLAS on strided
  views, computing at the batch's widest width then masking), all through the op;
- dense cuBLAS: ``F.linear`` on contiguous weights of the widest width (the dense model
  of that reduced shape);
- bandwidth: the weight bytes the batch needs (gate, up and down prefixes of the widest
  token) over the time, as a fraction of the device-to-device copy rate measured in the
  same run (target >= 0.80 at batch 1 and at a mixed batch of 16).

Calls are captured in a CUDA graph and its replay timed (a 25%-width step takes tens of
microseconds, close to Python's launch cost).

Usage: ``python benchmarks/bench_elastic_mlp_decode.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.bench.measure import copy_bandwidth_tbps, format_table, graph_replay, time_ms, write_results
from flextron_kernels.bench.workloads import FRACTIONS


def dense_mlp(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def cases(batch, d_model, ffn, dtype, device, copy_tbps, backends):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_model, generator=gen).to(device, dtype)
    w_gate, w_up = (torch.randn(ffn, d_model, device=device, dtype=dtype) * d_model**-0.5 for _ in range(2))
    w_down = torch.randn(d_model, ffn, device=device, dtype=dtype) * ffn**-0.5
    mixes = [(f"{int(f * 100)}%", int(round(ffn * f))) for f in FRACTIONS]
    if batch > 1:
        mixes.append(("mixed", None))
    rows = []
    for name, width in mixes:
        if width is None:
            choices = torch.tensor([int(round(ffn * f)) for f in FRACTIONS])
            widths = choices[torch.randint(0, len(FRACTIONS), (batch,), generator=gen)]
            widths[0] = ffn
            widths = widths.to(device)
            widest = ffn
            mean_fraction = widths.double().mean().item() / ffn
        else:
            widths, widest, mean_fraction = torch.full((batch,), width, device=device), width, width / ffn

        row = dict(batch=batch, d_model=d_model, ffn=ffn, widths=name, mean_width=mean_fraction)
        with torch.no_grad(), fk.skip_width_value_checks():
            for backend in backends:
                def call(backend=backend):
                    with fk.use_backend(backend):
                        fk.elastic_mlp_decode(x, w_up, w_down, width=widths, w_gate=w_gate)

                row[f"{backend}_us"] = time_ms(graph_replay(call)) * 1e3
            dense = [w[:widest].contiguous() for w in (w_gate, w_up)] + [w_down[:, :widest].contiguous()]
            row["cublas_dense_us"] = time_ms(graph_replay(lambda: dense_mlp(x, *dense))) * 1e3
        weight_bytes = 3 * d_model * widest * x.element_size()
        row["weight_mib"] = weight_bytes / 2**20
        for key in [k for k in row if k.endswith("_us")]:
            row[key.replace("_us", "_bw_vs_copy")] = weight_bytes / (row[key] * 1e-6) / 1e12 / copy_tbps
        row["fused_vs_cublas_dense"] = row[f"{backends[0]}_us"] / row["cublas_dense_us"]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, batches 1 and 16 only")
    parser.add_argument("--out", default="benchmarks/results/elastic_mlp_decode.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    backends = ["cuda", "triton", "torch"]
    if device.type == "cpu":
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        configs, dtype, backends = [(1, 64, 96), (4, 64, 96)], torch.float32, ["torch"]
    else:
        ffns = (11008,) if args.quick else (11008, 14336)
        batches = (1, 16) if args.quick else (1, 16, 64)
        configs = [(b, 4096, f) for f in ffns for b in batches]
        if not fk.build_info()["extension_build"] or not fk.build_info()["extension_build"]["cuda"]:
            backends.remove("cuda")

    copy_tbps = copy_bandwidth_tbps(device)
    rows = []
    for batch, d_model, ffn in configs:
        print(f"  B={batch} D={d_model} F={ffn}", file=sys.stderr, flush=True)
        rows += cases(batch, d_model, ffn, dtype, device, copy_tbps, backends)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"ceiling: copy {copy_tbps:.2f} TB/s")
    columns = ["batch", "ffn", "widths", "weight_mib"] + [f"{b}_us" for b in backends] + ["cublas_dense_us"]
    columns += [f"{b}_bw_vs_copy" for b in backends] + ["cublas_dense_bw_vs_copy", "fused_vs_cublas_dense"]
    print(format_table(rows, columns))
    first = backends[0]
    target_rows = [r for r in rows if r["batch"] == 1 or (r["batch"] == 16 and r["widths"] == "mixed")]
    summary = {
        "backend": first,
        "bw_vs_copy_min_batch1_and_mixed16": min(r[f"{first}_bw_vs_copy"] for r in target_rows),
        "bw_vs_copy_min": min(r[f"{first}_bw_vs_copy"] for r in rows),
        "fused_vs_cublas_dense_max": max(r["fused_vs_cublas_dense"] for r in rows),
    }
    print("summary:", summary)
    payload = dict(
        benchmark="elastic_mlp_decode", dtype=str(dtype), ceilings=dict(copy_tbps=copy_tbps), summary=summary, rows=rows
    )
    path = write_results(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
