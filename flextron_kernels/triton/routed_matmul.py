"""Row-routed matmul: ``C[t, j] = sum_{r < red_t} A[t, r] * B[j, r] (+ bias[j])`` for ``j < out_t``.

One kernel serves the elastic linear forward (``A = x``, ``B = W``) and its input
gradient (``A = dy``, ``B = W.T``, given as strides). Each row (token) has its own
output width ``out_t`` and reduction width ``red_t``; outputs at ``j >= out_t`` are
written as exact zeros.

With routing metadata (``ROUTED``), a program's rows are one tile of tokens grouped
by width: rows are gathered through ``sorted_token_idx`` on load and scattered on
store (no permuted copy), and the reduction loop and the output columns stop at the
tile's own largest widths, so work outside every row's prefix is skipped.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def routed_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    out_widths_ptr, red_widths_ptr,
    sorted_token_idx_ptr, tile_start_ptr, tile_end_ptr,
    num_rows, out_size, out_limit, red_limit,
    stride_at, stride_ar,
    stride_bj, stride_br,
    stride_ct, stride_cj,
    ROUTED: tl.constexpr,
    HAS_OUT_WIDTHS: tl.constexpr,
    HAS_RED_WIDTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Shapes: ``A [num_rows, >= red]``, ``B [>= out_limit, >= red]`` (any strides),
    ``C [num_rows, out_size]``; ``out_limit <= out_size`` bounds every ``out_t`` and
    ``red_limit`` every ``red_t``. Widths are int32/int64 ``[num_rows]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = tl.arange(0, BLOCK_M)
    if ROUTED:
        start = tl.load(tile_start_ptr + pid_m)
        end = tl.load(tile_end_ptr + pid_m)
        row_mask = start + offs < end
        rows = tl.load(sorted_token_idx_ptr + start + offs, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = (pid_m * BLOCK_M + offs).to(tl.int64)
        row_mask = rows < num_rows

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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Column blocks past every row's output width only store zeros.
    if pid_n * BLOCK_N < tile_out:
        col_in_b = cols < tile_out
        for r0 in range(0, tile_red, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                a_ptr + rows[:, None] * stride_at + r[None, :] * stride_ar,
                mask=row_mask[:, None] & (r[None, :] < red_w[:, None]),
                other=0.0,
            )
            b = tl.load(
                b_ptr + cols[:, None] * stride_bj + r[None, :] * stride_br,
                mask=col_in_b[:, None] & (r[None, :] < tile_red),
                other=0.0,
            )
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_in_b, other=0.0)
            acc += bias[None, :].to(tl.float32)

    used = cols[None, :] < out_w[:, None]
    result = tl.where(used, acc, 0.0)
    tl.store(
        c_ptr + rows[:, None] * stride_ct + cols[None, :] * stride_cj,
        result.to(c_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols[None, :] < out_size),
    )


def routed_matmul(a, a_strides, b, b_strides, bias, out, *, out_widths, red_widths, out_limit, red_limit, routing, config):
    """Launch :func:`routed_matmul_kernel` writing every element of ``out [T, out_size]``.

    ``a`` / ``b`` are tensors whose elements are addressed with the given strides
    (``b_strides = (stride along j, stride along r)``, so ``W.T`` is ``W`` with its
    strides swapped). ``routing`` is a RoutingMetadata built with
    ``block_m = config["BLOCK_M"]``, or None for unrouted (static) rows.
    """
    num_rows, out_size = out.shape
    if num_rows == 0 or out_size == 0:
        return out
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_row_blocks = routing.tile_start.numel() if routing is not None else triton.cdiv(num_rows, block_m)
    dummy = out
    grid = (num_row_blocks, triton.cdiv(out_size, block_n))
    routed_matmul_kernel[grid](
        a, b, bias if bias is not None else dummy, out,
        out_widths if out_widths is not None else dummy,
        red_widths if red_widths is not None else dummy,
        routing.sorted_token_idx if routing is not None else dummy,
        routing.tile_start if routing is not None else dummy,
        routing.tile_end if routing is not None else dummy,
        num_rows, out_size, out_limit, red_limit,
        a_strides[0], a_strides[1],
        b_strides[0], b_strides[1],
        out.stride(0), out.stride(1),
        ROUTED=routing is not None,
        HAS_OUT_WIDTHS=out_widths is not None,
        HAS_RED_WIDTHS=red_widths is not None,
        HAS_BIAS=bias is not None,
        **config,
    )
    return out
