"""Split-KV ("flash-decoding") attention for one query per request, with a per-request
head count.

Request ``b`` attends with its first ``heads[b]`` query heads to cache positions
``< cache_seqlens[b]`` (with a sliding ``window`` > 0, the last ``window`` of them); query head ``h`` reads KV head ``h // G`` (``G = Hq // Hkv``,
and ``heads[b]`` is a multiple of ``G``). Two kernels:

- :func:`attention_decode_split_kernel`, grid ``(B, Hkv, num_splits)``: a program takes
  one KV head and the ``G`` query heads that share it (so K and V are read once per
  group) over one split of ``split_len`` cache positions, runs an online softmax in fp32
  over blocks of ``BLOCK_N`` positions, and writes the split's output (normalised within
  the split) and its log-sum-exp to fp32 workspaces. A program whose KV head the request
  does not use, or whose split starts past the request's cache, reads nothing.
- :func:`attention_decode_combine_kernel`, grid ``(B, Hq)``: merges a head's splits by
  their log-sum-exps and writes the output: exact zeros for unused heads and empty caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _first_position(seqlen, window):
    """The first cache position a request attends to: 0, or with a window the window's first."""
    return tl.where(window > 0, tl.maximum(seqlen - window, 0), 0)


@triton.jit
def attention_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, heads_ptr, part_out_ptr, part_lse_ptr,
    num_heads, num_q_heads, num_splits, split_len, qk_scale, window,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    GROUP: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Shapes: ``q [B, Hq, HEAD_DIM]``, ``k, v [B, Hkv, S_max, HEAD_DIM]`` (any strides),
    ``seqlens [B]`` and ``heads [B]`` integer (``heads`` unused unless ``HAS_HEADS``; then
    ``num_heads`` is every request's count), workspaces ``part_out [B, Hq, num_splits,
    HEAD_DIM]`` and ``part_lse [B, Hq, num_splits]`` fp32, contiguous. ``qk_scale`` is the
    softmax scale times log2(e): the softmax runs in base 2 and ``part_lse`` is in log2 units.
    ``window`` > 0: the splits cover the request's last ``window`` positions only.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + b).to(tl.int32)
    if HAS_HEADS:
        heads = tl.load(heads_ptr + b).to(tl.int32)
    else:
        heads = num_heads
    start = _first_position(seqlen, window) + split * split_len
    if (kv_head * GROUP >= heads) | (start >= seqlen):
        return
    end = tl.minimum(start + split_len, seqlen)

    g = tl.arange(0, BLOCK_G)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_heads = kv_head * GROUP + g
    b64 = b.to(tl.int64)
    q = tl.load(
        q_ptr + b64 * stride_qb + q_heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    start64 = start.to(tl.int64)
    k_ptrs = k_ptr + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + start64 * stride_ks
    v_ptrs = v_ptr + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + start64 * stride_vs
    k_ptrs += n[:, None] * stride_ks + d[None, :] * stride_kd
    v_ptrs += n[:, None] * stride_vs + d[None, :] * stride_vd

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    # Every block holds at least one position < end, so each row's running max is finite
    # after the first block (rows past GROUP see zero scores, never -inf everywhere).
    for n0 in range(start, end, BLOCK_N):
        n_ok = n0 + n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        # The query-head rows are padded to BLOCK_G >= 16 (tl.dot's minimum M) with masked,
        # zero rows: the MMA units do the padding's work for free while the loop waits on
        # memory, whereas a broadcast-and-sum [BLOCK_G, BLOCK_N, BLOCK_D] product would need
        # G * BLOCK_N * BLOCK_D / threads registers per thread and spill for G >= 4. The same
        # code runs under the interpreter.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    rows = (b64 * num_q_heads + q_heads) * num_splits + split
    out_mask = g_ok[:, None] & d_ok[None, :]
    tl.store(part_out_ptr + rows[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], mask=out_mask)
    tl.store(part_lse_ptr + rows, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit
def attention_decode_combine_kernel(
    part_out_ptr, part_lse_ptr, seqlens_ptr, heads_ptr, out_ptr,
    num_heads, num_q_heads, num_splits, split_len, window,
    stride_ob, stride_oh, stride_od,
    HAS_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[b, h] = sum_s 2^(lse_s - lse) * part_out[b, h, s]`` over the splits that
    hold part of request ``b``'s cache, ``lse = log2 sum_s 2^lse_s``; zeros when
    ``h >= heads[b]`` or the cache is empty. ``BLOCK_S >= num_splits``; ``out [B, Hq,
    HEAD_DIM]`` any strides."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seqlen = tl.load(seqlens_ptr + b).to(tl.int32)
    if HAS_HEADS:
        heads = tl.load(heads_ptr + b).to(tl.int32)
    else:
        heads = num_heads
    span = seqlen - _first_position(seqlen, window)
    num_valid = tl.where(h < heads, (span + split_len - 1) // split_len, 0)
    rows = (b.to(tl.int64) * num_q_heads + h) * num_splits

    s = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + rows + s, mask=s < num_valid, other=float("-inf"))
    lse_max = tl.where(num_valid > 0, tl.max(lse, axis=0), 0.0)
    denom = tl.sum(tl.exp2(lse - lse_max), axis=0)
    denom = tl.where(num_valid > 0, denom, 1.0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, num_valid, CHUNK_S):
        sc = s0 + tl.arange(0, CHUNK_S)
        sc_ok = sc < num_valid
        weight = tl.exp2(tl.load(part_lse_ptr + rows + sc, mask=sc_ok, other=float("-inf")) - lse_max)
        part = tl.load(
            part_out_ptr + (rows + sc)[:, None] * HEAD_DIM + d[None, :], mask=sc_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(part * weight[:, None], axis=0)
    out = acc / denom
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def attention_decode(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, out, *, config,
                     window=0):
    """Launch both kernels, writing every element of ``out [B, Hq, Dh]``.

    ``heads_per_request`` is the ``[B]`` integer tensor of head counts, or None for the
    int ``heads`` everywhere. ``config``: ``BLOCK_N`` and ``num_splits`` (an upper bound:
    the cache is cut into splits of whole blocks), ``INPUT_PRECISION``, and optionally
    ``num_warps`` / ``num_stages``. ``window``: 0, or a sliding window of positions.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, kv_len = k_cache.shape[1], k_cache.shape[2]
    if batch == 0:
        return out
    group = q_heads // kv_heads
    block_n = config["BLOCK_N"]
    num_blocks = triton.cdiv(min(kv_len, window) if window else kv_len, block_n)
    blocks_per_split = max(triton.cdiv(num_blocks, config["num_splits"]), 1)
    split_len = blocks_per_split * block_n
    num_splits = max(triton.cdiv(num_blocks, blocks_per_split), 1)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    has_heads = heads_per_request is not None
    # With an int head count, programs of the unused KV heads are not even launched.
    active_kv_heads = kv_heads if has_heads else heads // group
    launch = {k: config[k] for k in ("num_warps", "num_stages") if k in config}

    part_out = q.new_empty((batch, q_heads, num_splits, head_dim), dtype=torch.float32)
    part_lse = q.new_empty((batch, q_heads, num_splits), dtype=torch.float32)
    seqlens_arg = cache_seqlens
    heads_arg = heads_per_request if has_heads else cache_seqlens
    if active_kv_heads > 0 and kv_len > 0:
        attention_decode_split_kernel[(batch, active_kv_heads, num_splits)](
            q, k_cache, v_cache, seqlens_arg, heads_arg, part_out, part_lse,
            heads, q_heads, num_splits, split_len, softmax_scale * LOG2E, window,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            GROUP=group,
            HAS_HEADS=has_heads,
            HEAD_DIM=head_dim,
            INPUT_PRECISION=config["INPUT_PRECISION"],
            BLOCK_G=max(triton.next_power_of_2(group), 16),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            **launch,
        )
    block_s = triton.next_power_of_2(num_splits)
    # Each chunk of splits is one round trip to memory, in sequence; with few requests there
    # are only B x Hq combine programs, so chunks are large: 64 splits of a head of 128 is
    # 32 KiB, 32 fp32 registers per thread at 8 warps.
    chunk_s = min(block_s, 64)
    attention_decode_combine_kernel[(batch, q_heads)](
        part_out, part_lse, seqlens_arg, heads_arg, out,
        heads, q_heads, num_splits, split_len, window,
        *out.stride(),
        HAS_HEADS=has_heads,
        HEAD_DIM=head_dim,
        BLOCK_S=block_s,
        CHUNK_S=chunk_s,
        BLOCK_D=block_d,
        num_warps=8 if chunk_s * block_d >= 4096 else 4,
    )
    return out

