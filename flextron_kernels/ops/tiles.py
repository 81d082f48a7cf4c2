"""Tile configurations of the Triton kernels on a GPU, in one place.

Each kernel family has a default per data type. For 16-bit data the defaults give way
to a table measured on the device (``tuned_tiles.json`` beside this
file, keyed by ``torch.cuda.get_device_name``, written by ``benchmarks/tune_tiles.py``),
and :func:`override_tiles` replaces either inside a block (that script's sweep).

Families: ``matmul`` (the routed matmul: linear forward and input gradient, the MLP's
down projection and input gradient), ``matmul_small`` (the same over at most
``SMALL_ROWS`` rows), ``matmul_gated`` (the MLP's fused gate and up projections; it
takes the ``BLOCK_M`` of ``matmul`` or ``matmul_small``),
``matmul_decode`` (the routed matmul over at most 64 rows, one row tile), ``weight_grad``
(the prefix weight gradient), ``attention_fwd``, and the backward's two kernels
``attention_bwd_dq`` (a tile of queries over steps of keys) and ``attention_bwd_dkdv``
(a tile of keys over steps of queries), and ``attention_decode`` (the split-KV decode
kernel).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from pathlib import Path
from typing import Iterator

import torch

from flextron_kernels.backends import device_index

FAMILIES = ("matmul", "matmul_small", "matmul_gated", "matmul_decode", "weight_grad", "attention_fwd", "attention_bwd_dq",
            "attention_bwd_dkdv", "attention_decode")
# The families of the routed matmul kernel (they share its options, such as B_TMA).
MATMUL_FAMILIES = ("matmul", "matmul_small", "matmul_gated", "matmul_decode")
TUNED_TABLE = Path(__file__).with_name("tuned_tiles.json")
ATTENTION_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
# Row counts up to this use the decode tiles (``matmul_decode``).
DECODE_ROWS = 64
# Row counts up to this (and above DECODE_ROWS) use ``matmul_small``.
SMALL_ROWS = 1024

# Defaults for 16-bit data on Hopper: 128x128 output tiles with 64-wide reduction steps
# keep three pipeline stages of both operands within shared memory.
_DEFAULTS_16BIT = {
    # B_TMA: the weight tiles through TMA descriptors (not yet timed: off unless the tile
    # sweep picks it).
    "matmul": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, B_TMA=False),
    # Few rows: 128x256 tiles would leave SMs idle (512 rows x a 4096-wide output is 64
    # of them) and a group of tokens just over a tile would pay for a second, nearly
    # empty one; 64x128 tiles give 512 programs there.
    "matmul_small": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, B_TMA=False),
    "matmul_gated": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, B_TMA=False),
    # BLOCK_M follows the row count (16, 32 or 64).
    "matmul_decode": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, B_TMA=False),
    "weight_grad": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    # BLOCK_N must divide BLOCK_M in the forward and dq kernels: they rely on key blocks
    # ending at query-tile starts. OVERLAP (the next key block's scores computed during this
    # block's softmax) takes up to 254 registers at head dim 128 and spills none on sm_90.
    # KV_TMA (here and in the dq kernel): keys and values through TMA descriptors (not yet
    # timed: off unless the tile sweep picks it).
    "attention_fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, OVERLAP=True, KV_TMA=False),
    # Backward, as flash attention 2's Triton kernels: a large tile of the accumulated side
    # (queries for dq, keys for dk/dv) and short steps of the other. For head dim 128 in
    # bf16 these are the largest sm_90 builds without register spills
    # (scripts/compile_triton_kernels.py reports them).
    "attention_bwd_dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, KV_TMA=False),
    "attention_bwd_dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    # Decode attention's split kernel (head dims up to 128): BLOCK_N cache positions per
    # step, and splits enough for PROGRAMS_PER_SM programs per SM over the (request, KV
    # head) pairs (a program takes ~128 registers x 4 warps, so 4 fit per SM: 8 is about
    # two resident waves).
    "attention_decode": dict(BLOCK_N=64, PROGRAMS_PER_SM=8, num_warps=4, num_stages=2),
}


# Head dims above 128 (BLOCK_D 256): the tiles above would pass shared memory (the forward
# at three stages) or spill registers; these do neither on sm_90 (the forward would, a
# little, with KV_TMA). Tuned tables apply up to head dim 128, where they are measured.
WIDE_HEAD_TILES_16BIT = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2, OVERLAP=False, KV_TMA=False),
    "bwd_dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, KV_TMA=False),
    "bwd_dkdv": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
}


def wide_head_tiles(kernel: str, window: bool = False) -> dict:
    """16-bit tiles of an attention kernel for head dims above 128; ``window``: with a
    sliding window, whose masked steps take more registers (the dq kernel's 32-key steps
    would spill on sm_90; 16-key steps do not)."""
    config = dict(WIDE_HEAD_TILES_16BIT[kernel])
    if window and kernel == "bwd_dq":
        config["BLOCK_N"] = 16
    return config


def attention_fp32_tiles(kernel: str, precision: str, *, wide_head: bool = False) -> dict:
    """Tiles of an attention kernel (``fwd``, ``bwd_dq``, ``bwd_dkdv``) for fp32 operands,
    at ``precision`` (``tf32`` or ``ieee``), for head dims up to 128 or above
    (``wide_head``). Twice the bytes of 16-bit ones: smaller tiles keep within shared
    memory, and 8 warps keep them in registers (at 4 warps every kernel spilled). Exact
    fp32 runs on the FMA units, where the dk/dv kernel needs short query steps not to spill."""
    exact_dkdv = kernel == "bwd_dkdv" and precision == "ieee"
    if wide_head:
        block_m, block_n = (16, 32) if exact_dkdv else (32, 16)
    else:
        block_m, block_n = (16 if exact_dkdv else 64), 32
    # The forward's OVERLAP holds two blocks of scores at once: fp32 tiles would spill.
    overlap = dict(OVERLAP=False) if kernel == "fwd" else {}
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8, num_stages=2, **overlap)


_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("flextron_tile_overrides", default={})


@contextlib.contextmanager
def override_tiles(**families: dict) -> Iterator[None]:
    """Inside the block, ``family=config`` updates that family's GPU tiles for 16-bit
    data (whatever the tuned table holds), e.g.
    ``override_tiles(matmul=dict(BLOCK_N=256, num_stages=4))``. On the CPU (the Triton
    interpreter) the overrides of the matmul and attention families apply too, over its
    small tiles."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"override_tiles: expected families among {', '.join(FAMILIES)}, got {sorted(unknown)}")
    token = _overrides.set({**_overrides.get(), **families})
    try:
        yield
    finally:
        _overrides.reset(token)


@functools.lru_cache(maxsize=None)
def _tuned(device_name: str) -> dict:
    return _tuned_devices().get(device_name, {})


def _tuned_devices() -> dict:
    """The tuned table: ``{device name: {family: tiles}}`` (empty when unreadable)."""
    try:
        return json.loads(TUNED_TABLE.read_text()).get("devices", {})
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _name(device: torch.device) -> str:
    return _device_name(device_index(device))


def has_tuned_tiles(family: str, device: torch.device) -> bool:
    """Whether the tuned table holds tiles of ``family`` for this GPU."""
    return device.type == "cuda" and family in _tuned(_name(device))


def _sixteen_bit(family: str, device: torch.device) -> dict:
    config = dict(_DEFAULTS_16BIT[family])
    config.update(_tuned(_name(device)).get(family, {}))
    config.update(_overrides.get().get(family, {}))
    return config


def input_precision(t: torch.Tensor) -> str:
    """``tl.dot``'s input precision for ``t``: exact ``ieee`` for fp32 when TF32 is off."""
    return "ieee" if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _row_tile(num_rows: int) -> int:
    """Short row tiles (16, 32, 64) for decode-sized batches."""
    return 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64


def _matmul_family(num_rows: int) -> str:
    return "matmul_decode" if num_rows <= DECODE_ROWS else "matmul_small" if num_rows <= SMALL_ROWS else "matmul"


def matmul_config(t: torch.Tensor, num_rows: int, *, gated: bool = False) -> dict:
    """Tiles for :func:`~flextron_kernels.triton.routed_matmul.routed_matmul` over
    ``num_rows`` rows of ``t``'s dtype; ``gated``: the MLP's fused gate and up projections."""
    precision = input_precision(t)
    if t.device.type == "cpu":
        # The Triton interpreter: small tiles keep it quick; overrides apply to them (so that
        # tests can run the kernel's options).
        family = _matmul_family(num_rows)
        config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4)
        config.update(_overrides.get().get(family, {}))
        if gated and family != "matmul_decode":  # its row tile stays its row count's, as on a GPU
            config.update({k: v for k, v in _overrides.get().get("matmul_gated", {}).items() if k != "BLOCK_M"})
        return dict(config, INPUT_PRECISION=precision)
    if t.dtype == torch.float32:
        block_m = _row_tile(num_rows)
        # fp32 tiles are twice the bytes: the gated kernel's two B tiles would not fit in
        # shared memory at BLOCK_K=64, and exact (ieee) fp32 runs on FMA units that spill
        # registers on wide tiles.
        if precision == "ieee":
            return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, INPUT_PRECISION=precision,
                        num_warps=4, num_stages=2)
        return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, INPUT_PRECISION=precision,
                    num_warps=8, num_stages=3)
    family = _matmul_family(num_rows)
    if family == "matmul_decode":
        return dict(_sixteen_bit(family, t.device), BLOCK_M=_row_tile(num_rows), INPUT_PRECISION=precision)
    config = _sixteen_bit(family, t.device)
    if gated:
        config = {**_sixteen_bit("matmul_gated", t.device), "BLOCK_M": config["BLOCK_M"]}
    return dict(config, INPUT_PRECISION=precision)


def weight_grad_config(t: torch.Tensor) -> dict:
    """Tiles for :func:`~flextron_kernels.triton.prefix_weight_grad.prefix_weight_grad_`."""
    precision = input_precision(t)
    if t.device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, INPUT_PRECISION=precision)
    if t.dtype == torch.float32:  # see matmul_config
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, INPUT_PRECISION=precision, num_warps=4, num_stages=2)
    return dict(_sixteen_bit("weight_grad", t.device), INPUT_PRECISION=precision)


def attention_config(t: torch.Tensor, kernel: str, *, window: bool = False) -> dict:
    """Tiles for an attention kernel: ``kernel`` is ``"fwd"``, ``"bwd_dq"`` or ``"bwd_dkdv"``
    (``BLOCK_M`` queries and ``BLOCK_N`` keys at a time); ``window``: for a sliding window."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    precision = input_precision(t)
    if t.device.type == "cpu":
        # Keys in two query steps: the dk/dv kernel's causal masking over several steps.
        block_n = 32 if kernel == "bwd_dkdv" else 16
        options = {"fwd": dict(OVERLAP=True, KV_TMA=False), "bwd_dq": dict(KV_TMA=False)}.get(kernel, {})
        config = dict(BLOCK_M=16, BLOCK_N=block_n, **options)
        config.update(_overrides.get().get(f"attention_{kernel}", {}))
        return dict(config, INPUT_PRECISION=precision)
    wide_head = t.shape[-1] > 128
    if t.dtype == torch.float32:
        return dict(attention_fp32_tiles(kernel, precision, wide_head=wide_head), INPUT_PRECISION=precision)
    if wide_head:
        return dict(wide_head_tiles(kernel, window), INPUT_PRECISION=precision)
    return dict(_sixteen_bit(f"attention_{kernel}", t.device), INPUT_PRECISION=precision)


def attention_decode_tiles(t: torch.Tensor) -> dict:
    """The ``attention_decode`` family's configuration for 16-bit data on ``t``'s GPU."""
    return _sixteen_bit("attention_decode", t.device)


def sixteen_bit_variants(family: str) -> dict:
    """Every 16-bit GPU configuration of ``family`` this package can launch: the default
    and each tuned GPU's, by name (for checks that compile them all)."""
    variants = {"default": dict(_DEFAULTS_16BIT[family])}
    for name, families in sorted(_tuned_devices().items()):
        if family in families:
            variants[name] = {**_DEFAULTS_16BIT[family], **families[family]}
    return variants
