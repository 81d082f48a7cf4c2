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
"""

from __future__ import annotations

import triton
import triton.language as tl

from flextron_kernels.triton.activations import apply_activation


@triton.jit
def _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, cols64, col_in_b, red_w, red_start, red_end, red_limit,
            stride_at, stride_ar, stride_bj, stride_br, stride_b2j, stride_b2r,
            MASK_ROW_WIDTHS: tl.constexpr, GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
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
        b_mask = col_in_b[:, None] & (r[None, :] < red_limit)
        b = tl.load(b_ptr + cols64[:, None] * stride_bj + r[None, :] * stride_br, mask=b_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        if GATED:
            b2 = tl.load(b2_ptr + cols64[:, None] * stride_b2j + r[None, :] * stride_b2r, mask=b_mask, other=0.0)
            acc2 = tl.dot(a, tl.trans(b2), acc2, input_precision=INPUT_PRECISION)
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
):
    """Shapes: ``A [num_rows, >= red]``, ``B`` and ``B2 [>= out_limit, >= red]`` (any
    strides), ``C [num_rows, out_size]`` and, with ``STORE_PRE``, ``pre`` (``B``'s
    pre-activation) and ``pre2`` (``B2``'s) laid out like ``C``. ``out_limit <= out_size``
    bounds every ``out_t``, ``red_limit`` every ``red_t``. Widths are integer ``[num_rows]``.
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
        acc, acc2 = _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, cols64, col_in_b, red_w,
                            0, common_red, red_limit, stride_at, stride_ar, stride_bj, stride_br, stride_b2j,
                            stride_b2r, False, GATED, INPUT_PRECISION, BLOCK_K)
        if HAS_RED_WIDTHS:
            acc, acc2 = _reduce(acc, acc2, a_ptr, b_ptr, b2_ptr, rows, row_mask, cols64, col_in_b, red_w,
                                common_red, tile_red, red_limit, stride_at, stride_ar, stride_bj, stride_br,
                                stride_b2j, stride_b2r, True, GATED, INPUT_PRECISION, BLOCK_K)
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
    pre-activation values of ``b`` / ``gate``.
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

    grid = (num_row_blocks * triton.cdiv(out_size, block_n),)
    routed_matmul_kernel[grid](
        a, b, opt(gate), opt(bias), opt(row_scale), out, opt(pre_out), opt(gate_pre_out),
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
        **config,
    )
    return out
