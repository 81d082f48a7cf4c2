"""elastic_attention_decode: one decode step of attention, with a per-request head count.

Meaning: :func:`flextron_kernels.reference.elastic_attention_decode`. This module checks
the arguments, picks a backend, and registers one forward-only custom op (decode needs
no backward), with a fake implementation so that ``torch.compile`` traces it:

- ``flextron::elastic_attention_decode(q, k_cache, v_cache, cache_seqlens, heads_per_request,
  heads, softmax_scale, window) -> out`` (``window`` 0: none).

Backends: on CUDA, the Triton split-KV kernels (:mod:`flextron_kernels.triton.attention_decode`),
which read the KV cache of the active heads only, each KV head once for its whole GQA
group; the torch backend (any device) runs ``scaled_dot_product_attention`` with the
``G`` query heads of a KV head as ``G`` queries against its cache (no ``repeat_interleave``
copy), on the used heads only when the head count is an int; on a CPU it reads only the
positions some request sees.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F

from flextron_kernels.backends import device_index, select_backend
from flextron_kernels.ops.checks import (
    INTEGER_DTYPES,
    check_same_dtype,
    check_tensor,
    check_width_range,
    check_widths,
    host_values,
    new_output,
    off_group,
    softmax_scale_or_default,
    value_checks_enabled,
    width_range,
)
from flextron_kernels.ops.common import call_op, outside_autocast
from flextron_kernels.ops.elastic_attention import check_window, effective_window
from flextron_kernels.ops.tiles import attention_decode_tiles, input_precision

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _select(t: torch.Tensor) -> str:
    preferred = ("triton", "torch") if t.is_cuda else ("torch", "triton")
    return select_backend("elastic_attention_decode", t.device, ("triton", "torch"), preferred)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, active_kv_heads: int, window: int = 0) -> dict:
    """Tiles and split count for :func:`~flextron_kernels.triton.attention_decode.attention_decode`,
    from shapes only (no host sync). ``active_kv_heads``: an upper bound on the KV heads a
    request uses; ``window``: 0, or the sliding window (a request reads at most that many
    positions)."""
    precision = input_precision(q)
    span = min(k_cache.shape[2], window) if window else k_cache.shape[2]
    num_blocks = lambda block_n: -(-span // block_n)  # noqa: E731
    if q.device.type == "cpu":  # the Triton interpreter: small blocks, two per split, so the combine has work
        return dict(BLOCK_N=16, num_splits=max(-(-num_blocks(16) // 2), 1), INPUT_PRECISION=precision)
    block_d = max(1 << (q.shape[-1] - 1).bit_length(), 16)
    block_g = max(1 << (q.shape[1] // k_cache.shape[1] - 1).bit_length(), 16)
    # 16 KiB K and V tiles (64 positions of a bf16 head of 128): 16-byte vector loads, and two
    # pipeline stages of K and V stay within 64 KiB of shared memory.
    block_n = max(16, min(64, 16384 // (block_d * q.element_size())))
    programs_per_sm, num_stages = 8, 2
    # 4 warps for the usual G <= 16, Dh <= 128; beyond, or for fp32 without tensor cores,
    # 8 warps keep the accumulator and operand tiles in registers (no spills with ptxas, sm_90).
    num_warps = 8 if block_g * block_d > 2048 or precision == "ieee" else 4
    if q.element_size() == 2 and block_g * block_d <= 2048:  # the tuned family's range
        tiles = attention_decode_tiles(q)
        block_n, programs_per_sm = tiles["BLOCK_N"], tiles["PROGRAMS_PER_SM"]
        num_warps, num_stages = tiles["num_warps"], tiles["num_stages"]
    # Splits: decode reads each KV byte once, so the aim is only enough programs to keep every
    # SM streaming and balanced across unequal caches, over the (request, active KV head)
    # pairs, but no split under 2 blocks, below which the fp32 partials a split writes and the
    # combine re-reads (G*Dh*8 bytes) stop being small next to the K/V bytes it reads
    # (2*split_len*Dh*2).
    target = programs_per_sm * _num_sms(device_index(q.device))
    pairs = max(q.shape[0] * active_kv_heads, 1)
    splits = min(-(-target // pairs), max(-(-num_blocks(block_n) // 2), 1), 256)
    return dict(
        BLOCK_N=block_n, num_splits=max(splits, 1), INPUT_PRECISION=precision, num_warps=num_warps,
        num_stages=num_stages,
    )


def _forward_torch(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    batch, q_heads, head_dim = q.shape
    kv_heads, kv_len = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    used_kv = kv_heads if heads_per_request is not None else heads // group
    lo, hi, same_lengths = 0, kv_len, False
    if q.device.type == "cpu" and batch:  # reading the lengths is free: only the positions some request sees
        shortest, longest = (int(n) for n in cache_seqlens.aminmax())
        hi = min(longest, kv_len)
        lo = max(shortest - window, 0) if window else 0
        same_lengths = shortest == longest
    if used_kv == 0 or hi <= lo:
        return q.new_zeros(batch, q_heads, head_dim)

    k, v = k_cache[:, :used_kv, lo:hi], v_cache[:, :used_kv, lo:hi]
    mask = None
    lengths = cache_seqlens.reshape(-1, 1)
    if not same_lengths:  # every request sees all of [lo, hi) otherwise
        positions = torch.arange(lo, hi, device=q.device)
        visible = positions < lengths
        if window:
            visible &= positions >= lengths - window
        # Positions a request does not see may hold anything (NaN or inf too): zeroed, not
        # only masked (a masked NaN score, or a NaN value at probability 0, is still NaN).
        k, v = (torch.where(visible[:, None, :, None], t, 0.0) for t in (k, v))
        mask = visible.reshape(batch, 1, 1, hi - lo)
    # A KV head's G query heads are G queries against its cache: no GQA copy of the cache.
    used = F.scaled_dot_product_attention(
        q[:, : used_kv * group].reshape(batch, used_kv, group, head_dim), k, v, attn_mask=mask, scale=softmax_scale,
    ).reshape(batch, used_kv * group, head_dim)
    # An empty cache attends to nothing (softmax over no position).
    keep = lengths > 0
    if heads_per_request is not None:
        keep = keep & (torch.arange(q_heads, device=q.device) < heads_per_request.reshape(-1, 1))
    used = torch.where(keep[:, :, None], used, torch.zeros((), dtype=used.dtype, device=used.device))
    if used_kv == kv_heads:
        return used
    out = q.new_zeros(batch, q_heads, head_dim)
    out[:, : used_kv * group] = used
    return out


def _forward_triton(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    from flextron_kernels.triton.attention_decode import attention_decode

    group = q.shape[1] // k_cache.shape[1]
    active_kv_heads = k_cache.shape[1] if heads_per_request is not None else heads // group
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    return attention_decode(
        q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, out,
        config=decode_config(q, k_cache, active_kv_heads, window), window=window,
    )


# --------------------------------------------------------------------------- #
# Custom op
# --------------------------------------------------------------------------- #
@torch.library.custom_op("flextron::elastic_attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    heads_per_request: Optional[torch.Tensor],
    heads: int,
    softmax_scale: float,
    window: int,
) -> torch.Tensor:
    """``q [B, Hq, Dh]`` against ``k_cache, v_cache [B, Hkv, S_max, Dh]`` -> ``out [B, Hq, Dh]``
    (contiguous). Request ``b`` uses its first ``heads_per_request[b]`` query heads (None:
    ``heads`` for every request) and cache positions ``< cache_seqlens[b]`` (and, with a
    ``window`` > 0, ``>= cache_seqlens[b] - window``); zeros elsewhere."""
    check_window(window, True, none=0)  # the op is public too: the same rule
    return _forward_impl(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, window)


def _forward_impl(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    """The implementation of :func:`_decode_op`."""
    impl = _forward_triton if _select(q) == "triton" else _forward_torch
    return impl(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale,
                effective_window(window, k_cache.shape[2]))


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, heads_per_request, heads, softmax_scale, window):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------- #
# Public function
# --------------------------------------------------------------------------- #
def _check_values(cache_seqlens, heads_per_request, kv_len, q_heads, kv_heads):
    """The range of ``cache_seqlens`` and of ``heads_per_request`` (if any) and that the
    head counts are multiples of the GQA group, from one copy to the host (each copy waits
    for the device: a decode step feels every one)."""
    group = q_heads // kv_heads
    summaries = [width_range(cache_seqlens)]
    if heads_per_request is not None:
        summaries += [width_range(heads_per_request), off_group(heads_per_request, group)]
    values = host_values(*summaries)
    low, high = values[0]
    if low < 0 or high > kv_len:
        raise ValueError(
            f"cache_seqlens: expected every length in [0, {kv_len}] (S_max = k_cache.shape[2]), "
            f"got values in [{low}, {high}]"
        )
    if heads_per_request is not None:
        check_request_head_values(values[1], values[2], q_heads, kv_heads)


def check_request_head_values(head_range, off_group_values, q_heads: int, kv_heads: int) -> None:
    """Per-request head counts on the host: ``head_range`` (:func:`width_range`) within
    ``[0, Hq]`` and no count off the GQA group (:func:`off_group`)."""
    check_width_range("heads", *head_range, q_heads)
    any_bad, index, value = off_group_values
    if any_bad:
        raise ValueError(
            f"heads: expected every head count to be a multiple of the GQA group size {q_heads // kv_heads} "
            f"(Hq // Hkv = {q_heads} // {kv_heads}), got {value} for request {index}"
        )


def check_cache_seqlens(cache_seqlens, batch: int, device: torch.device) -> None:
    check_tensor("cache_seqlens", cache_seqlens, device=device, shape=(batch,))
    if cache_seqlens.dtype not in INTEGER_DTYPES:
        raise TypeError(f"cache_seqlens: expected an integer tensor (int32 or int64), got dtype {cache_seqlens.dtype}")


def check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int,
                 batch_source: str = "q") -> None:
    """``k_cache, v_cache [batch, Hkv, S_max, Dh]`` of ``q [., Hq, Dh]``'s dtype and device,
    ``Hq`` a positive multiple of ``Hkv``, ``Dh`` at most :data:`MAX_HEAD_DIM`
    (``batch_source``: the argument ``batch`` comes from, for the message)."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    check_tensor("k_cache", k_cache, ndim=4, device=q.device)
    check_same_dtype("k_cache", k_cache, q.dtype, "q")
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache: expected shape [{batch}, Hkv, S_max, {head_dim}] "
            f"({'B and Dh from q' if batch_source == 'q' else f'B from {batch_source}, Dh from q'}), "
            f"got {tuple(k_cache.shape)}"
        )
    check_tensor("v_cache", v_cache, device=q.device, shape=k_cache.shape)
    check_same_dtype("v_cache", v_cache, q.dtype, "q")
    kv_heads = k_cache.shape[1]
    if kv_heads == 0 or q_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"q: expected a number of heads (q.shape[1] = {q_heads}) that is a positive multiple of "
            f"the number of KV heads (k_cache.shape[1] = {kv_heads})"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dimension (q.shape[2]) in [1, {MAX_HEAD_DIM}], got {head_dim}")


def check_request_heads(heads, batch: int, q_heads: int, kv_heads: int, device: torch.device):
    """``heads`` (an int or a ``[batch]`` integer tensor in ``[0, Hq]``, multiples of the GQA
    group) as ``(per-request tensor or None, the int or the bound)``; the tensor's values
    are left to the caller's one copy to the host."""
    group = q_heads // kv_heads
    if heads is None:
        raise TypeError(f"heads: expected an int or an integer tensor of shape ({batch},), got None")
    if isinstance(heads, torch.Tensor):
        # Device and shape first, so that the messages name q rather than check_widths' x.
        check_tensor("heads", heads, device=device, shape=(batch,))
    heads_per_request, num_heads = check_widths(
        "heads", heads, high=q_heads, default=q_heads, token_shape=(batch,), device=device, check_values=False
    )
    if heads_per_request is None and num_heads % group:
        raise ValueError(
            f"heads: expected a multiple of the GQA group size {group} (Hq // Hkv = {q_heads} // {kv_heads}), "
            f"got {num_heads}"
        )
    return heads_per_request, num_heads


@outside_autocast("q", "k_cache", "v_cache")
def elastic_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    heads: Union[int, torch.Tensor],
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Attention of one new query per request to its KV cache, with a head count per request.

    Args:
        q: ``[B, Hq, Dh]``, fp32, fp16 or bf16, any strides; ``Dh <= 256``.
        k_cache, v_cache: ``[B, Hkv, S_max, Dh]``, same dtype and device as ``q``, any
            strides; ``Hq`` a multiple of ``Hkv`` (query head ``h`` reads KV head
            ``h // (Hq // Hkv)``).
        cache_seqlens: ``[B]`` integer tensor in ``[0, S_max]``: request ``b`` attends to
            cache positions ``< cache_seqlens[b]``.
        heads: an int or a ``[B]`` integer tensor in ``[0, Hq]``, each a multiple of the
            GQA group ``Hq // Hkv``: request ``b`` uses its first ``heads[b]`` query heads
            (and reads only the KV heads those use).
        softmax_scale: the score scale, a float > 0, default ``Dh ** -0.5``.
        window: None, or a sliding window: request ``b`` attends to its last ``window``
            positions only (``>= cache_seqlens[b] - window``), as the prefill's ``window``.

    Returns:
        ``[B, Hq, Dh]`` in the dtype of ``q``, exactly 0 at heads ``h >= heads[b]`` and for
        a request with an empty cache.
    """
    check_tensor("q", q, dtypes=DTYPES, ndim=3)
    batch, q_heads, head_dim = q.shape
    check_caches(q, k_cache, v_cache, batch)
    kv_heads, kv_len = k_cache.shape[1], k_cache.shape[2]
    check_cache_seqlens(cache_seqlens, batch, q.device)
    heads_per_request, num_heads = check_request_heads(heads, batch, q_heads, kv_heads, q.device)
    if batch and value_checks_enabled(cache_seqlens):
        _check_values(cache_seqlens, heads_per_request, kv_len, q_heads, kv_heads)

    softmax_scale = softmax_scale_or_default(softmax_scale, head_dim)
    window = check_window(window, True)

    return call_op(torch.ops.flextron.elastic_attention_decode, _forward_impl,
                   q, k_cache, v_cache, cache_seqlens, heads_per_request, num_heads, float(softmax_scale), window)
