"""Kernel breakdown: which kernels each op call launches and the GPU time of each, for the
cases whose speed targets are not met yet (torch.profiler's CUDA activity, per op call,
after warm-up), and optionally Nsight Compute's view of the same kernels.

Each row: a case, a kernel (name shortened), launches per op call, microseconds per op
call, and its share of the case's GPU time; a second table sets each case's kernel time
beside its elapsed time per call (calls back to back), which shows a host-bound case. With ``--ncu`` (on a machine whose ``ncu``
can read the hardware counters), each case also runs once under Nsight Compute (clocks
left alone), and the rows gain its throughput, occupancy and stall figures.

Usage: ``python benchmarks/bench_kernel_breakdown.py [--quick] [--ncu] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import torch

import flextron_kernels as fk
from flextron_kernels.bench.measure import compile_only, format_table, write_results
from flextron_kernels.bench.workloads import mixed_widths

# Nsight Compute metrics kept per kernel (its "details" page names), by short column name.
NCU_METRICS = {
    "Duration": "ncu_us",
    "DRAM Throughput": "dram_pct",
    "Compute (SM) Throughput": "sm_pct",
    "Achieved Occupancy": "occupancy_pct",
    "Registers Per Thread": "regs",
    "Waves Per SM": "waves",
}


def cases(device: torch.device, quick: bool) -> dict:
    """``{name: call}``: each call runs one op call (inputs built once)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    d_model, ffn, tokens = (4096, 11008, 4096) if gpu else (64, 256, 64)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    up = fk.ElasticLinear(d_model, ffn, bias=False, device=device, dtype=dtype).requires_grad_(False)
    trained_up = fk.ElasticLinear(d_model, ffn, bias=False, device=device, dtype=dtype)
    mlp = fk.ElasticMLP(d_model, ffn, gated=True, device=device, dtype=dtype).requires_grad_(False)
    x = randn(tokens, d_model)
    dy = randn(tokens, ffn)
    small = tokens // 8
    uniform = mixed_widths(ffn, tokens, "uniform", device)
    skewed = mixed_widths(ffn, tokens, "skewed", device)
    decode_rows = 16

    def linear_fwd_bwd(rows, widths):
        x_rows = x[:rows].clone().requires_grad_()  # a leaf of its own: no slice in the backward

        def call():
            trained_up(x_rows, out_features=widths[:rows]).backward(dy[:rows])

        return call

    found = {
        f"linear per-token out widths, {tokens} tokens": lambda: up(x, out_features=uniform),
        # Measured 2.8x the ideal (skewed) and 10-24x (16 tokens) forward and backward.
        f"linear per-token out widths, skewed, forward and backward, {tokens} tokens": linear_fwd_bwd(tokens, skewed),
        f"linear per-token out widths, forward and backward, {decode_rows} tokens": linear_fwd_bwd(
            decode_rows, uniform),
        f"mlp uniform mix, {tokens} tokens": lambda: mlp(x, width=uniform),
        f"mlp uniform mix, {small} tokens": lambda: mlp(x[:small], width=uniform[:small]),
    }
    if quick:
        return found
    heads_q, heads_kv, head_dim, batch, seq = (32, 8, 128, 8, 2048) if gpu else (4, 2, 16, 2, 32)
    q = randn(batch * seq, heads_q, head_dim).requires_grad_()
    k = randn(batch * seq, heads_kv, head_dim).requires_grad_()
    v = randn(batch * seq, heads_kv, head_dim).requires_grad_()
    cu = torch.arange(0, batch * seq + 1, seq, device=device, dtype=torch.int32)
    dout = torch.randn_like(q)

    def attention_fwd_bwd():
        fk.elastic_attention(q, k, v, heads=heads_q, cu_seqlens=cu).backward(dout)

    kv_len = 32768 if gpu else 64
    k_cache, v_cache = randn(1, heads_kv, kv_len, head_dim), randn(1, heads_kv, kv_len, head_dim)
    q1 = randn(1, heads_q, head_dim)
    lens = torch.full((1,), kv_len, device=device, dtype=torch.int32)
    x1 = x[:1]
    w_gate, w_up, w_down = (p.detach() for p in (mlp.w_gate, mlp.w_up, mlp.w_down))
    found.update({
        f"attention forward and backward, {batch}x{seq} tokens": attention_fwd_bwd,
        f"decode attention, 1 request, {kv_len} cached": lambda: fk.elastic_attention_decode(
            q1, k_cache, v_cache, cache_seqlens=lens, heads=heads_q),
    })
    backends = ("cuda", "triton") if gpu and fk.build_info()["backends"]["cuda"] else ("triton",) if gpu else ("torch",)
    for backend in backends:
        for fraction in (0.25, 1.0):
            width = int(ffn * fraction)

            def decode_mlp(backend=backend, width=width):
                with fk.use_backend(backend):
                    fk.elastic_mlp_decode(x1, w_up, w_down, width=torch.full((1,), width, device=device), w_gate=w_gate)

            found[f"decode mlp ({backend}), 1 token, {int(fraction * 100)}% width"] = decode_mlp
    return found


def _short(name: str) -> str:
    name = name.split("(")[0].split("<")[0].strip()
    return name if len(name) <= 60 else name[:57] + "..."


def elapsed_us(call, device: torch.device, calls: int) -> float:
    """Wall time per call over ``calls`` back-to-back calls (CUDA events on a GPU): beside the
    kernels' own time it shows how long the GPU waits on the host."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / calls * 1e3


def breakdown(call, device: torch.device, calls: int) -> list[dict]:
    """``[{kernel, launches, us}]`` per op call, from ``calls`` profiled calls after warm-up."""
    for _ in range(3):
        call()
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    if device.type == "cuda":
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0, 0.0])
    for event in prof.key_averages():
        if device.type == "cuda":
            spent = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:  # a CPU smoke run: the aten ops' own time stands in for kernels
            spent = event.self_cpu_time_total
            if not event.key.startswith("aten::"):
                continue
        if spent <= 0:
            continue
        entry = per_kernel[_short(event.key)]
        entry[0] += event.count
        entry[1] += spent
    return [dict(kernel=name, launches=count / calls, us=total / calls) for name, (count, total) in per_kernel.items()]


def ncu_rows(case: str, args) -> tuple[list[dict], str | None]:
    """Nsight Compute's figures for one call of ``case`` (after warm-up), or why there are none."""
    tool = shutil.which("ncu")
    if tool is None:
        return [], "ncu not found"
    command = [tool, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "details",
               "--print-units", "base",
               "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "LaunchStats",
               sys.executable, os.path.abspath(__file__), "--ncu-case", case] + (["--quick"] if args.quick else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"ncu failed: {error}"
    lines = [line for line in done.stdout.splitlines() if line.startswith('"')]
    if done.returncode != 0 or not lines:
        return [], f"ncu failed (exit {done.returncode}): {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    figures = defaultdict(dict)
    for record in csv.DictReader(io.StringIO("\n".join(lines))):
        column = NCU_METRICS.get(record.get("Metric Name", ""))
        if column is None:
            continue
        key = (record.get("ID"), _short(record.get("Kernel Name", "?")))
        value = record.get("Metric Value", "").replace(",", "")
        try:  # base units: durations in nanoseconds
            figures[key][column] = float(value) * (1e-3 if column == "ncu_us" else 1.0)
        except ValueError:
            continue
    return [dict(case=case, kernel=name, **values) for (_, name), values in figures.items()], None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the linear and MLP cases only")
    parser.add_argument("--ncu", action="store_true", help="also run each case under Nsight Compute")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per case")
    parser.add_argument("--out", default="benchmarks/results/kernel_breakdown.json")
    parser.add_argument("--ncu-case", help=argparse.SUPPRESS)  # inside ncu: one call of this case
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = cases(device, args.quick)
    if args.ncu_case:
        call = found[args.ncu_case]
        with torch.no_grad() if "backward" not in args.ncu_case else torch.enable_grad():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            call()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return 0
    if compile_only():  # a pass that only compiles the kernels (see flextron_kernels.bench.measure)
        with fk.skip_width_value_checks():
            for case, call in found.items():
                with torch.enable_grad() if "backward" in case else torch.no_grad():
                    call()
        return 0
    if device.type == "cpu":
        print("no GPU: a CPU smoke run (aten ops stand in for kernels; times are not meaningful)", file=sys.stderr)
    rows, ncu_status = [], {}
    columns = ["case", "kernel", "launches", "us", "share"]
    if args.ncu and device.type == "cuda":
        columns += list(NCU_METRICS.values())

    elapsed = {}

    def save():
        totals = defaultdict(float)
        for row in rows:
            totals[row["case"]] += row["us"]
        summary = {"cases": len(totals), "kernels": len(rows)}
        return write_results(args.out, dict(benchmark="kernel_breakdown", device_type=device.type, summary=summary,
                                            gpu_us_per_call=dict(totals), elapsed_us_per_call=elapsed,
                                            ncu_status=ncu_status, rows=rows))

    with fk.skip_width_value_checks():
        for case, call in found.items():
            print(f"  {case}", file=sys.stderr, flush=True)
            grad = torch.enable_grad() if "backward" in case else torch.no_grad()
            with grad:
                kernels = breakdown(call, device, args.calls)
                elapsed[case] = elapsed_us(call, device, args.calls)
            total = sum(k["us"] for k in kernels) or 1.0
            mine = [dict(case=case, **k, share=k["us"] / total) for k in sorted(kernels, key=lambda k: -k["us"])]
            if args.ncu and device.type == "cuda":
                extra, ncu_status[case] = ncu_rows(case, args)
                by_kernel = {}
                for row in extra:
                    by_kernel.setdefault(row["kernel"], row)
                for row in mine:
                    row.update({c: by_kernel.get(row["kernel"], {}).get(c) for c in NCU_METRICS.values()})
            rows.extend(mine)
            save()  # after each case: a run cut short keeps what it measured
    print(format_table(rows, columns))
    kernel_us = defaultdict(float)
    for row in rows:
        kernel_us[row["case"]] += row["us"]
    # Elapsed well above the kernels' sum: the GPU idles, waiting on the host.
    print(format_table([dict(case=case, kernels_us=kernel_us[case], elapsed_us=us, kernels_share=kernel_us[case] / us)
                        for case, us in elapsed.items()], ["case", "kernels_us", "elapsed_us", "kernels_share"]))
    for case, status in ncu_status.items():
        if status:
            print(f"ncu, {case}: {status}")
    print(f"wrote {save()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
