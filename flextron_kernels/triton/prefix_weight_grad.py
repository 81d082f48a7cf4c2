"""Prefix-accumulating weight gradient of the elastic linear layer.

``grad_weight[j, c] += sum_t dy[t, j] * x[t, c]`` over the tokens with ``j < out_t``
and ``c < in_t``, and ``grad_bias[j] += sum_t dy[t, j]`` over ``j < out_t``. Only the
used prefix ``[:out_limit, :in_limit]`` is launched, read and written: no full-size
temporary, and several sub-networks accumulate into one ``.grad``.

With routing metadata, tokens are sorted by their width along one axis (``out`` when
``SORT_BY_OUT``, else ``in``), grouped under ``boundaries``; a program whose block
starts at column ``j0`` of that axis reduces only over the groups that can reach
``j0``, a suffix of the sorted order, gathering rows through ``sorted_token_idx``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _accumulate(acc, bias_acc, dy_ptr, x_ptr, out_widths_ptr, in_widths_ptr, sorted_token_idx_ptr,
                row_start, row_end, num_rows, cols_n, cols_k, mask_n, mask_k, stride_dyt, stride_dyj, stride_xt, stride_xc,
                ROUTED: tl.constexpr, MASK_OUT: tl.constexpr, MASK_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """``acc += dy[rows, cols_n].T @ x[rows, cols_k]`` (``bias_acc += dy`` summed over
    rows) over the rows ``row_start <= s < row_end`` of the (sorted) order; ``MASK_OUT`` /
    ``MASK_IN`` apply each row's own output / input width."""
    for s in range(row_start, row_end, BLOCK_M):
        offs = s + tl.arange(0, BLOCK_M)
        row_mask = (offs < row_end) & (offs < num_rows)
        if ROUTED:
            rows = tl.load(sorted_token_idx_ptr + offs, mask=row_mask, other=0).to(tl.int64)
        else:
            rows = offs.to(tl.int64)
        # Loads are masked by the launch-time limits only, which keeps them vectorised
        # and pipelined; each row's own widths are applied in registers.
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dyt + cols_n[None, :] * stride_dyj,
            mask=row_mask[:, None] & mask_n[None, :], other=0.0,
        )
        x = tl.load(
            x_ptr + rows[:, None] * stride_xt + cols_k[None, :] * stride_xc,
            mask=row_mask[:, None] & mask_k[None, :], other=0.0,
        )
        if MASK_OUT:
            out_w = tl.load(out_widths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
            dy = tl.where(cols_n[None, :] < out_w[:, None], dy, 0.0)
        if MASK_IN:
            in_w = tl.load(in_widths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
            x = tl.where(cols_k[None, :] < in_w[:, None], x, 0.0)
        if HAS_BIAS:
            bias_acc += tl.sum(dy.to(tl.float32), axis=0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    return acc, bias_acc


@triton.jit
def prefix_weight_grad_kernel(
    dy_ptr, x_ptr, grad_weight_ptr, grad_bias_ptr,
    out_widths_ptr, in_widths_ptr,
    sorted_token_idx_ptr, group_offsets_ptr, boundaries_ptr, num_groups,
    num_rows, out_limit, in_limit,
    stride_dyt, stride_dyj,
    stride_xt, stride_xc,
    stride_gwj, stride_gwc,
    ROUTED: tl.constexpr,
    SORT_BY_OUT: tl.constexpr,
    HAS_OUT_WIDTHS: tl.constexpr,
    HAS_IN_WIDTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    K_BLOCK_OFFSET: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Shapes: ``dy [num_rows, >= out_limit]``, ``x [num_rows, >= in_limit]``,
    ``grad_weight [>= out_limit, >= in_limit]``, ``grad_bias [>= out_limit]`` (fp32
    accumulation, stored in their own dtype). Grid: ``(cdiv(out_limit, BLOCK_N),
    k_blocks)``, program ``(i, j)`` owning column block ``j + K_BLOCK_OFFSET``. With
    ``HAS_BIAS`` the launch is one column of programs (block 0), which also sums the bias.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1) + K_BLOCK_OFFSET
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = cols_n < out_limit
    mask_k = cols_k < in_limit

    first = 0
    # Rows from `unmasked` on have widths along the sorted axis past this block's end.
    unmasked = num_rows if (HAS_OUT_WIDTHS or HAS_IN_WIDTHS) else 0
    if ROUTED:
        # Groups whose upper bound is <= the block's first column hold no token that
        # reaches this block: skip them. The bias needs every token, width 0 included.
        if SORT_BY_OUT:
            block_first_col = pid_n * BLOCK_N
            block_end = block_first_col + BLOCK_N
        else:
            block_first_col = -1 if HAS_BIAS else pid_k * BLOCK_K
            block_end = (pid_k + 1) * BLOCK_K
        g = tl.arange(0, GROUPS_POW2)
        bounds = tl.load(boundaries_ptr + g, mask=g < num_groups, other=2147483647)
        first_group = tl.sum((bounds <= block_first_col).to(tl.int32), axis=0)
        first = tl.load(group_offsets_ptr + first_group)
        # Group g holds widths above bounds[g - 1]: from the first group whose lower bound
        # is at least the block's end, every row covers the whole block, unmasked.
        full_group = tl.minimum(tl.sum((bounds < block_end).to(tl.int32), axis=0) + 1, num_groups)
        unmasked = tl.maximum(tl.load(group_offsets_ptr + full_group), first)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Widths applied in registers keep the operands off the tensor cores' shared-memory
    # path: only the rows that need it are masked.
    acc, bias_acc = _accumulate(
        acc, bias_acc, dy_ptr, x_ptr, out_widths_ptr, in_widths_ptr, sorted_token_idx_ptr, first, unmasked, num_rows,
        cols_n, cols_k, mask_n, mask_k, stride_dyt, stride_dyj, stride_xt, stride_xc,
        ROUTED, HAS_OUT_WIDTHS, HAS_IN_WIDTHS, HAS_BIAS, INPUT_PRECISION, BLOCK_M,
    )
    acc, bias_acc = _accumulate(
        acc, bias_acc, dy_ptr, x_ptr, out_widths_ptr, in_widths_ptr, sorted_token_idx_ptr, unmasked, num_rows,
        num_rows, cols_n, cols_k, mask_n, mask_k, stride_dyt, stride_dyj, stride_xt, stride_xc,
        ROUTED, HAS_OUT_WIDTHS and not SORT_BY_OUT, HAS_IN_WIDTHS and SORT_BY_OUT, HAS_BIAS, INPUT_PRECISION, BLOCK_M,
    )

    gw_ptrs = grad_weight_ptr + cols_n.to(tl.int64)[:, None] * stride_gwj + cols_k[None, :] * stride_gwc
    gw_mask = mask_n[:, None] & mask_k[None, :]
    old = tl.load(gw_ptrs, mask=gw_mask, other=0.0).to(tl.float32)
    tl.store(gw_ptrs, (old + acc).to(grad_weight_ptr.dtype.element_ty), mask=gw_mask)
    if HAS_BIAS:
        old_bias = tl.load(grad_bias_ptr + cols_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(grad_bias_ptr + cols_n, (old_bias + bias_acc).to(grad_bias_ptr.dtype.element_ty), mask=mask_n)


def prefix_weight_grad_(grad_weight, grad_bias, dy, x, *, out_widths, in_widths, in_limit, routing, boundaries,
                        sort_by_out, config):
    """Launch :func:`prefix_weight_grad_kernel`: accumulate into ``grad_weight[:n, :in_limit]``
    and ``grad_bias[:n]`` with ``n = dy.shape[1]``.

    ``routing`` (RoutingMetadata, any block size: only the token order and group
    offsets are used) and ``boundaries`` describe how the tokens were grouped (by
    ``out_widths`` when ``sort_by_out``, else by ``in_widths``), or are both None for
    static widths. ``out_widths``/``in_widths`` mask each token's rows/columns; pass
    None where ``dy``/``x`` are already zero past each token's width.
    """
    num_rows, out_limit = dy.shape
    if num_rows == 0 or out_limit == 0:
        return
    block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
    k_blocks = triton.cdiv(in_limit, block_k)
    num_groups = boundaries.numel() if boundaries is not None else 1
    dummy = dy

    def launch(grid, with_bias, k_block_offset):
        prefix_weight_grad_kernel[grid](
            dy, x, grad_weight, grad_bias if with_bias else dummy,
            out_widths if out_widths is not None else dummy,
            in_widths if in_widths is not None else dummy,
            routing.sorted_token_idx if routing is not None else dummy,
            routing.group_offsets if routing is not None else dummy,
            boundaries if boundaries is not None else dummy,
            num_groups,
            num_rows, out_limit, in_limit,
            dy.stride(0), dy.stride(1),
            x.stride(0), x.stride(1),
            grad_weight.stride(0), grad_weight.stride(1),
            ROUTED=routing is not None,
            SORT_BY_OUT=sort_by_out,
            HAS_OUT_WIDTHS=out_widths is not None,
            HAS_IN_WIDTHS=in_widths is not None,
            HAS_BIAS=with_bias,
            K_BLOCK_OFFSET=k_block_offset,
            GROUPS_POW2=triton.next_power_of_2(num_groups),
            **config,
        )

    n_blocks = triton.cdiv(out_limit, block_n)
    # The bias sum runs in its own column of programs (block 0, launched even when no
    # input column is used), so that the other programs' inner loop stays a bare GEMM.
    first_plain_block = 0
    if grad_bias is not None:
        launch((n_blocks, 1), True, 0)
        first_plain_block = 1
    if k_blocks > first_plain_block:
        launch((n_blocks, k_blocks - first_plain_block), False, first_plain_block)
