"""Flash attention over packed variable-length sequences, with a per-token head count.

Tokens of a sequence are contiguous; tiles of ``BLOCK`` query (or key) tokens never
cross a sequence boundary: sequence ``b`` holds ``cdiv(len_b, BLOCK)`` tiles, numbered
in sequence order, and each program finds its own tile from ``cu_seqlens`` (no tile
schedule to build on the host or in another kernel). A program owns one (tile, head):
when no token of the tile uses that query head, it only writes zeros. Query head ``h``
reads KV head ``h // GROUP``.

Softmax statistics are kept in base 2 (``exp2``), with the log-sum-exp stored in
natural-log units, ``lse [Hq, T]`` fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flextron_kernels.triton.tma import TensorDescriptor, tma_ready

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# Sequences read per step of the tile search: one step covers the usual batch.
SEQ_CHUNK = tl.constexpr(64)


@triton.jit
def _tile(cu_seqlens_ptr, num_seqs, tile, BLOCK: tl.constexpr, SEQ_CHUNK: tl.constexpr):
    """Tile number ``tile`` of the packed sequences: its sequence (-1 past the last tile),
    token range ``[start, end)``, its sequence's ``[seq_start, seq_end)``, its rows and
    row mask. Every program reads all of ``cu_seqlens``: B / SEQ_CHUNK steps, one for
    the usual batch, small beside the tile's attention work even for thousands of
    sequences."""
    tl.static_assert(SEQ_CHUNK < 128, "the packed sums below count sequences in 7 bits")
    tl.static_assert(BLOCK >= 16, "the packed sums below count tiles (< 2^31 / BLOCK) in 28 bits")
    seq = 0  # sequences whose tiles all come before `tile`: then the tile's own
    first_tile = 0  # their tiles: then the number of the sequence's first tile
    tiles_before = 0  # tiles of the sequences before the current chunk
    for chunk in range(0, num_seqs, SEQ_CHUNK):
        ids = chunk + tl.arange(0, SEQ_CHUNK)
        valid = ids < num_seqs
        lo = tl.load(cu_seqlens_ptr + ids, mask=valid, other=0).to(tl.int32)
        hi = tl.load(cu_seqlens_ptr + ids + 1, mask=valid, other=0).to(tl.int32)
        count = (hi - lo + BLOCK - 1) // BLOCK
        last = tiles_before + tl.cumsum(count, 0)
        before = valid & (last <= tile)
        # Three sums in one reduction (each would be a pass of its own across the warps,
        # with its barriers), packed in 64 bits: per chunk at most 64 sequences (7 bits)
        # and 2^31 / 16 tiles (28 bits each).
        packed = tl.sum(before.to(tl.int64) | (tl.where(before, count, 0).to(tl.int64) << 7)
                        | (count.to(tl.int64) << 35), 0)
        seq += (packed & 127).to(tl.int32)
        first_tile += ((packed >> 7) & 0xFFFFFFF).to(tl.int32)
        tiles_before += (packed >> 35).to(tl.int32)
    found = seq < num_seqs
    seq_start = tl.load(cu_seqlens_ptr + seq, mask=found, other=0).to(tl.int32)
    seq_end = tl.load(cu_seqlens_ptr + seq + 1, mask=found, other=0).to(tl.int32)
    seq = tl.where(found, seq, -1)
    start = seq_start + (tile - first_tile) * BLOCK
    end = tl.minimum(start + BLOCK, seq_end)
    rows = start + tl.arange(0, BLOCK)
    return seq, start, end, seq_start, seq_end, rows, rows < end


@triton.jit
def _query_tile_order(CAUSAL: tl.constexpr):
    """This program's query tile. Causal: in reverse order, so that within each sequence
    the last tiles (a query tile's work grows with its position in its sequence) start
    first and the light ones fill the end of the launch instead of a long tile running
    alone."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


def num_tile_slots(num_tokens: int, num_seqs: int, block: int) -> int:
    """Programs to launch along the tile axis: at least the number of tiles
    (``sum cdiv(len_b, block) <= T // block + B``, and at most one per token)."""
    return min(num_tokens // block + num_seqs, num_tokens)


@triton.jit
def _head_counts(heads_ptr, rows, row_mask, static_heads, HAS_HEADS: tl.constexpr):
    if HAS_HEADS:
        return tl.load(heads_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    return tl.where(row_mask, static_heads, 0)


@triton.jit
def _load_head(ptr, tokens64, token_mask, stride_t, head, stride_h, dims, dim_mask):
    """``[len(tokens), BLOCK_D]``: one head's vectors of the given tokens (zeros where masked)."""
    return tl.load(ptr + tokens64[:, None] * stride_t + head * stride_h + dims[None, :],
                   mask=token_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _token_block(ptr, n0, end, head, stride_t, stride_h, dims, dim_mask, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """``[BLOCK, BLOCK_D]``: one head's vectors of tokens ``n0 .. n0 + BLOCK``, zeros from
    ``end`` on. ``TMA``: ``ptr`` is a descriptor over ``[T, heads * BLOCK_D]`` (blocks
    ``[BLOCK, BLOCK_D]``), whose tokens from ``end`` on (up to ``T``) are read as they are:
    for callers that mask them."""
    if TMA:
        block = ptr.load([n0, head * dims.shape[0]])
    else:
        tokens = n0 + tl.arange(0, BLOCK)
        block = _load_head(ptr, tokens.to(tl.int64), tokens < end, stride_t, head, stride_h, dims, dim_mask)
    return block


@triton.jit
def _key_mask(cols, rows, kv_end, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``[len(rows), len(cols)]``: the keys ``cols`` each query row sees: before ``kv_end``,
    with ``CAUSAL`` at or before its own position, with ``WINDOW`` within ``window`` of it."""
    keep = cols[None, :] < kv_end
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    if WINDOW:
        keep = keep & (cols[None, :] > rows[:, None] - window)
    return keep


@triton.jit
def _window_keys(seq_start, start, end, window, unmasked_end, BLOCK_N: tl.constexpr):
    """A causal sliding window over the keys of query tile ``[start, end)``: key blocks
    (of BLOCK_N from the sequence start) from ``lo`` reach some row's window, and from
    ``unmasked_lo`` (up to ``unmasked_end``) lie inside every row's (keys ``>= end - window``)."""
    first = tl.maximum(start - window + 1, seq_start)
    lo = seq_start + (first - seq_start) // BLOCK_N * BLOCK_N
    inside = tl.maximum(end - window - seq_start, 0)
    unmasked_lo = tl.minimum(tl.maximum(seq_start + tl.cdiv(inside, BLOCK_N) * BLOCK_N, lo), unmasked_end)
    return lo, unmasked_lo


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v_ptr, n0, kv_end, rows, kv_head, stride_vt, stride_vh, dims, dim_mask, qk_scale,
                  window, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, KV_TMA: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over one block of keys ``n0 .. n0 + BLOCK_N``: their raw scores
    ``s [BLOCK_M, BLOCK_N]`` (fp32) update the running row maxima ``m_i`` (scaled, base 2),
    sums ``l_i`` and output ``acc``. ``MASKED``: keys a row does not see
    (:func:`_key_mask`) are dropped."""
    v = _token_block(v_ptr, n0, kv_end, kv_head, stride_vt, stride_vh, dims, dim_mask, BLOCK_N, KV_TMA)
    if MASKED:
        cols = n0 + tl.arange(0, BLOCK_N)
        s = tl.where(_key_mask(cols, rows, kv_end, window, CAUSAL, WINDOW), s, float("-inf"))
        if KV_TMA:
            # Values past kv_end (another sequence's) get zero weight, but 0 * inf is NaN.
            v = tl.where((cols < kv_end)[:, None], v, 0.0)
    # The scale (> 0) goes on the row maxima and into one multiply-add per score, not a
    # multiply of every score before the maxima.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    # Padding rows past the tile see only -inf: keep their arithmetic finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _query_stats(lse_ptr, delta_ptr, rows64, used, head, num_tokens):
    """The backward's per-query statistics for one head: lse (base 2) and delta. Rows not
    ``used`` get ``lse = +inf``: their probabilities ``exp2(s - lse)`` are exact zeros, so
    the loops need no row mask."""
    lse = tl.load(lse_ptr + head * num_tokens + rows64, mask=used, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + head * num_tokens + rows64, mask=used, other=0.0)
    return lse, delta


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, heads_ptr, cu_seqlens_ptr,
    num_tokens, num_seqs, static_heads, softmax_scale, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OVERLAP: tl.constexpr,
    KV_TMA: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """``q, out [T, Hq, HEAD_DIM]``, ``k, v [T, Hkv, HEAD_DIM]`` (last dim contiguous;
    ``BLOCK_D``, a power of two >= 16, pads the head dimension), ``lse [Hq, T]``.
    ``OVERLAP``: each key block's softmax runs while the next block's scores are computed
    (more registers: for 16-bit tiles that fit them). ``KV_TMA``: ``k_ptr`` and ``v_ptr``
    are TMA descriptors over ``k`` and ``v`` as ``[T, Hkv * HEAD_DIM]`` (``HEAD_DIM ==
    BLOCK_D``), blocks ``[BLOCK_N, HEAD_DIM]``. ``WINDOW`` (with ``CAUSAL``): a query sees
    the keys less than ``window`` positions before it. Grid: (tiles of BLOCK_M query tokens, Hq)."""
    head = tl.program_id(1)
    seq, start, end, seq_start, seq_end, rows, row_mask = _tile(
        cu_seqlens_ptr, num_seqs, _query_tile_order(CAUSAL), BLOCK_M, SEQ_CHUNK
    )
    if seq < 0:
        return
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    out_ptrs = out_ptr + rows64[:, None] * stride_ot + head * stride_oh + dims[None, :]
    used = head < _head_counts(heads_ptr, rows, row_mask, static_heads, HAS_HEADS)
    if tl.max(used.to(tl.int32), axis=0) == 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_D), dtype=out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
        tl.store(lse_ptr + head * num_tokens + rows64, tl.zeros((BLOCK_M,), tl.float32), mask=row_mask)
        return

    kv_head = head // GROUP
    q = _load_head(q_ptr, rows64, row_mask, stride_qt, head, stride_qh, dims, dim_mask)
    qk_scale = softmax_scale * _LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Keys before the tile need no causal mask: tiles start at multiples of BLOCK_M from
    # the sequence start and BLOCK_N divides BLOCK_M, so those key blocks end at `start`.
    # Not causal: only the sequence's last, partial key block needs a mask.
    if CAUSAL:
        unmasked_end = start
        kv_end = end
    else:
        unmasked_end = seq_start + (seq_end - seq_start) // BLOCK_N * BLOCK_N
        kv_end = seq_end
    # Phases: keys some row's window cuts (masked; WINDOW only), keys every row sees, masked keys.
    window_lo, unmasked_lo = seq_start, seq_start
    if WINDOW:
        window_lo, unmasked_lo = _window_keys(seq_start, start, end, window, unmasked_end, BLOCK_N)
    for phase in tl.static_range(0 if WINDOW else 1, 3):
        lo = window_lo if phase == 0 else unmasked_lo if phase == 1 else unmasked_end
        hi = unmasked_lo if phase == 0 else unmasked_end if phase == 1 else kv_end
        if OVERLAP:
            # The next block's scores go to the tensor cores before this block's softmax, so
            # that the two overlap: in order, the exponentials leave the tensor cores idle.
            # The last block is peeled off, so no scores are computed past `hi`.
            if lo < hi:
                last = lo + (hi - 1 - lo) // BLOCK_N * BLOCK_N
                k = _token_block(k_ptr, lo, hi, kv_head, stride_kt, stride_kh, dims, dim_mask, BLOCK_N, KV_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
                for n0 in range(lo, last, BLOCK_N):
                    k = _token_block(k_ptr, n0 + BLOCK_N, hi, kv_head, stride_kt, stride_kh, dims, dim_mask, BLOCK_N,
                                     KV_TMA)
                    s_next = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
                    acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v_ptr, n0, hi, rows, kv_head, stride_vt,
                                                  stride_vh, dims, dim_mask, qk_scale, window, phase != 1, CAUSAL,
                                                  WINDOW, KV_TMA, INPUT_PRECISION, BLOCK_N)
                    s = s_next
                acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v_ptr, last, hi, rows, kv_head, stride_vt, stride_vh,
                                              dims, dim_mask, qk_scale, window, phase != 1, CAUSAL, WINDOW, KV_TMA,
                                              INPUT_PRECISION, BLOCK_N)
        else:
            for n0 in range(lo, hi, BLOCK_N):
                k = _token_block(k_ptr, n0, hi, kv_head, stride_kt, stride_kh, dims, dim_mask, BLOCK_N, KV_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
                acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v_ptr, n0, hi, rows, kv_head, stride_vt, stride_vh,
                                              dims, dim_mask, qk_scale, window, phase != 1, CAUSAL, WINDOW, KV_TMA,
                                              INPUT_PRECISION, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(used[:, None], acc / l_safe[:, None], 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    lse = (m_i + tl.log2(l_safe)) * _LN2
    tl.store(lse_ptr + head * num_tokens + rows64, lse, mask=row_mask)


@triton.jit
def _dkdv_step(dk, dv, k, v, cols, q_ptr, dout_ptr, lse_ptr, delta_ptr, heads_ptr, m0, seq_end, head, num_tokens,
               static_heads, qk_scale, stride_qt, stride_qh, stride_dot, stride_doh, dims, dim_mask, window,
               HAS_HEADS: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add one block of BLOCK_M queries (from ``m0``) of one head to a key tile's ``dk``
    and ``dv``. Keys past the tile are zeros, which only touch rows never stored.
    ``CAUSAL_MASK``: drop the pairs a query does not see (causal, and with ``WINDOW``
    farther than ``window`` back).

    Computed transposed (scores ``[keys, queries]``), as flash attention 2's Triton
    kernels do: the key tile's k and v, and the probabilities and their gradients, are the
    first operands of every product and the loaded q and dout the second, so that no tile
    is transposed in registers and the key tile, the larger side, is the products' M."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < seq_end
    used = row_mask & (head < _head_counts(heads_ptr, rows, row_mask, static_heads, HAS_HEADS))
    rows64 = rows.to(tl.int64)
    q_t = tl.load(q_ptr + rows64[None, :] * stride_qt + head * stride_qh + dims[:, None],
                  mask=used[None, :] & dim_mask[:, None], other=0.0)
    do = _load_head(dout_ptr, rows64, used, stride_dot, head, stride_doh, dims, dim_mask)
    lse, delta = _query_stats(lse_ptr, delta_ptr, rows64, used, head, num_tokens)
    s_t = tl.dot(k, q_t, input_precision=INPUT_PRECISION)
    # Issued before the exponentials, which then run while it is on the tensor cores.
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    p_t = tl.exp2(s_t * qk_scale - lse[None, :])
    if CAUSAL_MASK:
        if WINDOW:  # 0 <= row - col < window, in one unsigned comparison
            seen = (rows[None, :] - cols[:, None]).to(tl.uint32) < window
        else:
            seen = cols[:, None] <= rows[None, :]
        p_t = tl.where(seen, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=INPUT_PRECISION), dv


@triton.jit
def _dq_step(dq, q, do, lse, delta, rows, k_ptr, v_ptr, n0, kv_head, qk_scale, stride_kt, stride_kh, stride_vt,
             stride_vh, dims, dim_mask, kv_end, window, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, KV_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one block of BLOCK_N keys (from ``n0``) to a query tile's ``dq``. ``MASKED``:
    keys a row does not see (:func:`_key_mask`) add nothing (unmasked blocks end before
    ``kv_end``)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _token_block(k_ptr, n0, kv_end, kv_head, stride_kt, stride_kh, dims, dim_mask, BLOCK_N, KV_TMA)
    v = _token_block(v_ptr, n0, kv_end, kv_head, stride_vt, stride_vh, dims, dim_mask, BLOCK_N, KV_TMA)
    if MASKED and KV_TMA:
        # Keys and values past kv_end (another sequence's) get zero weight, but 0 * inf is NaN.
        inside = (cols < kv_end)[:, None]
        k = tl.where(inside, k, 0.0)
        v = tl.where(inside, v, 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(_key_mask(cols, rows, kv_end, window, CAUSAL, WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, heads_ptr, seq_heads_ptr, cu_seqlens_ptr,
    num_tokens, num_seqs, static_heads, softmax_scale, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    GROUP: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Gradients of one tile of BLOCK_N keys for one KV head, summed over the GROUP query
    heads that read it and over the queries of its sequence, BLOCK_M queries at a time
    (any BLOCK_M and BLOCK_N). Grid: (key tiles, Hkv).
    ``delta [Hq, T] = rowsum(dout * out)``; ``seq_heads [B]``: each sequence's largest head
    count (with ``HAS_HEADS``)."""
    kv_head = tl.program_id(1)
    seq, start, end, seq_start, seq_end, cols, col_mask = _tile(
        cu_seqlens_ptr, num_seqs, tl.program_id(0), BLOCK_N, SEQ_CHUNK
    )
    if seq < 0:
        return
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    cols64 = cols.to(tl.int64)
    k = _load_head(k_ptr, cols64, col_mask, stride_kt, kv_head, stride_kh, dims, dim_mask)
    v = _load_head(v_ptr, cols64, col_mask, stride_vt, kv_head, stride_vh, dims, dim_mask)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    qk_scale = softmax_scale * _LOG2E
    if HAS_HEADS:
        seq_heads = tl.load(seq_heads_ptr + seq).to(tl.int32)
    else:
        seq_heads = static_heads
    # The query heads reading this KV head that some token of the sequence uses (a prefix).
    num_heads = tl.minimum(tl.maximum(seq_heads - kv_head * GROUP, 0), GROUP)
    # Query blocks of BLOCK_M from the sequence start. Causal: blocks before the one
    # holding this key tile never see it; the blocks overlapping the tile need the mask,
    # the ones after it see every key of the tile.
    if CAUSAL:
        q_lo = seq_start + ((start - seq_start) // BLOCK_M) * BLOCK_M
        num_masked = tl.minimum(tl.cdiv(start + BLOCK_N - q_lo, BLOCK_M), tl.cdiv(seq_end - q_lo, BLOCK_M))
    else:
        q_lo = seq_start
        num_masked = 0
    unmasked_lo = q_lo + num_masked * BLOCK_M
    num_unmasked = tl.maximum(tl.cdiv(seq_end - unmasked_lo, BLOCK_M), 0)
    window_lo, num_window = unmasked_lo, 0
    if WINDOW:
        # Queries before `start + window` see every key of the tile; the later ones, up to the
        # last that sees the tile's last key, are masked blocks of their own.
        if start + window < seq_end:
            num_unmasked = tl.maximum((start + window - unmasked_lo) // BLOCK_M, 0)
        window_lo = unmasked_lo + num_unmasked * BLOCK_M
        num_window = tl.maximum(tl.cdiv(tl.minimum(seq_end, end - 1 + window) - window_lo, BLOCK_M), 0)
    # One flat loop over (head, query block) pairs per kind of block (masked, not masked,
    # and with WINDOW masked again): a loop over heads around the query loop kept far more
    # registers alive (it spilled at every tile size).
    for phase in tl.static_range(3 if WINDOW else 2):
        lo = q_lo if phase == 0 else unmasked_lo if phase == 1 else window_lo
        steps = num_masked if phase == 0 else num_unmasked if phase == 1 else num_window
        for i in range(0, num_heads * steps):
            dk, dv = _dkdv_step(dk, dv, k, v, cols, q_ptr, dout_ptr, lse_ptr, delta_ptr, heads_ptr,
                                lo + (i % steps) * BLOCK_M, seq_end, kv_head * GROUP + i // steps, num_tokens,
                                static_heads, qk_scale, stride_qt, stride_qh, stride_dot, stride_doh, dims, dim_mask,
                                window, HAS_HEADS, CAUSAL and phase != 1, WINDOW, INPUT_PRECISION, BLOCK_M)
    dk = dk * softmax_scale
    tl.store(dk_ptr + cols64[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=col_mask[:, None] & dim_mask[None, :])
    tl.store(dv_ptr + cols64[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=col_mask[:, None] & dim_mask[None, :])


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, heads_ptr, cu_seqlens_ptr,
    num_tokens, num_seqs, static_heads, softmax_scale, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    GROUP: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_TMA: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Query gradient of one tile of BLOCK_M queries for one query head (zeros where
    the head is unused). ``KV_TMA``: keys and values through descriptors, as in
    :func:`attention_fwd_kernel`. Grid: (query tiles, Hq)."""
    head = tl.program_id(1)
    seq, start, end, seq_start, seq_end, rows, row_mask = _tile(
        cu_seqlens_ptr, num_seqs, _query_tile_order(CAUSAL), BLOCK_M, SEQ_CHUNK
    )
    if seq < 0:
        return
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    used = row_mask & (head < _head_counts(heads_ptr, rows, row_mask, static_heads, HAS_HEADS))
    dq_ptrs = dq_ptr + rows64[:, None] * stride_dqt + head * stride_dqh + dims[None, :]
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if tl.max(used.to(tl.int32), axis=0) > 0:
        kv_head = head // GROUP
        q = _load_head(q_ptr, rows64, used, stride_qt, head, stride_qh, dims, dim_mask)
        do = _load_head(dout_ptr, rows64, used, stride_dot, head, stride_doh, dims, dim_mask)
        lse, delta = _query_stats(lse_ptr, delta_ptr, rows64, used, head, num_tokens)
        qk_scale = softmax_scale * _LOG2E
        # Causal: keys before the tile need no mask (key blocks end at the tile's start).
        # Not causal: only the sequence's last, partial key block needs one.
        kv_end = end if CAUSAL else seq_end
        unmasked_end = start if CAUSAL else seq_start + (seq_end - seq_start) // BLOCK_N * BLOCK_N
        window_lo, unmasked_lo = seq_start, seq_start
        if WINDOW:  # as in the forward: the key blocks some row's window cuts are masked too
            window_lo, unmasked_lo = _window_keys(seq_start, start, end, window, unmasked_end, BLOCK_N)
        for n0 in range(unmasked_lo, unmasked_end, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, rows, k_ptr, v_ptr, n0, kv_head, qk_scale, stride_kt, stride_kh,
                          stride_vt, stride_vh, dims, dim_mask, kv_end, window, False, CAUSAL, WINDOW, KV_TMA,
                          INPUT_PRECISION, BLOCK_N)
        if WINDOW:
            # The cut blocks and the last ones in one masked loop: a loop of their own made a
            # third copy of the step, which spilled registers at head dim 256.
            num_cut = (unmasked_lo - window_lo) // BLOCK_N
            for i in range(0, num_cut + tl.cdiv(kv_end - unmasked_end, BLOCK_N)):
                n0 = tl.where(i < num_cut, window_lo + i * BLOCK_N, unmasked_end + (i - num_cut) * BLOCK_N)
                dq = _dq_step(dq, q, do, lse, delta, rows, k_ptr, v_ptr, n0, kv_head, qk_scale, stride_kt, stride_kh,
                              stride_vt, stride_vh, dims, dim_mask, kv_end, window, True, CAUSAL, WINDOW, KV_TMA,
                              INPUT_PRECISION, BLOCK_N)
        else:
            for n0 in range(unmasked_end, kv_end, BLOCK_N):
                dq = _dq_step(dq, q, do, lse, delta, rows, k_ptr, v_ptr, n0, kv_head, qk_scale, stride_kt, stride_kh,
                              stride_vt, stride_vh, dims, dim_mask, kv_end, window, True, CAUSAL, WINDOW, KV_TMA,
                              INPUT_PRECISION, BLOCK_N)
    dq = dq * softmax_scale
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def attention_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, num_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """``delta [Hq, T] = rowsum(out * dout)`` in fp32 from the 16-bit tensors, with no
    fp32 copies of them. Grid: (cdiv(T, BLOCK_T), Hq)."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < num_tokens
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    o = _load_head(out_ptr, rows64, row_mask, stride_ot, head, stride_oh, dims, dim_mask).to(tl.float32)
    do = _load_head(dout_ptr, rows64, row_mask, stride_dot, head, stride_doh, dims, dim_mask).to(tl.float32)
    tl.store(delta_ptr + head * num_tokens + rows64, tl.sum(o * do, axis=1), mask=row_mask)


def _strides(t):
    return t.stride(0), t.stride(1)


def _check_tiles(config):
    # The causal loops split at query-tile starts, which key blocks must reach exactly.
    if config["BLOCK_M"] % config["BLOCK_N"]:
        raise ValueError(f"attention tiles: BLOCK_N must divide BLOCK_M, got {config['BLOCK_M']} and {config['BLOCK_N']}")


def attention_bwd_delta(out, dout, delta, *, block_t):
    """Launch :func:`attention_bwd_delta_kernel`: ``out``, ``dout [T, Hq, D]`` (last dim
    contiguous) into ``delta [Hq, T]`` fp32."""
    num_tokens, q_heads, head_dim = out.shape
    if num_tokens == 0:
        return delta
    attention_bwd_delta_kernel[(triton.cdiv(num_tokens, block_t), q_heads)](
        out, dout, delta, num_tokens, *_strides(out), *_strides(dout),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=block_t,
    )
    return delta


def _heads_descriptor(t, block_tokens):
    """A TMA descriptor over ``t [T, H, D]`` as ``[T, H * D]``, blocks of one head's
    vectors of ``block_tokens`` tokens; None where TMA cannot read it so (heads not
    contiguous within a token, ``D`` not a power of two, or misaligned)."""
    num_tokens, num_heads, head_dim = t.shape
    if t.stride(2) != 1 or (num_heads > 1 and t.stride(1) != head_dim) or head_dim != triton.next_power_of_2(head_dim):
        return None
    if not tma_ready(t, (t.stride(0), 1)):
        return None
    return TensorDescriptor(t, [num_tokens, num_heads * head_dim], [t.stride(0), 1], [block_tokens, head_dim])


def _keys_and_values(k, v, config):
    """A kernel's tiles without ``KV_TMA``, and its ``k`` and ``v`` arguments: descriptors
    with blocks of ``BLOCK_N`` tokens where ``KV_TMA`` asks for them and both allow it
    (:func:`_heads_descriptor`), else the tensors."""
    tiles = {key: value for key, value in config.items() if key != "KV_TMA"}
    if config.get("KV_TMA", False) and k.shape[2] >= 16:
        k_desc, v_desc = (_heads_descriptor(t, config["BLOCK_N"]) for t in (k, v))
        if k_desc is not None and v_desc is not None:
            return tiles, k_desc, v_desc
    return tiles, k, v


def attention_fwd(q, k, v, out, lse, heads, static_heads, cu_seqlens, *, causal, softmax_scale, config, window=0):
    """Launch the forward: writes every element of ``out [T, Hq, D]`` and ``lse [Hq, T]``;
    ``cu_seqlens [B + 1]`` int32. ``config``: the tiles, and ``KV_TMA`` (optional): read
    ``k`` and ``v`` through TMA descriptors where they allow it (:func:`_heads_descriptor`),
    with pointers otherwise. ``window``: 0, or a causal sliding window of that many positions."""
    num_tokens, q_heads, head_dim = q.shape
    _check_tiles(config)
    if num_tokens == 0:
        return
    num_seqs = cu_seqlens.numel() - 1
    tiles, k_arg, v_arg = _keys_and_values(k, v, config)
    grid = (num_tile_slots(num_tokens, num_seqs, config["BLOCK_M"]), q_heads)
    attention_fwd_kernel[grid](
        q, k_arg, v_arg, out, lse, heads if heads is not None else cu_seqlens, cu_seqlens,
        num_tokens, num_seqs, static_heads, softmax_scale, window,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        GROUP=q_heads // k.shape[1], HAS_HEADS=heads is not None, CAUSAL=causal, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), KV_TMA=k_arg is not k, WINDOW=window > 0, **tiles,
    )


def attention_bwd(q, k, v, dout, lse, delta, dq, dk, dv, heads, seq_heads, static_heads, cu_seqlens,
                  *, causal, softmax_scale, dq_config, dkdv_config, window=0):
    """Launch the backward: writes ``dq``, ``dk``, ``dv`` (shapes of q, k, v) from
    ``dout``, the forward's ``lse [Hq, T]`` and ``delta [Hq, T] = rowsum(dout * out)``;
    ``seq_heads [B]``: each sequence's largest head count (with per-token ``heads``);
    ``cu_seqlens [B + 1]`` int32. ``dq_config`` / ``dkdv_config``: each kernel's tiles
    (the dq kernel's may ask for ``KV_TMA``, as the forward's); ``window`` as the forward's."""
    num_tokens, q_heads, head_dim = q.shape
    _check_tiles(dq_config)
    if num_tokens == 0:
        return
    common = dict(GROUP=q_heads // k.shape[1], HAS_HEADS=heads is not None, CAUSAL=causal, HEAD_DIM=head_dim,
                  BLOCK_D=max(16, triton.next_power_of_2(head_dim)), WINDOW=window > 0)
    heads_arg = heads if heads is not None else cu_seqlens
    num_seqs = cu_seqlens.numel() - 1
    attention_bwd_dkdv_kernel[(num_tile_slots(num_tokens, num_seqs, dkdv_config["BLOCK_N"]), k.shape[1])](
        q, k, v, dout, lse, delta, dk, dv, heads_arg, seq_heads if seq_heads is not None else cu_seqlens, cu_seqlens,
        num_tokens, num_seqs, static_heads, softmax_scale, window,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        **common, **dkdv_config,
    )
    dq_tiles, k_arg, v_arg = _keys_and_values(k, v, dq_config)
    attention_bwd_dq_kernel[(num_tile_slots(num_tokens, num_seqs, dq_config["BLOCK_M"]), q_heads)](
        q, k_arg, v_arg, dout, lse, delta, dq, heads_arg, cu_seqlens,
        num_tokens, num_seqs, static_heads, softmax_scale, window,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        KV_TMA=k_arg is not k, **common, **dq_tiles,
    )
