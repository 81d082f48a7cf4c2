"""elastic_attention: packed variable-length attention with a per-token number of query heads.

Meaning: :func:`flextron_kernels.reference.elastic_attention`. Two custom ops (with fake
implementations) and an autograd function that calls them:

- ``flextron::elastic_attention_fwd(q, k, v, cu_seqlens, heads, static_heads, causal, window, scale) -> (out, lse)``
- ``flextron::elastic_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, scale) -> (dq, dk, dv)``

(``window`` 0: none; else a causal sliding window of that many positions.)

Triton path: flash attention (online softmax, never a T x T matrix) over tiles that
never cross a sequence boundary; a (tile, query head) that no token of the tile uses
writes zeros and reads nothing. The torch path runs the sequences of one length together
(one host sync), through PyTorch's CPU flash attention on a CPU and einsums elsewhere.
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


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- #
# Torch backend: runs of sequences of one length, fp32 (fp64) softmax
# --------------------------------------------------------------------------- #
# PyTorch's CPU flash attention, which also gives the log-sum-exp a backward needs (private
# ops; a torch without them takes the einsum path).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _uses_cpu_flash(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None


def _sequence_groups(cu_seqlens: torch.Tensor):
    """``(start, count, length)``: runs of ``count`` consecutive non-empty sequences of
    ``length`` tokens from token ``start``; all of them in one run when every sequence has
    the same length (one host sync)."""
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if lengths and lengths[0] > 0 and all(n == lengths[0] for n in lengths):
        return [(bounds[0], len(lengths), lengths[0])]
    return [(start, 1, n) for start, n in zip(bounds[:-1], lengths) if n > 0]


def _hidden_positions(length, causal, window, device):
    """``[L, L]`` bool, True where a query (row) may not see a key (column); None if none."""
    if not causal:
        return None
    hidden = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if window:
        hidden |= torch.ones_like(hidden).tril(-window)
    return hidden


def _scores(q, k, scale, hidden):
    """``q [n, L, Hkv, g, D]``, ``k [n, L, Hkv, D]`` -> ``[n, Hkv, g, L, L]`` (their dtype, masked)."""
    scores = torch.einsum("ntkgd,nukd->nkgtu", q, k) * scale
    return scores if hidden is None else scores.masked_fill(hidden, float("-inf"))


def _flash_inputs(q, k, v, causal, window):
    """``q [n, L, Hkv, g, D]``, ``k, v [n, L, Hkv, D]`` as the CPU flash op takes them
    (``[n, Hq, L, D]``, each query head's KV head repeated), its ``is_causal`` and its mask
    (additive, for a window)."""
    n, length, kv_heads, group, head_dim = q.shape
    q = q.reshape(n, length, kv_heads * group, head_dim).transpose(1, 2)
    k, v = (t[:, :, :, None].expand(n, length, kv_heads, group, head_dim)
            .reshape(n, length, kv_heads * group, head_dim).transpose(1, 2) for t in (k, v))
    if not window:
        return q, k, v, causal, None
    hidden = _hidden_positions(length, causal, window, q.device)
    return q, k, v, False, torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(hidden, float("-inf"))


def _attend(q, k, v, causal, window, scale):
    """One run of sequences of one length: ``q [n, L, Hkv, g, D]``, ``k, v [n, L, Hkv, D]``
    (fp32 or fp64) -> ``out [n, L, Hkv * g, D]`` and ``lse [n, Hkv * g, L]``."""
    n, length, kv_heads, group, head_dim = q.shape
    if _uses_cpu_flash(q):
        fq, fk, fv, is_causal, mask = _flash_inputs(q, k, v, causal, window)
        out, lse = _CPU_FLASH(fq, fk, fv, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out.transpose(1, 2), lse
    scores = _scores(q, k, scale, _hidden_positions(length, causal, window, q.device))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("nkgtu,nukd->ntkgd", torch.exp(scores - lse[..., None]), v)
    return out.reshape(n, length, kv_heads * group, head_dim), lse.reshape(n, kv_heads * group, length)


def _attend_backward(dout, q, k, v, out, lse, causal, window, scale):
    """Gradients of :func:`_attend`: ``dout, out [n, L, Hq, D]``, ``lse [n, Hq, L]``, ``q, k,
    v`` as there -> ``dq [n, L, Hq, D]``, ``dk, dv [n, L, Hkv, D]``."""
    n, length, kv_heads, group, head_dim = q.shape
    if _uses_cpu_flash(q):
        fq, fk, fv, is_causal, mask = _flash_inputs(q, k, v, causal, window)
        dq, dk, dv = _CPU_FLASH_BACKWARD(dout.transpose(1, 2), fq, fk, fv, out.transpose(1, 2), lse, 0.0, is_causal,
                                         attn_mask=mask, scale=scale)
        dk, dv = (t.transpose(1, 2).reshape(n, length, kv_heads, group, head_dim).sum(3) for t in (dk, dv))
        return dq.transpose(1, 2), dk, dv
    probs = torch.exp(_scores(q, k, scale, _hidden_positions(length, causal, window, q.device))
                      - lse.reshape(n, kv_heads, group, length)[..., None])
    dout = dout.reshape(n, length, kv_heads, group, head_dim)
    delta = (dout * out.reshape(dout.shape)).sum(-1).permute(0, 2, 3, 1)  # [n, Hkv, g, L]
    dv = torch.einsum("nkgtu,ntkgd->nukd", probs, dout)
    dscores = probs * (torch.einsum("ntkgd,nukd->nkgtu", dout, v) - delta[..., None])
    dq = torch.einsum("nkgtu,nukd->ntkgd", dscores, k) * scale
    dk = torch.einsum("nkgtu,ntkgd->nukd", dscores, q) * scale
    return dq.reshape(n, length, kv_heads * group, head_dim), dk, dv


def _computed_heads(heads, static_heads) -> int:
    """Query heads to compute: ``static_heads``, or the largest per-token count (a host sync)."""
    if heads is None:
        return static_heads
    return int(heads.max()) if heads.numel() else 0


def _zero_unused(t: torch.Tensor, heads) -> torch.Tensor:
    """``t [T, Hq, D]`` with zeros at the heads each token does not use (per-token counts)."""
    if heads is not None:
        unused = torch.arange(t.shape[1], device=t.device) >= heads.reshape(-1, 1)
        t.masked_fill_(unused[:, :, None], 0.0)
    return t


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _runs(t, start, count, length, heads):
    """Tokens ``[start, start + count * length)`` of ``t [T, H, D]``, their first ``heads``
    heads, as ``[count, length, heads, D]`` in the compute dtype, the last dimension
    contiguous (the CPU flash op reads it so, whatever its stride)."""
    run = t[start:start + count * length, :heads].to(_compute_dtype(t))
    return _last_dim_contiguous(run).reshape(count, length, heads, -1)


def _grouped(q: torch.Tensor, group: int) -> torch.Tensor:
    """``q [n, L, Hq, D]`` -> ``[n, L, Hq / group, group, D]``."""
    return q.reshape(*q.shape[:2], q.shape[2] // group, group, q.shape[3])


def _forward_torch(q, k, v, cu_seqlens, heads, static_heads, causal, window, scale):
    num_tokens, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    nq = _computed_heads(heads, static_heads)
    out = torch.zeros(num_tokens, q_heads, head_dim, dtype=_compute_dtype(q), device=q.device)
    lse = torch.zeros(q_heads, num_tokens, dtype=torch.float32, device=q.device)
    for start, count, length in (_sequence_groups(cu_seqlens) if nq else ()):
        end = start + count * length
        run_out, run_lse = _attend(_grouped(_runs(q, start, count, length, nq), group),
                                   _runs(k, start, count, length, nq // group), _runs(v, start, count, length, nq // group),
                                   causal, window, scale)
        out[start:end, :nq] = run_out.reshape(end - start, nq, head_dim)
        lse[:nq, start:end] = run_lse.transpose(0, 1).reshape(nq, end - start)
    return _zero_unused(out, heads).to(q.dtype), lse


def _backward_torch(dout, q, k, v, out, lse, cu_seqlens, heads, static_heads, causal, window, scale):
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    nq = _computed_heads(heads, static_heads)
    dout = _zero_unused(dout.to(_compute_dtype(q), copy=True), heads)
    dq = torch.zeros(num_tokens, q_heads, head_dim, dtype=_compute_dtype(q), device=q.device)
    dk = torch.zeros(num_tokens, kv_heads, head_dim, dtype=_compute_dtype(q), device=q.device)
    dv = torch.zeros_like(dk)
    for start, count, length in (_sequence_groups(cu_seqlens) if nq else ()):
        end = start + count * length
        run_lse = lse[:nq, start:end].reshape(nq, count, length).transpose(0, 1).to(_compute_dtype(q))
        grads = _attend_backward(
            _runs(dout, start, count, length, nq), _grouped(_runs(q, start, count, length, nq), group),
            _runs(k, start, count, length, nq // group), _runs(v, start, count, length, nq // group),
            _runs(out, start, count, length, nq), run_lse, causal, window, scale)
        for grad, target, heads_used in zip(grads, (dq, dk, dv), (nq, nq // group, nq // group)):
            target[start:end, :heads_used] = grad.reshape(end - start, heads_used, head_dim)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- #
# Triton backend
# --------------------------------------------------------------------------- #
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
