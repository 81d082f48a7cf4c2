"""The meaning of every op, in plain PyTorch.

This module is the specification the kernels are tested against: readable,
autograd-capable, and correct in any dtype (fp64 included). It is not tuned for
speed; the op layer (`flextron_kernels.ops`) dispatches to fast backends.

Conventions (see the README):
- weights use ``nn.Linear``'s layout ``[out_features, in_features]``;
- a width ``w`` always means the *first* ``w`` rows or columns (a prefix);
- output positions a token does not use are exactly zero.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

Width = Union[None, int, torch.Tensor]


# --------------------------------------------------------------------------- #
# Routing metadata
# --------------------------------------------------------------------------- #
class RoutingMetadata(NamedTuple):
    """Tokens grouped by width, and a tile schedule over the groups.

    All tensors are int32 and live on the widths' device. With ``T`` tokens,
    ``G`` groups and block size ``block_m``, ``max_tiles = cdiv(T, block_m) + G``.

    - ``sorted_token_idx [T]``: token indices ordered by group; within a group,
      by increasing token index (a stable sort).
    - ``group_offsets [G + 1]``: group ``g`` occupies
      ``sorted_token_idx[group_offsets[g]:group_offsets[g + 1]]``.
    - ``tile_group [max_tiles]``: the group of each tile, ``-1`` past the last tile.
    - ``tile_start [max_tiles]``, ``tile_end [max_tiles]``: the tile covers
      ``sorted_token_idx[tile_start:tile_end]`` (at most ``block_m`` rows, never
      crossing a group boundary); both are ``T`` past the last tile.
    - ``num_tiles [1]``: how many leading entries of the tile arrays are used.
    """

    sorted_token_idx: torch.Tensor
    group_offsets: torch.Tensor
    tile_group: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    num_tiles: torch.Tensor


def max_tiles(num_tokens: int, num_groups: int, block_m: int) -> int:
    """Size of the tile arrays: an upper bound on sum_g cdiv(count_g, block_m)."""
    return -(-num_tokens // block_m) + num_groups


def routing_metadata(widths: torch.Tensor, boundaries: torch.Tensor, block_m: int) -> RoutingMetadata:
    """Group tokens by width and lay out tiles of at most ``block_m`` tokens.

    Args:
        widths: ``[T]`` integer tensor, each token's width (or head count).
        boundaries: ``[G]`` strictly increasing integer tensor, the groups' upper
            bounds (usually the allowed widths). Token ``t`` is in group ``g``, the
            smallest ``g`` with ``widths[t] <= boundaries[g]``; a width above the
            last boundary is put in the last group (the op layer rejects such widths
            before they get here).
        block_m: tile height in tokens (> 0).
    """
    num_tokens, num_groups = widths.numel(), boundaries.numel()
    device = widths.device
    group = torch.bucketize(widths.to(torch.int64), boundaries.to(torch.int64), right=False)
    group = group.clamp_(max=num_groups - 1)

    counts = torch.zeros(num_groups, dtype=torch.int64, device=device)
    counts.scatter_add_(0, group, torch.ones_like(group))
    group_offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    group_offsets[1:] = torch.cumsum(counts, 0)
    sorted_token_idx = torch.sort(group, stable=True).indices

    tiles_per_group = (counts + block_m - 1) // block_m
    first_tile_of_group = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    num_tiles = tiles_per_group.sum()

    n_slots = max_tiles(num_tokens, num_groups, block_m)
    slot = torch.arange(n_slots, device=device)
    # The group of tile `slot` is the last group whose first tile is <= slot
    # (groups without tiles share their first tile with the next group, so
    # `right=True` skips them).
    slot_group = torch.searchsorted(first_tile_of_group, slot, right=True) - 1
    slot_group = slot_group.clamp_(0, num_groups - 1)
    used = slot < num_tiles
    start = group_offsets[slot_group] + (slot - first_tile_of_group[slot_group]) * block_m
    end = torch.minimum(start + block_m, group_offsets[slot_group + 1])
    tile_group = torch.where(used, slot_group, -1)
    tile_start = torch.where(used, start, num_tokens)
    tile_end = torch.where(used, end, num_tokens)

    i32 = torch.int32
    return RoutingMetadata(
        sorted_token_idx.to(i32),
        group_offsets.to(i32),
        tile_group.to(i32),
        tile_start.to(i32),
        tile_end.to(i32),
        num_tiles.reshape(1).to(i32),
    )


# --------------------------------------------------------------------------- #
# Elastic linear
# --------------------------------------------------------------------------- #
def _prefix_mask(widths: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., size]`` bool: position ``j`` is inside the token's prefix."""
    return torch.arange(size, device=widths.device) < widths.unsqueeze(-1)


def elastic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_features: Width = None,
    in_features: Width = None,
    max_out_features: Optional[int] = None,
) -> torch.Tensor:
    """Linear layer on a prefix of the weight.

    Shapes: ``weight [N, K]``, ``bias [N]``, ``x [..., Kx]`` with ``Kx = K``, or
    ``Kx = k`` when ``in_features`` is the int ``k``.

    - ``in_features`` ``k`` (int or None = ``Kx``): ``y = x[..., :k] @ weight[:n, :k].T``.
      As a tensor of shape ``x.shape[:-1]``, token ``t`` uses ``x[t, :k_t]`` and
      ``weight[:, :k_t]``; entries of ``x`` beyond ``k_t`` are ignored.
    - ``out_features`` ``n`` (int or None = ``N``): output ``[..., n]``. As a tensor
      of shape ``x.shape[:-1]``: output ``[..., max_out_features or N]`` with
      ``y[t, j]`` computed for ``j < n_t`` and exactly 0 beyond.
    - ``bias[:n]`` (or ``bias[j]`` for ``j < n_t``) is added where the output is used.
    """
    lead = x.shape[:-1]
    n_full, k_full = weight.shape
    k_in = x.shape[-1]

    if isinstance(in_features, torch.Tensor):
        k_used = k_in
        x = torch.where(_prefix_mask(in_features, k_in), x, torch.zeros((), dtype=x.dtype, device=x.device))
    else:
        k_used = k_in if in_features is None else in_features
        x = x[..., :k_used]

    if isinstance(out_features, torch.Tensor):
        n_used = n_full if max_out_features is None else max_out_features
    else:
        n_used = n_full if out_features is None else out_features

    y = x @ weight[:n_used, :k_used].T
    if bias is not None:
        y = y + bias[:n_used]
    if isinstance(out_features, torch.Tensor):
        y = torch.where(_prefix_mask(out_features, n_used), y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y.reshape(*lead, n_used)


# --------------------------------------------------------------------------- #
# Elastic MLP
# --------------------------------------------------------------------------- #
GATED_ACTIVATIONS = ("silu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """The MLP activations: ``silu``, ``gelu`` (erf), ``gelu_tanh`` (GPT-2), ``relu``,
    ``relu2`` (squared ReLU)."""
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if name == "relu":
        return torch.relu(z)
    if name == "relu2":
        return torch.relu(z).square()
    raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")


def elastic_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    width: Union[int, torch.Tensor],
    w_gate: Optional[torch.Tensor] = None,
    b_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    activation: str = "silu",
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """An MLP whose hidden width is chosen per token (or once for all tokens).

    Shapes: ``x [..., D]``, ``w_up [F, D]``, ``w_gate [F, D]`` or None, ``w_down [D, F]``,
    ``b_up [F]``, ``b_down [D]``, ``width`` an int or ``[...]`` integer tensor in
    ``[0, F]``, ``scale`` ``[...]`` float or None. For token ``t`` with width ``w``:

        h = act(x @ w_gate[:w].T) * (x @ w_up[:w].T + b_up[:w])     (gated)
        h = act(x @ w_up[:w].T + b_up[:w])                          (ungated)
        out = scale * (h @ w_down[:, :w].T) + b_down
    """
    ffn = w_up.shape[0]
    widths = width if isinstance(width, torch.Tensor) else torch.full(x.shape[:-1], width, device=x.device)
    used = torch.arange(ffn, device=x.device) < widths.unsqueeze(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    up = x @ w_up.T
    if b_up is not None:
        up = up + b_up
    _act = globals()["activation"]
    hidden = _act(activation, x @ w_gate.T) * up if w_gate is not None else _act(activation, up)
    hidden = torch.where(used, hidden, zero)
    out = hidden @ w_down.T
    if scale is not None:
        out = out * scale.unsqueeze(-1)
    if b_down is not None:
        out = out + b_down
    return out


# --------------------------------------------------------------------------- #
# Elastic attention
# --------------------------------------------------------------------------- #
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
    """Attention over packed variable-length sequences where each token uses its first
    ``heads[t]`` query heads.

    Shapes: ``q [T, Hq, Dh]``, ``k, v [T, Hkv, Dh]`` with ``Hq % Hkv == 0`` (query head
    ``h`` reads KV head ``h // (Hq // Hkv)``), ``cu_seqlens [B + 1]`` (sequence ``b`` is
    tokens ``cu_seqlens[b]:cu_seqlens[b+1]``; None: one sequence), ``heads`` an int or
    ``[T]`` integer tensor. Query ``t`` attends to the keys of its own sequence (those at or
    before ``t`` when ``causal``; with a ``window``, only the ``window`` positions up to
    ``t``), whatever head count the key tokens use. Output ``[T, Hq, Dh]``, exactly zero
    at heads ``h >= heads[t]``.
    """
    num_tokens, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, num_tokens], device=q.device)
    seq_id = torch.bucketize(torch.arange(num_tokens, device=q.device), cu_seqlens[1:].to(torch.int64), right=True)
    pos = torch.arange(num_tokens, device=q.device)
    allowed = seq_id[:, None] == seq_id[None, :]
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)

    k_full = k.repeat_interleave(group, dim=1)
    v_full = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k_full) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", probs, v_full)
    head_counts = heads if isinstance(heads, torch.Tensor) else torch.full((num_tokens,), heads, device=q.device)
    used = torch.arange(q_heads, device=q.device) < head_counts.reshape(-1, 1)
    return torch.where(used[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


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
    """One query per request against its KV cache, with a per-request head count.

    Shapes: ``q [B, Hq, Dh]``, ``k_cache, v_cache [B, Hkv, S_max, Dh]``,
    ``cache_seqlens [B]`` (request ``b`` attends to cache positions ``< cache_seqlens[b]``,
    with a ``window`` only those ``>= cache_seqlens[b] - window``),
    ``heads`` an int or ``[B]`` integer tensor. Output ``[B, Hq, Dh]``, exactly zero at
    heads ``h >= heads[b]`` (and for a request with an empty cache).
    """
    batch, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k_full = k_cache.repeat_interleave(group, dim=1)
    v_full = v_cache.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k_full) * scale
    positions = torch.arange(k_cache.shape[2], device=q.device)
    valid = positions < cache_seqlens.reshape(-1, 1, 1)
    if window is not None:
        valid = valid & (positions >= cache_seqlens.reshape(-1, 1, 1) - window)
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty cache attends to nothing
    out = torch.einsum("bhs,bhsd->bhd", probs, v_full)
    head_counts = heads if isinstance(heads, torch.Tensor) else torch.full((batch,), heads, device=q.device)
    used = torch.arange(q_heads, device=q.device) < head_counts.reshape(-1, 1)
    return torch.where(used[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


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
    """New tokens of each request against its KV cache, which already holds them (a
    prefill that continues a cache: a later chunk of a prompt, the next turn of a chat).

    Shapes: ``q [T, Hq, Dh]``, the new tokens of request ``b`` at ``cu_seqlens[b]:cu_seqlens[b + 1]``;
    ``k_cache, v_cache [B, Hkv, S_max, Dh]`` holding ``cache_seqlens[b]`` positions of
    request ``b``, its new tokens last; ``heads`` an int or ``[B]`` integer tensor. New
    token ``i`` of ``L`` is at position ``p = cache_seqlens[b] - L + i`` and attends to the
    cache positions ``<= p`` (with a ``window``, only those ``> p - window``). Output
    ``[T, Hq, Dh]``, exactly zero at heads ``h >= heads[b]``.
    """
    num_tokens, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    seq = torch.bucketize(torch.arange(num_tokens, device=q.device), cu_seqlens[1:].to(torch.int64), right=True)
    new_tokens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    index = torch.arange(num_tokens, device=q.device) - cu_seqlens.to(torch.int64)[seq]
    token_positions = cache_seqlens.to(torch.int64)[seq] - new_tokens[seq] + index  # [T]
    k_full = k_cache.repeat_interleave(group, dim=1)[seq]  # [T, Hq, S_max, Dh]
    v_full = v_cache.repeat_interleave(group, dim=1)[seq]
    scores = torch.einsum("thd,thsd->ths", q, k_full) * scale
    positions = torch.arange(k_cache.shape[2], device=q.device)
    visible = positions <= token_positions.reshape(-1, 1, 1)
    if window is not None:
        visible = visible & (positions > token_positions.reshape(-1, 1, 1) - window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("ths,thsd->thd", probs, v_full)
    head_counts = (heads if isinstance(heads, torch.Tensor) else torch.full(new_tokens.shape, heads, device=q.device))[seq]
    used = torch.arange(q_heads, device=q.device) < head_counts.reshape(-1, 1)
    return torch.where(used[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
