"""Capturing a decode step in a CUDA graph (used by ``generate``, the serving loop and the
benchmarks).

A decode step issues a few dozen small kernels; replayed from a graph, it costs their GPU
time instead of the Python and launch time of issuing them one by one.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from flextron_kernels.ops.checks import skip_width_value_checks


def record(fn: Callable[[], object], *, pool=None) -> tuple:
    """``(graph, output)``: ``fn`` captured in a CUDA graph on a stream of its own; its
    replays rewrite ``output`` (what ``fn`` returns). Raises what the capture raises.

    ``fn`` must have run eagerly on these inputs before (its kernels compiled), and must
    not depend on host values that change between replays. Width value checks are
    skipped inside the capture (each would be a host sync): the caller checked its
    inputs once."""
    graph = torch.cuda.CUDAGraph()
    capturing = torch.cuda.graph(graph, pool=pool)  # its one capture stream: graphs sharing a pool reuse memory
    # The outer stream context restores the caller's stream even when the capture fails:
    # torch.cuda.graph leaves its capture stream current when ending the capture raises.
    with torch.cuda.stream(capturing.capture_stream), skip_width_value_checks(), capturing:
        output = fn()
    return graph, output


def capture(fn: Callable[[], object], *, what: str, pool=None) -> Optional[tuple]:
    """:func:`record`, or None with a warning naming ``what`` when ``fn`` cannot be
    captured (the caller then runs it eagerly)."""
    try:
        return record(fn, pool=pool)
    except RuntimeError as err:
        warnings.warn(f"{what} runs eagerly: CUDA graph capture failed ({err})")
        return None
