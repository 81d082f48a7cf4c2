"""elastic_attention: packed variable-length attention with a per-token number of query heads.

Meaning: :func:`flextron_kernels.reference.elastic_attention`. Two custom ops (with fake
implementations) and an autograd function that calls them:

- ``flextron::elastic_attention_fwd(q, k, v, cu_seqlens, heads, static_heads, causal, window, scale) -> (out, lse)``
- ``flextron::elastic_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, scale) -> (dq, dk, dv)``

(``window`` 0: none; else a causal sliding window of that many positions.)

Triton path: flash attention (online softmax, never a T x T matrix) over tiles that
never cross a sequence boundary; a (tile, query head) that no token of the tile uses
writes zeros and reads nothing. The torch path loops over sequences (one host sync) and
is meant for CPUs and for checking.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from flextron_kernels.backends import select_backend
from flextron_kernels.ops.checks import (
    FLOAT_DTYPES,
    INTEGER_DTYPES,
    check_cu_seqlens_values,
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
from flextron_kernels.ops.common import (
    call_op,
    dispatch_state,
    dispatch_state_restored,
    outside_autocast,
)
from flextron_kernels.ops.tiles import attention_config


def _select(t: torch.Tensor) -> str:
    preferred = ("triton", "torch") if t.is_cuda else ("torch", "triton")
    return select_backend("elastic_attention", t.device, ("triton", "torch"), preferred)


def one_sequence(num_tokens: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens = [0, num_tokens]`` (int32) for one packed sequence, built on the
    device: a tensor copied from the host would break CUDA-graph capture."""
    return torch.arange(2, dtype=torch.int32, device=device) * num_tokens


def _used_heads(heads, static_heads, num_tokens, q_heads, device):
    counts = heads if heads is not None else torch.full((num_tokens,), static_heads, device=device)
    return torch.arange(q_heads, device=device) < counts.reshape(-1, 1)


# --------------------------------------------------------------------------- #
# Torch backend: one sequence at a time, fp32 softmax
# --------------------------------------------------------------------------- #
def _sequence_scores(q, k, scale, causal, window):
    """``q [L, Hkv, g, D]``, ``k [L, Hkv, D]`` -> scores ``[Hkv, g, L, L]`` (fp32, masked)."""
    scores = torch.einsum("tkgd,ukd->kgtu", q, k) * scale
    if causal:
        length = q.shape[0]
        hidden = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        if window:
            hidden |= torch.ones_like(hidden).tril(-window)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _active_kv_heads(q_heads, kv_heads, heads, static_heads):
    """KV heads to compute: with one head count for every token, only the used ones."""
    return kv_heads if heads is not None else static_heads // (q_heads // kv_heads)


def _forward_torch(q, k, v, cu_seqlens, heads, static_heads, causal, window, scale):
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    active = _active_kv_heads(q_heads, kv_heads, heads, static_heads)
    out = torch.zeros(num_tokens, q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q_heads, num_tokens, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start or active == 0:
            continue
        length = end - start
        qs = q[start:end, : active * group].float().reshape(length, active, group, head_dim)
        scores = _sequence_scores(qs, k[start:end, :active].float(), scale, causal, window)
        seq_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - seq_lse[..., None])
        out[start:end, : active * group] = torch.einsum("kgtu,ukd->tkgd", probs, v[start:end, :active].float()).reshape(
            length, active * group, head_dim)
        lse[: active * group, start:end] = seq_lse.reshape(active * group, length)
    used = _used_heads(heads, static_heads, num_tokens, q_heads, q.device)
    out = torch.where(used[:, :, None], out, 0.0).to(q.dtype)
    return out, lse


def _backward_torch(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, scale):
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    used = _used_heads(heads, static_heads, num_tokens, q_heads, q.device)
    dout = torch.where(used[:, :, None], dout.float(), 0.0)
    delta = (dout * out.float()).sum(-1)  # [T, Hq]
    dq = torch.zeros(num_tokens, q_heads, head_dim, dtype=torch.float32, device=q.device)
    dk = torch.zeros(num_tokens, kv_heads, head_dim, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    active = _active_kv_heads(q_heads, kv_heads, heads, static_heads)
    nq = active * group
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start or active == 0:
            continue
        length = end - start
        qs = q[start:end, :nq].float().reshape(length, active, group, head_dim)
        ks, vs = k[start:end, :active].float(), v[start:end, :active].float()
        dos = dout[start:end, :nq].reshape(length, active, group, head_dim)
        seq_lse = lse[:nq, start:end].reshape(active, group, length)
        probs = torch.exp(_sequence_scores(qs, ks, scale, causal, window) - seq_lse[..., None])
        dv[start:end, :active] = torch.einsum("kgtu,tkgd->ukd", probs, dos)
        dprobs = torch.einsum("tkgd,ukd->kgtu", dos, vs)
        seq_delta = delta[start:end, :nq].reshape(length, active, group).permute(1, 2, 0)
        dscores = probs * (dprobs - seq_delta[..., None])
        dq[start:end, :nq] = (torch.einsum("kgtu,ukd->tkgd", dscores, ks) * scale).reshape(length, nq, head_dim)
        dk[start:end, :active] = torch.einsum("kgtu,tkgd->ukd", dscores, qs) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- #
# Triton backend
# --------------------------------------------------------------------------- #
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward_triton(q, k, v, cu_seqlens, heads, static_heads, causal, window, scale):
    from flextron_kernels.triton.attention import attention_fwd

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    config = attention_config(q, "fwd", window=window > 0)
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    attention_fwd(q, k, v, out, lse, heads, static_heads, cu_seqlens, causal=causal, window=window, softmax_scale=scale,
                  config=config)
    return out, lse


def _backward_triton(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, scale):
    from flextron_kernels.triton.attention import attention_bwd, attention_bwd_delta

    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    dq_config, dkdv_config = (attention_config(q, kernel, window=window > 0) for kernel in ("bwd_dq", "bwd_dkdv"))
    delta = new_output((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)  # zero at unused heads
    attention_bwd_delta(out, dout, delta, block_t=dq_config["BLOCK_M"])
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    seq_heads = None
    if heads is not None:  # each sequence's largest head count, so the kernel can skip a head for a whole sequence
        num_seqs = cu_seqlens.numel() - 1
        seq_ids = torch.bucketize(torch.arange(q.shape[0], device=q.device, dtype=cu_seqlens.dtype), cu_seqlens[1:], right=True)
        seq_heads = torch.zeros(max(num_seqs, 1), dtype=torch.int32, device=q.device)
        seq_heads.scatter_reduce_(0, seq_ids, heads.to(torch.int32), reduce="amax")
    attention_bwd(
        q, k, v, dout, lse, delta, dq, dk, dv, heads, seq_heads, static_heads, cu_seqlens,
        causal=causal, window=window, softmax_scale=scale, dq_config=dq_config, dkdv_config=dkdv_config,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------- #
# Custom ops and autograd
# --------------------------------------------------------------------------- #
@torch.library.custom_op("flextron::elastic_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    heads: Optional[torch.Tensor],
    static_heads: int,
    causal: bool,
    window: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]``, ``cu_seqlens [B+1]`` int32, ``heads [T]`` (or
    None: ``static_heads`` for every token), ``window`` (0: none) -> ``out [T, Hq, D]`` and
    ``lse [Hq, T]`` fp32 (natural log; unspecified where the head is unused)."""
    softmax_scale_or_default(softmax_scale, q.shape[-1])  # the op is public too: the same rules
    check_window(window, causal, none=0)
    return _forward_impl(q, k, v, cu_seqlens, heads, static_heads, causal, window, softmax_scale)


def _forward_impl(q, k, v, cu_seqlens, heads, static_heads, causal, window, softmax_scale):
    """The implementation of :func:`_fwd_op` (``softmax_scale`` and ``window`` already checked)."""
    impl = _forward_triton if _select(q) == "triton" else _forward_torch
    return impl(q, k, v, cu_seqlens, heads, static_heads, causal, effective_window(window, q.shape[0]), softmax_scale)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, heads, static_heads, causal, window, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("flextron::elastic_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    heads: Optional[torch.Tensor],
    static_heads: int,
    causal: bool,
    window: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`_fwd_op` (``dq`` zero at unused heads)."""
    return _backward_impl(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, softmax_scale)


def _backward_impl(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, softmax_scale):
    """The implementation of :func:`_bwd_op`."""
    impl = _backward_triton if _select(q) == "triton" else _backward_torch
    return impl(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, effective_window(window, q.shape[0]),
                softmax_scale)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _ElasticAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, heads, static_heads, causal, window, softmax_scale):
        out, lse = call_op(torch.ops.flextron.elastic_attention_fwd, _forward_impl, q, k, v, cu_seqlens, heads,
                           static_heads, causal, window, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, heads)
        ctx.static_heads, ctx.causal, ctx.window, ctx.softmax_scale = static_heads, causal, window, softmax_scale
        ctx.dispatch = dispatch_state()
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, heads = ctx.saved_tensors
        with dispatch_state_restored(ctx.dispatch):
            dq, dk, dv = call_op(torch.ops.flextron.elastic_attention_bwd, _backward_impl,
                                 dout, q, k, v, out, lse, cu_seqlens, heads, ctx.static_heads, ctx.causal,
                                 ctx.window, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Public function
# --------------------------------------------------------------------------- #
def _check_values(cu_seqlens, head_counts, num_tokens, q_heads, kv_heads):
    """The offsets in ``cu_seqlens`` (if given), the range of ``head_counts`` (if any) and
    that the head counts are multiples of the GQA group, from one copy to the host (each
    copy waits for the device)."""
    group = q_heads // kv_heads
    summaries = [] if cu_seqlens is None else [cu_seqlens]
    counted = head_counts is not None and head_counts.numel() > 0
    if counted:
        summaries.append(width_range(head_counts))
        if group > 1:
            summaries.append(off_group(head_counts, group))
    if not summaries:
        return
    values = host_values(*summaries)
    if cu_seqlens is not None:
        check_cu_seqlens_values(values.pop(0), num_tokens)
    if counted:
        check_width_range("heads", *values[0], q_heads)
        if group > 1 and values[1][0]:
            bad = head_counts[head_counts % group != 0]  # the error's own copy to the host
            raise ValueError(f"heads: expected multiples of the GQA group {group} (Hq={q_heads}, Hkv={kv_heads}), "
                             f"got {bad[:4].tolist()}")


def check_window(window, causal: bool, *, none=None) -> int:
    """``window`` as the kernels take it (0: none): None (or ``none``) or an int >= 1, with
    ``causal`` attention."""
    if window is None or (window == none and not isinstance(window, bool)):
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected None or an int >= 1 (a sliding window of positions), got {window!r}")
    if not causal:
        raise ValueError(f"window: a sliding window is causal (a query sees the window's positions up to its own); "
                         f"expected causal=True, got causal=False with window={window}")
    return window


def effective_window(window: int, positions: int) -> int:
    """``window`` (0: none) as the kernels run it over at most ``positions`` positions: a
    window that long or longer hides nothing, and the kernels' 32-bit position arithmetic
    never sees a larger one."""
    return 0 if window >= positions else window


def check_head_dim(name: str, head_dim: int) -> None:
    # The kernels hold a (tile, head_dim) block in registers, padded to a power of two.
    if not 1 <= head_dim <= 256:
        raise ValueError(f"{name}: expected a head dimension in [1, 256], got {head_dim}")


@outside_autocast("q", "k", "v")
def elastic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: Union[int, torch.Tensor],
    cu_seqlens: Optional[torch.Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Attention over packed sequences where token ``t`` uses its first ``heads[t]`` query heads.

    Args:
        q: ``[T, Hq, Dh]``; k, v: ``[T, Hkv, Dh]`` with ``Hq % Hkv == 0`` (GQA group
            ``g = Hq // Hkv``), same dtype (fp32/fp16/bf16) and device; ``Dh <= 256``.
        heads: an int or an integer tensor ``[T]``, each a multiple of ``g`` in
            ``[0, Hq]``.
        cu_seqlens: ``[B + 1]`` integer tensor, non-decreasing from 0 to ``T``
            (sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``); None: one sequence.
        causal: each query sees the keys at or before it in its sequence.
        softmax_scale: a float > 0, default ``Dh ** -0.5``.
        window: None, or (with ``causal``) a sliding window: query ``i`` sees the keys
            ``j`` with ``i - window < j <= i`` (Mistral's ``sliding_window``).

    Returns:
        ``[T, Hq, Dh]``, exactly zero at heads a token does not use.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    num_tokens, q_heads, head_dim = q.shape
    check_tensor("k", k, device=q.device, ndim=3)
    check_same_dtype("k", k, q.dtype, "q")
    kv_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k: expected shape ({num_tokens}, Hkv, {head_dim}) (T and Dh from q), got {tuple(k.shape)}")
    check_tensor("v", v, device=q.device, shape=k.shape)
    check_same_dtype("v", v, q.dtype, "q")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"k: expected a number of KV heads dividing Hq={q_heads}, got {kv_heads}")
    check_head_dim("q", head_dim)
    group = q_heads // kv_heads

    given_cu_seqlens = cu_seqlens
    if cu_seqlens is None:
        cu_seqlens = one_sequence(num_tokens, q.device)
    else:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=INTEGER_DTYPES, ndim=1, device=q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected at least 2 entries (B + 1), got {cu_seqlens.numel()}")
        cu_seqlens = cu_seqlens.to(torch.int32)

    head_counts, static_heads = check_widths("heads", heads, high=q_heads, default=q_heads, token_shape=(num_tokens,),
                                             device=q.device, check_values=False)
    if head_counts is None and static_heads % group:
        raise ValueError(f"heads: expected a multiple of the GQA group {group} (Hq={q_heads}, Hkv={kv_heads}), "
                         f"got {static_heads}")
    if value_checks_enabled(q):
        _check_values(given_cu_seqlens, head_counts, num_tokens, q_heads, kv_heads)

    scale = softmax_scale_or_default(softmax_scale, head_dim)
    window = check_window(window, causal)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Inference: no autograd function, nothing saved (one step less on the host).
        return call_op(torch.ops.flextron.elastic_attention_fwd, _forward_impl, q, k, v, cu_seqlens, head_counts,
                       static_heads, bool(causal), window, scale)[0]
    if v is k:  # torch.compile cannot trace one tensor passed twice to an autograd.Function
        v = v.view(v.shape)
    return _ElasticAttentionFunction.apply(q, k, v, cu_seqlens, head_counts, static_heads, bool(causal), window, scale)
