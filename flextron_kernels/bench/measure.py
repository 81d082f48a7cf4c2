"""Timing, ceilings and result files shared by the benchmark scripts.

On a GPU, times are medians of ``triton.testing.do_bench`` (CUDA events, after
warm-up, L2 flushed between repeats). On a CPU (smoke runs only), a median of
wall-clock repeats. Every figure is meant to be reported beside a baseline measured
in the same run.

``FLEXTRON_BENCH_COMPILE_ONLY=1`` makes every timing call run its function a few times
untimed and return NaN: a pass that compiles every kernel a benchmark launches, so that
several benchmarks can fill the Triton cache in parallel before a timed run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from flextron_kernels.models.graphs import record


def compile_only() -> bool:
    """Whether this run only compiles kernels (``FLEXTRON_BENCH_COMPILE_ONLY=1``, see above)."""
    return os.environ.get("FLEXTRON_BENCH_COMPILE_ONLY", "") not in ("", "0")


def _untimed(fn: Callable[[], object], calls: int) -> float:
    for _ in range(calls):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return math.nan


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call of ``fn``."""
    if compile_only():
        return _untimed(fn, 2)
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(2):
        fn()
    samples = []
    deadline = time.perf_counter() + rep / 1000
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def time_fixed_ms(fn: Callable[[], object], *, calls: int, warmup: int = 3) -> float:
    """Median milliseconds of exactly ``warmup + calls`` calls of ``fn`` (for calls that
    change state, such as a decode step appending to its cache: the count is known)."""
    if compile_only():
        return _untimed(fn, warmup + calls)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1000)
    return statistics.median(samples)


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn``, or on a GPU the replay of a CUDA graph that captured one call of it (small
    calls take a few microseconds, below the cost of launching them from Python)."""
    if not torch.cuda.is_available():
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile kernels and settle the allocator outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph, _ = record(fn)
    return graph.replay


def copy_bandwidth_tbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (TB/s)."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e12


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """Dense ``size^3`` matmul rate (TFLOP/s)."""
    if device.type != "cuda":
        size, dtype = 512, torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def _cpu_name() -> str:
    """The host CPU's model name and the threads torch uses."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def environment() -> dict:
    """Device, versions and date, for every result file."""
    from flextron_kernels.backends import build_info

    info = build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info["device"],
        "cpu": _cpu_name(),
        "torch": info["torch"],
        "cuda": info["torch_cuda"],
        "triton": info["triton"],
        "flextron_kernels": info["version"],
        "extension": info["extension_build"],
        "python": platform.python_version(),
    }


def write_results(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) over ``columns``."""

    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
