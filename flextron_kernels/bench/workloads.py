"""Benchmark workloads: model shapes and per-token width mixes."""

from __future__ import annotations

import torch

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MIXES = ("uniform", "all25", "all100", "skewed")

# d_model, ffn of the MLPs the issues' targets are stated for.
MLP_SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}


def width_of(size: int, fraction: float) -> int:
    """``fraction`` of ``size``, rounded to a multiple of 128 where the size allows."""
    return int(round(size * fraction / 128)) * 128 if size >= 512 else int(size * fraction)


def mixed_widths(size: int, count: int, mix: str, device, seed: int = 0) -> torch.Tensor:
    """``[count]`` int64 widths: ``uniform`` over 25/50/75/100%, ``all25``, ``all100``, or
    ``skewed`` (70% of tokens at 25%, the rest spread over the other three)."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([width_of(size, f) for f in FRACTIONS])
    if mix == "uniform":
        index = torch.randint(0, 4, (count,), generator=gen)
    elif mix == "all25":
        index = torch.zeros(count, dtype=torch.int64)
    elif mix == "all100":
        index = torch.full((count,), 3, dtype=torch.int64)
    elif mix == "skewed":
        index = torch.where(torch.rand(count, generator=gen) < 0.7, 0, torch.randint(1, 4, (count,), generator=gen))
    else:
        raise ValueError(f"mix: expected one of {', '.join(MIXES)}, got {mix!r}")
    return choices[index].to(device)


def width_groups(widths: torch.Tensor):
    """``(width, token indices)`` for each distinct width, the torch bucketed-loop baselines'
    grouping (one host sync)."""
    values, counts = torch.unique(widths, return_counts=True)
    order = torch.argsort(widths)
    start = 0
    for width, count in zip(values.tolist(), counts.tolist()):
        yield width, order[start : start + count]
        start += count


def routed_tile_work(widths: torch.Tensor, size: int, block_m: int, block: int) -> float:
    """The work a routed matmul does on per-token ``widths`` (in ``[0, size]``), relative to
    every token at its own width (1.0: none wasted). Its row tiles are ``block_m``
    consecutive tokens of the width-sorted order, each run to its largest width rounded up
    to ``block`` (the output tile, or the reduction step, along the routed axis)."""
    from flextron_kernels import reference
    from flextron_kernels.ops.routing import default_boundaries

    widths = widths.reshape(-1).cpu()
    used = float(widths.sum())
    if used == 0:
        return 1.0
    order = reference.routing_metadata(widths, default_boundaries(max(size, 1), "cpu"), block_m).sorted_token_idx
    tiles = torch.nn.functional.pad(widths[order.long()], (0, -len(widths) % block_m)).view(-1, block_m)
    tile_widths = (tiles.amax(dim=1) + block - 1) // block * block
    return float(tile_widths.sum()) * block_m / used
