"""Capturing a decode step in a CUDA graph (used by ``generate`` and the serving loop).

A decode step issues a few dozen small kernels; replayed from a graph, it costs their GPU
time instead of the Python and launch time of issuing them one by one.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from flextron_kernels.ops.checks import skip_width_value_checks


def capture(fn: Callable[[], torch.Tensor], *, what: str, pool=None) -> Optional[tuple]:
    """``(graph, output)``: ``fn`` captured in a CUDA graph, whose replays rewrite
    ``output`` (a tensor ``fn`` returns); None, with a warning naming ``what``, when ``fn``
    cannot be captured (the caller then runs it eagerly).

    ``fn`` must have run eagerly on these inputs before (its kernels compiled), and must
    not depend on host values that change between replays. Width value checks are
    skipped inside the capture (each would be a host sync): the caller checked its
    inputs once."""
    graph = torch.cuda.CUDAGraph()
    try:
        with skip_width_value_checks(), torch.cuda.graph(graph, pool=pool):
            output = fn()
    except RuntimeError as err:  # an op that cannot be captured: stay correct, run eagerly
        warnings.warn(f"{what} runs eagerly: CUDA graph capture failed ({err})")
        return None
    return graph, output
