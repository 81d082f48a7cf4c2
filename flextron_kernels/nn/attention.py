"""ElasticAttention: an attention block whose query-head count is chosen per token, and
the KV cache layout that generation uses.

Heads are nested: a token using ``h`` query heads uses the first ``h`` rows blocks of
the Q projection and the first ``h`` column blocks of the O projection; a sequence's
KV heads are fixed by its cap ``c`` (its largest head count): the first ``c // g`` KV
heads, for every token of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from flextron_kernels.nn.linear import ElasticLinear
from flextron_kernels.nn.norm import RMSNorm
from flextron_kernels.nn.rotary import apply_rotary, check_rope_scaling, rotary_cos_sin
from flextron_kernels.ops.checks import (
    INTEGER_DTYPES,
    check_cu_seqlens_values,
    check_tensor,
    host_values,
    off_group,
    skip_width_value_checks,
    value_checks_enabled,
    width_range,
)
from flextron_kernels.ops.elastic_attention import check_window, elastic_attention, one_sequence
from flextron_kernels.ops.elastic_attention_decode import check_request_head_values, check_request_heads

Heads = Union[int, torch.Tensor]


@dataclass
class KVCache:
    """One layer's cache: ``k, v [B, Hkv, S_max, Dh]``; request ``b`` holds
    ``seqlens[b]`` positions. Heads past a request's KV cap are never written or read.
    ``heads [B]``: each request's KV cap in query heads, as a prefill or an extension
    filled it (None, or -1 for a request: not recorded); an extension must keep it
    (:meth:`ElasticAttention.extend`)."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    heads: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, *, device=None, dtype=None) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch, dtype=torch.int32, device=device),
        )


class ElasticAttention(nn.Module):
    """Q/K/V/O projections through :func:`~flextron_kernels.elastic_linear`, rotary
    embeddings (Llama) or none (GPT-2), and :func:`~flextron_kernels.elastic_attention`.

    Args:
        d_model: hidden size; q_heads, kv_heads: ``q_heads % kv_heads == 0``;
        head_dim: default ``d_model // q_heads``; qkv_bias / out_bias: projection biases;
        rotary: apply rotary position embeddings with base ``rope_theta`` and
        ``rope_scaling`` (None, or a checkpoint's scaling: see :mod:`flextron_kernels.nn.rotary`);
        causal: each token attends to the tokens before it (decoders) or to all (encoders);
        qk_norm_eps: None, or an RMSNorm over each head's query and key (weights ``[head_dim]``
        shared by the heads) with this epsilon, before the rotary embeddings (Qwen3);
        window: None, or a causal sliding window: a token attends to the last ``window``
        positions up to its own (Mistral's ``sliding_window``), in prefill and decode.
    """

    def __init__(self, d_model: int, q_heads: int, kv_heads: Optional[int] = None, head_dim: Optional[int] = None, *,
                 qkv_bias: bool = False, out_bias: bool = False, rotary: bool = True, rope_theta: float = 10000.0,
                 rope_scaling: Optional[dict] = None, causal: bool = True, qk_norm_eps: Optional[float] = None,
                 window: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        kv_heads = q_heads if kv_heads is None else kv_heads
        if q_heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of q_heads={q_heads}, got {kv_heads}")
        self.q_heads, self.kv_heads = q_heads, kv_heads
        self.group = q_heads // kv_heads
        self.head_dim = head_dim or d_model // q_heads
        self.rotary, self.rope_theta, self.causal = rotary, rope_theta, causal
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self.window = check_window(window, causal) or None
        factory = dict(device=device, dtype=dtype)
        self.q_proj = ElasticLinear(d_model, q_heads * self.head_dim, bias=qkv_bias, **factory)
        self.k_proj = ElasticLinear(d_model, kv_heads * self.head_dim, bias=qkv_bias, **factory)
        self.v_proj = ElasticLinear(d_model, kv_heads * self.head_dim, bias=qkv_bias, **factory)
        self.o_proj = ElasticLinear(q_heads * self.head_dim, d_model, bias=out_bias, **factory)
        if qk_norm_eps is None:
            self.q_norm = self.k_norm = None
        else:
            self.q_norm = RMSNorm(self.head_dim, qk_norm_eps, **factory)
            self.k_norm = RMSNorm(self.head_dim, qk_norm_eps, **factory)

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``cos, sin [T, head_dim]`` of ``positions [T]`` (None without rotary embeddings):
        a model computes them once per call and hands them to every layer."""
        if not self.rotary:
            return None
        return rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype, self.rope_scaling)

    def _rotate(self, q, k, positions, tables):
        if self.q_norm is not None:  # a head a token does not use is zeros, and stays zeros
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.rotary:
            return q, k
        cos, sin = self.rotary_tables(positions, q.dtype) if tables is None else tables
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _project(self, x, heads, kv_cap):
        """Q ``[T, nq, Dh]``, K, V ``[T, nkv, Dh]``. With int ``heads`` and ``kv_cap`` only
        the used heads exist (``nq = heads``, ``nkv = kv_cap // g``); with per-token counts
        all heads do, zero past each token's heads (Q) or KV cap (K, V)."""
        num_tokens, dh = x.shape[0], self.head_dim
        static = not isinstance(heads, torch.Tensor) and not isinstance(kv_cap, torch.Tensor)
        nq, nkv = (heads, kv_cap // self.group) if static else (self.q_heads, self.kv_heads)
        q = self.q_proj(x, out_features=_rows(heads, dh, num_tokens, x.device))
        kv_rows = _rows(_div(kv_cap, self.group), dh, num_tokens, x.device)
        k = self.k_proj(x, out_features=kv_rows)
        v = self.v_proj(x, out_features=kv_rows)
        return q.view(num_tokens, nq, dh), k.view(num_tokens, nkv, dh), v.view(num_tokens, nkv, dh)

    def _output(self, attn, heads):
        num_tokens = attn.shape[0]
        flat = attn.reshape(num_tokens, attn.shape[1] * self.head_dim)
        return self.o_proj(flat, in_features=_rows(heads, self.head_dim, num_tokens, attn.device))

    def forward(self, x: torch.Tensor, *, heads: Optional[Heads] = None, cu_seqlens: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, kv_cap: Optional[Heads] = None,
                cache: Optional[KVCache] = None, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Prefill over packed sequences (optionally filling a KV cache).

        Args:
            x: ``[T, d_model]``; heads: int or ``[T]`` (default all), multiples of the GQA
                group; cu_seqlens: ``[B + 1]`` (default one sequence); positions: ``[T]``
                rotary positions (default: the position within the sequence); kv_cap:
                int or ``[T]`` KV cap per token in query heads (default: ``heads`` when an
                int, else the largest head count of the token's sequence); cache: a
                :class:`KVCache` with one request per sequence, filled from position 0 (its
                ``seqlens`` become the sequence lengths); rotary: :meth:`rotary_tables` of
                the positions, when the caller has them (default: computed here).
        """
        num_tokens = x.shape[0]
        heads = self.q_heads if heads is None else heads
        if cu_seqlens is None:
            cu_seqlens = one_sequence(num_tokens, x.device)
        seq_ids = torch.bucketize(torch.arange(num_tokens, device=x.device), cu_seqlens[1:].to(torch.int64), right=True)
        if positions is None:
            positions = torch.arange(num_tokens, device=x.device) - cu_seqlens.to(torch.int64)[seq_ids]
        if kv_cap is None:
            kv_cap = heads if not isinstance(heads, torch.Tensor) else _sequence_max(heads, seq_ids, cu_seqlens.numel() - 1)
        elif value_checks_enabled(x) and bool(torch.as_tensor(heads).gt(torch.as_tensor(kv_cap)).any()):
            raise ValueError("kv_cap: expected every token's cap to be at least its heads")
        q, k, v = self._project(x, heads, kv_cap)
        q, k = self._rotate(q, k, positions, rotary)
        if cache is not None:
            nkv = k.shape[1]
            cache.k[seq_ids, :nkv, positions] = k.to(cache.k.dtype)
            cache.v[seq_ids, :nkv, positions] = v.to(cache.v.dtype)
            cache.seqlens.copy_(cu_seqlens[1:] - cu_seqlens[:-1])
            cache.heads = _per_request(kv_cap, seq_ids, cu_seqlens.numel() - 1, x.device)
        if q.shape[1] == 0:  # no head at all: only the output projection's bias remains
            return self._output(q, heads)
        attn = elastic_attention(q, k, v, heads=q.shape[1] if not isinstance(heads, torch.Tensor) else heads,
                                 cu_seqlens=cu_seqlens, causal=self.causal, window=self.window)
        return self._output(attn, heads)

    def decode(self, x: torch.Tensor, cache: KVCache, *, heads: Optional[Heads] = None,
               rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """One new token per request: ``x [B, d_model]``, ``heads`` int or ``[B]`` (each
        request's KV cap; it must not change over a request's life). Appends the token's
        K/V at position ``cache.seqlens[b]`` and advances ``cache.seqlens``. ``rotary``:
        :meth:`rotary_tables` of those positions (default: computed here)."""
        from flextron_kernels.ops.elastic_attention_decode import elastic_attention_decode

        batch = x.shape[0]
        heads = self.q_heads if heads is None else heads
        positions = cache.seqlens.to(torch.int64)
        q, k, v = self._project(x, heads, heads)
        q, k = self._rotate(q, k, positions, rotary)
        index = torch.arange(batch, device=x.device)
        nkv = k.shape[1]
        cache.k[index, :nkv, positions] = k.to(cache.k.dtype)
        cache.v[index, :nkv, positions] = v.to(cache.v.dtype)
        cache.seqlens += 1
        if q.shape[1] == 0:
            return self._output(q, heads)
        attn = elastic_attention_decode(
            q, cache.k[:, :nkv], cache.v[:, :nkv], cache_seqlens=cache.seqlens,
            heads=q.shape[1] if not isinstance(heads, torch.Tensor) else heads, window=self.window,
        )
        return self._output(attn, heads)

    def extend(self, x: torch.Tensor, cache: KVCache, *, cu_seqlens: torch.Tensor, heads: Optional[Heads] = None,
               rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """New tokens of each request after those its cache holds (a later chunk of a
        prompt, the next turn of a chat): ``x [T, d_model]``, request ``b``'s at
        ``cu_seqlens[b]:cu_seqlens[b + 1]``; ``heads`` int or ``[B]`` (each request's KV
        cap: the one its cache was filled with). Writes their K/V at positions
        ``cache.seqlens[b]`` onwards, advances ``cache.seqlens``, and attends each to its
        request's cache up to itself. ``rotary``: :meth:`rotary_tables` of those positions."""
        from flextron_kernels.ops.elastic_attention_extend import elastic_attention_extend

        num_tokens = x.shape[0]
        heads = self.q_heads if heads is None else heads
        self.check_extension(cache, cu_seqlens, heads, num_tokens)
        seq_ids, positions = extend_positions(cache.seqlens, cu_seqlens, num_tokens)
        token_heads = heads[seq_ids] if isinstance(heads, torch.Tensor) else heads
        q, k, v = self._project(x, token_heads, token_heads)
        q, k = self._rotate(q, k, positions, rotary)
        nkv = k.shape[1]
        cache.k[seq_ids, :nkv, positions] = k.to(cache.k.dtype)
        cache.v[seq_ids, :nkv, positions] = v.to(cache.v.dtype)
        caps = _per_request(heads, None, cache.seqlens.numel(), x.device)
        # A request without a recorded cap (one that held no position) takes these.
        cache.heads = caps if cache.heads is None else torch.where(_recorded(cache), cache.heads, caps)
        cache.seqlens += (cu_seqlens[1:] - cu_seqlens[:-1]).to(cache.seqlens.dtype)
        if q.shape[1] == 0:
            return self._output(q, token_heads)
        with skip_width_value_checks():  # checked above, before the cache changed
            attn = elastic_attention_extend(
                q, cache.k[:, :nkv], cache.v[:, :nkv], cu_seqlens=cu_seqlens, cache_seqlens=cache.seqlens,
                heads=q.shape[1] if not isinstance(heads, torch.Tensor) else heads, window=self.window,
            )
        return self._output(attn, token_heads)

    def check_extension(self, cache: KVCache, cu_seqlens: torch.Tensor, heads: Heads, num_tokens: int) -> None:
        """The arguments of :meth:`extend`, before it changes the cache: ``cu_seqlens`` of
        the cache's requests, ``heads`` (an int or ``[B]``, multiples of the GQA group, and
        the caps the cache was filled with), and room for the new tokens; values from one
        copy to the host (none where value checks are skipped)."""
        summaries, check_values = self.extension_checks(cache, cu_seqlens, heads, num_tokens)
        if cache.seqlens.numel() and value_checks_enabled(cu_seqlens):
            check_values(host_values(*summaries))

    def extension_checks(self, cache: KVCache, cu_seqlens: torch.Tensor, heads: Heads, num_tokens: int):
        """:meth:`check_extension` in two parts, so that a caller can check several layers
        from one copy to the host: the checks that need no value run now; returns the
        tensors whose values the others need (on the device) and the function that checks
        those values, read on the host (as :func:`host_values` gives them)."""
        batch = cache.seqlens.numel()
        check_tensor("cu_seqlens", cu_seqlens, dtypes=INTEGER_DTYPES, shape=(batch + 1,), device=cache.k.device)
        counts, _ = check_request_heads(heads, batch, self.q_heads, self.kv_heads, cache.k.device)
        summaries = [cu_seqlens, cache.seqlens + (cu_seqlens[1:] - cu_seqlens[:-1])]
        if counts is not None:
            summaries += [width_range(counts), off_group(counts, self.group)]
        if cache.heads is not None:  # a request that holds positions keeps its cap
            summaries.append(cap_change(cache, heads))

        def check_values(values):
            check_cu_seqlens_values(values[0], num_tokens)
            if max(values[1]) > cache.k.shape[2]:
                raise ValueError(f"cache: a request would hold {max(values[1])} positions after this extension, past "
                                 f"its {cache.k.shape[2]} (S_max)")
            if counts is not None:
                check_request_head_values(values[2], values[3], self.q_heads, self.kv_heads)
            if cache.heads is not None:
                check_cap_change(values[-1], cache, heads)

        return summaries, check_values


def cap_change(cache: KVCache, heads: Heads) -> torch.Tensor:
    """``[whether a request that holds positions would change its KV cap, the first such
    request]`` (int64, on the device, for :func:`host_values`); ``cache.heads`` recorded."""
    given = heads if isinstance(heads, torch.Tensor) else torch.full_like(cache.heads, heads)
    changed = (given != cache.heads) & _recorded(cache)
    return torch.stack([changed.any(), changed.to(torch.int32).argmax()]).to(torch.int64)


def check_cap_change(values, cache: KVCache, heads: Heads) -> None:
    """:func:`cap_change`'s values, read on the host."""
    if values[0]:
        b = values[1]
        given = int(heads[b]) if isinstance(heads, torch.Tensor) else heads
        raise ValueError(
            f"heads: expected each request's KV cap as its cache was filled (request {b}: {int(cache.heads[b])} "
            f"query heads), got {given}: an extension continues a request at the budget it started with"
        )


def _recorded(cache: KVCache) -> torch.Tensor:
    """``[B]`` bool: the requests whose KV cap ``cache.heads`` holds (they hold positions,
    and a prefill or extension recorded it; a decode step records none)."""
    return (cache.seqlens > 0) & (cache.heads >= 0)


def _per_request(caps: Heads, seq_ids: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """Each request's KV cap ``[B]`` (int32) from an int, a ``[B]`` tensor (``seq_ids``
    None) or a per-token ``[T]`` tensor (each sequence's largest; -1, none, for an empty one)."""
    if not isinstance(caps, torch.Tensor):
        return torch.full((batch,), caps, dtype=torch.int32, device=device)
    if seq_ids is None:
        return caps.to(device=device, dtype=torch.int32).clone()
    per_seq = torch.full((batch,), -1, dtype=torch.int32, device=device)
    return per_seq.scatter_reduce_(0, seq_ids, caps.reshape(-1).to(torch.int32), reduce="amax")


def extend_positions(cache_seqlens: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int):
    """``(seq_ids [T], positions [T])`` (int64) of new tokens packed by ``cu_seqlens`` that
    follow the ``cache_seqlens`` positions their requests' caches hold."""
    index = torch.arange(num_tokens, device=cu_seqlens.device)
    seq_ids = torch.bucketize(index, cu_seqlens[1:].to(torch.int64), right=True)
    return seq_ids, cache_seqlens.to(torch.int64)[seq_ids] + index - cu_seqlens.to(torch.int64)[seq_ids]


def _div(heads: Heads, group: int) -> Heads:
    return heads // group


def _rows(heads: Heads, head_dim: int, num_tokens: int, device) -> Heads:
    """Projection rows for a head count: ``heads * head_dim`` (int or per-token tensor)."""
    if isinstance(heads, torch.Tensor):
        return (heads.reshape(num_tokens) * head_dim).to(device)
    return heads * head_dim


def _sequence_max(heads: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Each token's sequence's largest head count (no host sync)."""
    per_seq = torch.zeros(max(num_seqs, 1), dtype=heads.dtype, device=heads.device)
    per_seq.scatter_reduce_(0, seq_ids, heads.reshape(-1), reduce="amax")
    return per_seq[seq_ids]
