"""Row-routed matmul with a fused epilogue.

``C[t, j] = epilogue(sum_{r < red_t} A[t, r] * B[j, r])`` for ``j < out_t``, exact zeros
for ``j >= out_t``. Each row (token) has its own output width ``out_t`` and reduction
width ``red_t``. The epilogue, chosen by constexpr flags, is, in order:
``* row_scale[t]``, ``+ bias[j]``, then for an MLP's first layer
``act(A @ B2.T) * (.)`` (gated, ``B2`` the gate weight) or ``act(.)``, and finally
``+ C[t, j]`` (accumulate). The pre-activation values can be stored on the side for
the backward pass.

One kernel serves:
- elastic linear forward (``A = x``, ``B = W``) and input gradient (``A = dy``,
  ``B = W.T`` given as strides);
- the MLP's fused gate/up/activation (``A = x``, ``B = W_up``, ``B2 = W_gate``) and its
  down projection (``A = h``, ``B = W_down``, row scale, bias).

With routing metadata (``ROUTED``), a program's rows are ``BLOCK_M`` consecutive
tokens of the width-sorted order: rows are gathered through ``sorted_token_idx`` on
load and scattered on store (no permuted copy), and the reduction loop and the output
columns stop at the tile's own largest widths, so work outside every row's prefix is
skipped. Tiles run on across group boundaries rather than starting afresh at each
group: a group's last, partly filled tile would cost a whole tile at that group's
width, whereas a tile that straddles two groups costs its first rows only the
difference to the next width (with sorted rows, never more tile work in total, and
no empty tile slots in the launch).

``B`` (and ``B2``) can come as TMA tensor descriptors (``B_TMA``, Hopper and later):
one thread's bulk copy per tile instead of every thread's 16-byte copies and their
address arithmetic. ``A``'s rows are gathered, so they keep per-thread copies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flextron_kernels.triton.activations import apply_activation
from flextron_kernels.triton.tma import TensorDescriptor, tma_ready


@triton.jit
def _load_b_tile(b, col0, cols64, col_in_b, r0, r, red_limit, stride_bj, stride_br,
                 B_TMA: tl.constexpr, B_TRANSPOSED: tl.constexpr):
    """``B[col0 : col0 + BLOCK_N, r0 : r0 + BLOCK_K].T``, a ``[BLOCK_K, BLOCK_N]`` tile, zeros
    past ``out_limit`` and ``red_limit`` (a descriptor's shape, or the masks). ``b``: a
    pointer, or with ``B_TMA`` a descriptor over B's storage, ``[out_limit, red_limit]``
    or, ``B_TRANSPOSED`` (B is a matrix's transpose), ``[red_limit, out_limit]``."""
    if B_TMA:
        if B_TRANSPOSED:
            tile = b.load([r0, col0])
        else:
            tile = tl.trans(b.load([col0, r0]))
    else:
        tile = tl.trans(tl.load(b + cols64[:, None] * stride_bj + r[None, :] * stride_br,
                                mask=col_in_b[:, None] & (r[None, :] < red_limit), other=0.0))
    return tile


@triton.jit
def _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, col0, cols64, col_in_b, red_w, red_start, red_end,
            red_limit, stride_at, stride_ar, stride_bj, stride_br, stride_b2j, stride_b2r,
            MASK_ROW_WIDTHS: tl.constexpr, GATED: tl.constexpr, B_TMA: tl.constexpr, B_TRANSPOSED: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc += A[rows, r] @ B[cols, r].T`` (and ``acc2`` with ``B2`` when gated) over
    ``red_start <= r < red_end``; with ``MASK_ROW_WIDTHS``, ``A[t, r]`` counts only for
    ``r < red_w[t]``."""
    for r0 in range(red_start, red_end, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        # Loads are masked by the launch-time limits only, which keeps them vectorised
        # and pipelined; each row's own reduction width is applied in registers.
        a = tl.load(
            a_ptr + rows[:, None] * stride_at + r[None, :] * stride_ar,
            mask=row_mask[:, None] & (r[None, :] < red_limit),
            other=0.0,
        )
        if MASK_ROW_WIDTHS:
            a = tl.where(r[None, :] < red_w[:, None], a, 0.0)
        b = _load_b_tile(b_ptr, col0, cols64, col_in_b, r0, r, red_limit, stride_bj, stride_br, B_TMA, B_TRANSPOSED)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if GATED:
            b2 = _load_b_tile(b2_ptr, col0, cols64, col_in_b, r0, r, red_limit, stride_b2j, stride_b2r, B_TMA,
                              B_TRANSPOSED)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
    return acc, acc2


@triton.jit
def routed_matmul_kernel(
    a_ptr, b_ptr, b2_ptr, bias_ptr, row_scale_ptr, c_ptr, pre_ptr, pre2_ptr,
    out_widths_ptr, red_widths_ptr,
    sorted_token_idx_ptr,
    num_rows, num_row_blocks, out_size, out_limit, red_limit,
    stride_at, stride_ar,
    stride_bj, stride_br,
    stride_b2j, stride_b2r,
    stride_ct, stride_cj,
    ROUTED: tl.constexpr,
    HAS_OUT_WIDTHS: tl.constexpr,
    HAS_RED_WIDTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    B_TMA: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
):
    """Shapes: ``A [num_rows, >= red]``, ``B`` and ``B2 [>= out_limit, >= red]`` (any
    strides), ``C [num_rows, out_size]`` and, with ``STORE_PRE``, ``pre`` (``B``'s
    pre-activation) and ``pre2`` (``B2``'s) laid out like ``C``. ``out_limit <= out_size``
    bounds every ``out_t``, ``red_limit`` every ``red_t``. Widths are integer ``[num_rows]``.
    With ``B_TMA``, ``b_ptr`` and ``b2_ptr`` are tensor descriptors (see :func:`_load_b_tile`)
    with blocks ``[BLOCK_N, BLOCK_K]`` (``[BLOCK_K, BLOCK_N]`` when ``B_TRANSPOSED``).
    One-dimensional grid of ``num_row_blocks * cdiv(out_size, BLOCK_N)`` programs.
    """
    # Consecutive programs sweep GROUP_M row tiles per column block, so that the row
    # tiles' A stays in L2 while the column blocks go by (large T would evict it).
    pid = tl.program_id(0)
    programs_per_group = GROUP_M * tl.cdiv(out_size, BLOCK_N)
    first_row_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    pid_m = first_row_block + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = positions < num_rows
    if ROUTED:
        rows = tl.load(sorted_token_idx_ptr + positions, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = positions.to(tl.int64)

    if HAS_OUT_WIDTHS:
        out_w = tl.load(out_widths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    else:
        out_w = tl.where(row_mask, out_limit, 0)
    if HAS_RED_WIDTHS:
        red_w = tl.load(red_widths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    else:
        red_w = tl.where(row_mask, red_limit, 0)
    tile_out = tl.max(out_w, axis=0)
    tile_red = tl.max(red_w, axis=0)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Column blocks past every row's output width only store zeros.
    if pid_n * BLOCK_N < tile_out:
        col_in_b = cols < out_limit
        # Reduction blocks below every row's own width need no per-row mask, and A
        # masked in registers could not feed the tensor cores straight from shared
        # memory: those blocks run first, unmasked, and only the tile's tail is masked.
        if HAS_RED_WIDTHS:
            common_red = tl.min(tl.where(row_mask, red_w, tile_red), axis=0) // BLOCK_K * BLOCK_K
        else:
            common_red = tile_red
        col0 = pid_n * BLOCK_N
        acc, acc2 = _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, col0, cols64, col_in_b, red_w,
                            0, common_red, red_limit, stride_at, stride_ar, stride_bj, stride_br, stride_b2j,
                            stride_b2r, False, GATED, B_TMA, B_TRANSPOSED, INPUT_PRECISION, BLOCK_K)
        if HAS_RED_WIDTHS:
            acc, acc2 = _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, col0, cols64, col_in_b, red_w,
                                common_red, tile_red, red_limit, stride_at, stride_ar, stride_bj, stride_br,
                                stride_b2j, stride_b2r, True, GATED, B_TMA, B_TRANSPOSED, INPUT_PRECISION, BLOCK_K)
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * row_scale[:, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_in_b, other=0.0)
            acc += bias[None, :].to(tl.float32)

    used = cols[None, :] < out_w[:, None]
    store_mask = row_mask[:, None] & (cols[None, :] < out_size)
    c_offsets = rows[:, None] * stride_ct + cols[None, :] * stride_cj
    if STORE_PRE:
        tl.store(pre_ptr + c_offsets, tl.where(used, acc, 0.0).to(pre_ptr.dtype.element_ty), mask=store_mask)
        if GATED:
            tl.store(pre2_ptr + c_offsets, tl.where(used, acc2, 0.0).to(pre2_ptr.dtype.element_ty), mask=store_mask)
    if GATED:
        acc = apply_activation(acc2, ACTIVATION) * acc
    else:
        acc = apply_activation(acc, ACTIVATION)
    result = tl.where(used, acc, 0.0)
    if ACCUMULATE:
        result += tl.load(c_ptr + c_offsets, mask=store_mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_offsets, result.to(c_ptr.dtype.element_ty), mask=store_mask)


def _b_descriptor(t, strides, out_limit, red_limit, block_n, block_k):
    """A descriptor over ``B [out_limit, red_limit]`` addressed as ``t`` with ``strides``,
    laid out as stored (see :func:`_load_b_tile`), and whether B is stored transposed."""
    if strides[1] == 1:
        return TensorDescriptor(t, [out_limit, red_limit], [strides[0], 1], [block_n, block_k]), False
    return TensorDescriptor(t, [red_limit, out_limit], [strides[1], 1], [block_k, block_n]), True


def routed_matmul(
    a, a_strides, b, b_strides, bias, out, *, out_widths, red_widths, out_limit, red_limit, routing, config,
    gate=None, gate_strides=None, activation="none", row_scale=None, pre_out=None, gate_pre_out=None,
    accumulate=False,
):
    """Launch :func:`routed_matmul_kernel` writing every element of ``out [T, out_size]``.

    ``a`` / ``b`` / ``gate`` are tensors addressed with the given strides
    (``b_strides = (stride along j, stride along r)``, so ``W.T`` is ``W`` with its
    strides swapped). ``routing`` is a RoutingMetadata (of any block size: only its
    token order is used), or None for rows in their own order.
    ``pre_out`` / ``gate_pre_out`` (like ``out``), when given, receive the
    pre-activation values of ``b`` / ``gate``. ``config``: the tiles, and ``B_TMA``
    (optional): read ``b`` and ``gate`` through TMA descriptors where they allow it
    (:func:`~flextron_kernels.triton.tma.tma_ready`; both stored alike), with pointers otherwise.
    """
    num_rows, out_size = out.shape
    if num_rows == 0 or out_size == 0:
        return out
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_row_blocks = triton.cdiv(num_rows, block_m)
    gated = gate is not None
    if gated:
        assert gate_strides is not None
    store_pre = pre_out is not None
    for t in (pre_out, gate_pre_out if gated else None):
        if t is not None:
            assert t.shape == out.shape and t.stride() == out.stride()

    def opt(t):
        return t if t is not None else out

    tiles = {key: value for key, value in config.items() if key != "B_TMA"}
    b_arg, gate_arg, b_transposed = b, opt(gate), False
    operands = ((b, b_strides), (gate, gate_strides)) if gated else ((b, b_strides),)
    b_tma = (config.get("B_TMA", False) and out_limit > 0 and red_limit > 0
             and all(tma_ready(t, strides) for t, strides in operands)
             and (not gated or (b_strides[1] == 1) == (gate_strides[1] == 1)))
    if b_tma:
        block_k = config["BLOCK_K"]
        b_arg, b_transposed = _b_descriptor(b, b_strides, out_limit, red_limit, block_n, block_k)
        if gated:
            gate_arg, _ = _b_descriptor(gate, gate_strides, out_limit, red_limit, block_n, block_k)

    grid = (num_row_blocks * triton.cdiv(out_size, block_n),)
    routed_matmul_kernel[grid](
        a, b_arg, gate_arg, opt(bias), opt(row_scale), out, opt(pre_out), opt(gate_pre_out),
        opt(out_widths), opt(red_widths),
        routing.sorted_token_idx if routing is not None else out,
        num_rows, num_row_blocks, out_size, out_limit, red_limit,
        a_strides[0], a_strides[1],
        b_strides[0], b_strides[1],
        *(gate_strides if gated else (0, 0)),
        out.stride(0), out.stride(1),
        ROUTED=routing is not None,
        HAS_OUT_WIDTHS=out_widths is not None,
        HAS_RED_WIDTHS=red_widths is not None,
        HAS_BIAS=bias is not None,
        HAS_ROW_SCALE=row_scale is not None,
        GATED=gated,
        ACTIVATION=activation,
        STORE_PRE=store_pre,
        ACCUMULATE=accumulate,
        B_TMA=b_tma,
        B_TRANSPOSED=b_transposed,
        **tiles,
    )
    return out
