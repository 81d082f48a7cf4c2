"""elastic_attention_extend: new tokens of each request against its KV cache (a prefill that continues a cache).

Meaning: :func:`flextron_kernels.reference.elastic_attention_extend`. A later chunk of a
long prompt, the next turn of a chat, or several draft tokens to verify: each request's
new tokens are already in its cache, last, and each attends to the cache up to its own
position. This module checks the arguments and registers one forward-only custom op
(caches take no gradient), with a fake implementation for ``torch.compile``:

- ``flextron::elastic_attention_extend(q, k_cache, v_cache, cu_seqlens, cache_seqlens,
  heads_per_request, heads, softmax_scale, window) -> out`` (``window`` 0: none).

One implementation on every device: per request, ``scaled_dot_product_attention`` with a
KV head's ``L`` new tokens times ``G`` query heads as ``L * G`` queries against the
request's cache (no GQA copy of the cache), reading only the positions its new tokens
see (one host sync for the offsets). A decode step (one new token per request) has its
own kernels: :func:`~flextron_kernels.ops.elastic_attention_decode.elastic_attention_decode`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from flextron_kernels.ops.checks import (
    INTEGER_DTYPES,
    check_cu_seqlens_values,
    check_tensor,
    host_values,
    off_group,
    softmax_scale_or_default,
    value_checks_enabled,
    width_range,
)
from flextron_kernels.ops.common import call_op, outside_autocast
from flextron_kernels.ops.elastic_attention import check_window
from flextron_kernels.ops.elastic_attention_decode import (
    DTYPES,
    check_cache_seqlens,
    check_caches,
    check_request_head_values,
    check_request_heads,
)


def _forward(q, k_cache, v_cache, cu_seqlens, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    out = q.new_zeros(num_tokens, q_heads, head_dim)
    bounds, lengths, counts = host_values(
        cu_seqlens, cache_seqlens, heads_per_request if heads_per_request is not None else cu_seqlens[:0])
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        new, cached = end - start, lengths[b]
        used_kv = (counts[b] if heads_per_request is not None else heads) // group
        if new == 0 or used_kv == 0:
            continue
        first = cached - new  # the first new token's position
        lo = max(first - window + 1, 0) if window else 0
        # [1, Hkv, L * G, Dh]: the new tokens' query heads of each KV head, token-major.
        queries = q[start:end, : used_kv * group].reshape(new, used_kv, group, head_dim).permute(1, 0, 2, 3)
        queries = queries.reshape(1, used_kv, new * group, head_dim)
        positions = torch.arange(lo, cached, device=q.device)
        token_positions = torch.arange(first, cached, device=q.device).repeat_interleave(group)[:, None]
        visible = positions <= token_positions
        if window:
            visible &= positions > token_positions - window
        attended = F.scaled_dot_product_attention(
            queries, k_cache[b : b + 1, :used_kv, lo:cached], v_cache[b : b + 1, :used_kv, lo:cached],
            attn_mask=visible, scale=softmax_scale,
        )
        out[start:end, : used_kv * group] = attended.reshape(used_kv, new, group, head_dim).permute(1, 0, 2, 3).reshape(
            new, used_kv * group, head_dim)
    return out


@torch.library.custom_op("flextron::elastic_attention_extend", mutates_args=())
def _extend_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cache_seqlens: torch.Tensor,
    heads_per_request: Optional[torch.Tensor],
    heads: int,
    softmax_scale: float,
    window: int,
) -> torch.Tensor:
    """``q [T, Hq, Dh]`` (request ``b``'s new tokens at ``cu_seqlens[b]:cu_seqlens[b + 1]``)
    against ``k_cache, v_cache [B, Hkv, S_max, Dh]`` holding ``cache_seqlens[b]`` positions,
    the new tokens last -> ``out [T, Hq, Dh]``. Request ``b`` uses its first
    ``heads_per_request[b]`` query heads (None: ``heads``); zeros elsewhere."""
    check_window(window, True, none=0)  # the op is public too: the same rule
    return _forward(q, k_cache, v_cache, cu_seqlens, cache_seqlens, heads_per_request, heads, softmax_scale, window)


@_extend_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    return q.new_empty(q.shape)


def _check_values(cu_seqlens, cache_seqlens, heads_per_request, num_tokens, kv_len, q_heads, kv_heads):
    """The offsets, that each cache holds its new tokens and fits, and the head counts'
    range and GQA multiples, from one copy to the host."""
    if cu_seqlens.numel() == 1:  # no request
        return check_cu_seqlens_values(host_values(cu_seqlens)[0], num_tokens)
    new_tokens = cu_seqlens[1:] - cu_seqlens[:-1]
    summaries = [cu_seqlens, width_range(cache_seqlens), width_range(cache_seqlens - new_tokens)]
    if heads_per_request is not None:
        summaries += [width_range(heads_per_request), off_group(heads_per_request, q_heads // kv_heads)]
    values = host_values(*summaries)
    check_cu_seqlens_values(values[0], num_tokens)
    if values[1][0] < 0 or values[1][1] > kv_len:
        raise ValueError(f"cache_seqlens: expected every length in [0, {kv_len}] (S_max = k_cache.shape[2]), "
                         f"got values in [{values[1][0]}, {values[1][1]}]")
    if values[2][0] < 0:
        raise ValueError("cache_seqlens: expected each request's cache to hold its new tokens (cache_seqlens[b] >= "
                         f"cu_seqlens[b + 1] - cu_seqlens[b]), got a request with {-values[2][0]} fewer positions")
    if heads_per_request is not None:
        check_request_head_values(values[3], values[4], q_heads, kv_heads)


@outside_autocast("q", "k_cache", "v_cache")
def elastic_attention_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    cache_seqlens: torch.Tensor,
    heads: Union[int, torch.Tensor],
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Attention of each request's new tokens to its KV cache, which already holds them.

    Args:
        q: ``[T, Hq, Dh]``, fp32, fp16 or bf16, any strides: the new tokens of every
            request, packed; ``Dh <= 256``.
        k_cache, v_cache: ``[B, Hkv, S_max, Dh]``, same dtype and device as ``q``;
            ``Hq`` a multiple of ``Hkv``.
        cu_seqlens: ``[B + 1]`` integer tensor: request ``b``'s new tokens are
            ``q[cu_seqlens[b]:cu_seqlens[b + 1]]`` (none is fine).
        cache_seqlens: ``[B]`` integer tensor in ``[0, S_max]``: the positions request
            ``b``'s cache holds, its new tokens included (the last ones). New token ``i``
            of ``L`` is at position ``cache_seqlens[b] - L + i`` and attends to the cache
            positions up to it.
        heads: an int or a ``[B]`` integer tensor in ``[0, Hq]``, multiples of the GQA
            group: request ``b`` uses its first ``heads[b]`` query heads.
        softmax_scale: the score scale, a float > 0, default ``Dh ** -0.5``.
        window: None, or a sliding window: a token attends to its last ``window``
            positions (its own included), as the prefill's ``window``.

    Returns:
        ``[T, Hq, Dh]`` in the dtype of ``q``, exactly 0 at heads ``h >= heads[b]``.
    """
    check_tensor("q", q, dtypes=DTYPES, ndim=3)
    num_tokens, q_heads, head_dim = q.shape
    check_tensor("cu_seqlens", cu_seqlens, device=q.device, ndim=1)
    if cu_seqlens.dtype not in INTEGER_DTYPES or cu_seqlens.numel() < 1:
        raise TypeError(f"cu_seqlens: expected an integer tensor of B + 1 offsets, got dtype {cu_seqlens.dtype} and "
                        f"shape {tuple(cu_seqlens.shape)}")
    batch = cu_seqlens.numel() - 1
    check_caches(q, k_cache, v_cache, batch, "cu_seqlens")
    kv_heads, kv_len = k_cache.shape[1], k_cache.shape[2]
    check_cache_seqlens(cache_seqlens, batch, q.device)
    heads_per_request, num_heads = check_request_heads(heads, batch, q_heads, kv_heads, q.device)
    if value_checks_enabled(cache_seqlens):
        _check_values(cu_seqlens, cache_seqlens, heads_per_request, num_tokens, kv_len, q_heads, kv_heads)
    softmax_scale = softmax_scale_or_default(softmax_scale, head_dim)
    window = check_window(window, True)
    return call_op(torch.ops.flextron.elastic_attention_extend, _forward, q, k_cache, v_cache, cu_seqlens, cache_seqlens,
                   heads_per_request, num_heads, float(softmax_scale), window)
