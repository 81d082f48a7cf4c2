"""elastic_linear: a linear layer on a prefix of its weight, static or per token.

Meaning: :func:`flextron_kernels.reference.elastic_linear`. This module checks the
arguments, picks a backend, and registers three custom ops (each with a fake
implementation, so that ``torch.compile`` traces them):

- ``flextron::elastic_linear(x, weight, bias, out_widths, in_widths, n, k) -> y``,
  differentiable (its autograd formula calls the two ops below);
- ``flextron::elastic_linear_grad_input(dy, weight, out_widths, in_widths, k, kx) -> dx``;
- ``flextron::elastic_linear_grad_weight_(grad_weight!, grad_bias!, dy, x, out_widths, in_widths, k)``,
  which accumulates into the used prefix of the gradient buffers in place.

Backends: static widths on CUDA go to cuBLAS on strided views of the weight (already
at dense speed, with no copy; the backward accumulates ``dW[:n, :k] += dy.T @ x`` with
one ``addmm_`` into the prefix); per-token widths on CUDA go to the Triton kernels,
which group tokens by width, gather rows on load and skip tiles outside each group's
prefix; the torch backend (any device) computes the used prefix and masks.

Weight gradients: when ``weight`` (and ``bias``) are ``nn.Parameter`` leaves, in eager
mode, the backward accumulates straight into ``weight.grad[:n, :k]`` (allocating a
zero ``.grad`` on first use) and hands autograd no weight gradient: elastic training
runs several sub-networks per step, none of which then pays for a full-size gradient.
Under ``torch.compile``, for plain tensors, or inside
:func:`full_size_weight_grads`, autograd gets ordinary full-size gradients instead.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from flextron_kernels.backends import select_backend
from flextron_kernels.ops.checks import (
    FLOAT_DTYPES,
    check_int,
    check_same_dtype,
    check_tensor,
    check_widths,
    new_output,
)
from flextron_kernels.ops.common import (
    accumulates_in_place,
    assemble_runs,
    call_op,
    dispatch_state,
    dispatch_state_restored,
    grad_buffer,
    group_tokens,
    mark_written,
    mask_columns,
    matmul_routing,
    outside_autocast,
    runs_directly,
    torch_rows,
    torch_runs,
)
from flextron_kernels.ops.tiles import matmul_config, weight_grad_config

Width = Union[None, int, torch.Tensor]

def _grouping(out_widths, in_widths, n, k):
    """What the routed kernels group tokens by: ``(widths, their bound, by output)``, the
    output widths if per token, else the input widths."""
    return (out_widths, n, True) if out_widths is not None else (in_widths, k, False)


def _select(op: str, t: torch.Tensor, per_token: bool) -> str:
    # cuBLAS on strided views is at dense speed for static widths; routed widths need the kernels.
    preferred = ("triton", "torch") if (t.is_cuda and per_token) else ("torch", "triton")
    return select_backend(op, t.device, ("triton", "torch"), preferred)


def _token_grouping(x, out_widths, in_widths, n, k):
    """The token grouping (``group_tokens``) that the Triton kernels of one forward and its
    backward can share (each would otherwise compute it again), or None where they would
    not group: static widths, or the torch backend."""
    if (out_widths is None and in_widths is None) or _select("elastic_linear", x, True) != "triton":
        return None
    widths, size, _ = _grouping(out_widths, in_widths, n, k)
    return group_tokens(widths, size, matmul_config(x, x.shape[0])["BLOCK_M"])


def _linear_runs(out_widths, in_widths, n, k):
    """The torch backend's runs (:func:`torch_runs`) by the widths the kernels group by:
    ``(rows, out_limit, red_limit, out_mask, in_mask)``, the output and reduction prefixes
    the run computes and the per-token widths that mask its output and its input."""
    widths, size, by_out = _grouping(out_widths, in_widths, n, k)
    for rows, width, mask in torch_runs(widths, size):
        if by_out:
            yield rows, width, k, mask, torch_rows(in_widths, rows)
        else:
            yield rows, n, width, None, mask


def _forward_torch_runs(x, weight, bias, out_widths, in_widths, n, k):
    run_values = []
    for rows, out_limit, red_limit, out_mask, in_mask in _linear_runs(out_widths, in_widths, n, k):
        x_rows = mask_columns(torch_rows(x, rows)[:, :red_limit], in_mask)
        y_rows = F.linear(x_rows, weight[:out_limit, :red_limit], None if bias is None else bias[:out_limit])
        run_values.append((rows, out_limit, mask_columns(y_rows, out_mask)))
    return assemble_runs((x.shape[0], n), x, run_values)


def _forward_impl(x, weight, bias, out_widths, in_widths, n, k, *, grouping=None):
    """``grouping``: :func:`_token_grouping` of these widths, if at hand."""
    per_token = out_widths is not None or in_widths is not None
    if _select("elastic_linear", x, per_token) == "torch":
        if per_token:
            return _forward_torch_runs(x, weight, bias, out_widths, in_widths, n, k)
        # Views only where they narrow: each costs host time, which decode steps feel.
        xs = x if k == x.shape[1] else x[:, :k]
        w = weight if (n, k) == weight.shape else weight[:n, :k]
        b = bias if bias is None or n == bias.shape[0] else bias[:n]
        return F.linear(xs, w, b)

    from flextron_kernels.triton.routed_matmul import routed_matmul

    config = matmul_config(x, x.shape[0])
    widths, size, _ = _grouping(out_widths, in_widths, n, k)
    routing = matmul_routing(widths, size, x.shape[0], config["BLOCK_M"], grouped=grouping[0] if grouping else None)
    y = new_output((x.shape[0], n), dtype=x.dtype, device=x.device)
    return routed_matmul(
        x, x.stride(), weight, weight.stride(), bias, y,
        out_widths=out_widths, red_widths=in_widths, out_limit=n, red_limit=k, routing=routing, config=config,
    )


def _grad_input_impl(dy, weight, out_widths, in_widths, k, kx, *, grouping=None):
    num_rows, n = dy.shape
    per_token = out_widths is not None or in_widths is not None
    if _select("elastic_linear", dy, per_token) == "torch":
        if per_token:
            run_values = []
            for rows, out_limit, red_limit, out_mask, in_mask in _linear_runs(out_widths, in_widths, n, k):
                dy_rows = mask_columns(torch_rows(dy, rows)[:, :out_limit], out_mask)
                run_values.append((rows, red_limit, mask_columns(dy_rows @ weight[:out_limit, :red_limit], in_mask)))
            return assemble_runs((num_rows, kx), dy, run_values)
        dx_used = dy @ weight[:n, :k]
        if k == kx:
            return dx_used
        dx = dy.new_zeros(num_rows, kx)
        dx[:, :k] = dx_used
        return dx

    from flextron_kernels.triton.routed_matmul import routed_matmul

    config = matmul_config(dy, num_rows)
    widths, size, _ = _grouping(out_widths, in_widths, n, k)
    routing = matmul_routing(widths, size, num_rows, config["BLOCK_M"], grouped=grouping[0] if grouping else None)
    dx = new_output((num_rows, kx), dtype=dy.dtype, device=dy.device)
    w_strides = weight.stride()
    return routed_matmul(
        dy, dy.stride(), weight, (w_strides[1], w_strides[0]), None, dx,
        out_widths=in_widths, red_widths=out_widths, out_limit=k, red_limit=n, routing=routing, config=config,
    )


def _grad_weight_impl_(grad_weight, grad_bias, dy, x, out_widths, in_widths, k, *, grouping=None):
    n = dy.shape[1]
    per_token = out_widths is not None or in_widths is not None
    backend = _select("elastic_linear", dy, per_token)
    dy_used = None
    if grad_bias is not None and (backend == "torch" or grad_weight is None):
        dy_used = mask_columns(dy, out_widths)
        grad_bias[:n] += dy_used.sum(0).to(grad_bias.dtype)
        grad_bias = None
    if grad_weight is None:
        return
    if backend == "torch":
        for rows, out_limit, red_limit, out_mask, in_mask in _linear_runs(out_widths, in_widths, n, k):
            dy_rows = mask_columns(torch_rows(dy, rows)[:, :out_limit], out_mask)
            x_rows = mask_columns(torch_rows(x, rows)[:, :red_limit], in_mask)
            grad_weight[:out_limit, :red_limit].addmm_(dy_rows.T.to(grad_weight.dtype), x_rows.to(grad_weight.dtype))
        return

    from flextron_kernels.triton.prefix_weight_grad import prefix_weight_grad_

    config = weight_grad_config(dy)
    widths, size, sort_by_out = _grouping(out_widths, in_widths, n, k)
    routing, boundaries = grouping or group_tokens(widths, size, config["BLOCK_M"])
    prefix_weight_grad_(
        grad_weight, grad_bias, dy, x, out_widths=out_widths, in_widths=in_widths, in_limit=k,
        routing=routing, boundaries=boundaries, sort_by_out=sort_by_out, config=config,
    )
    mark_written(grad_weight, grad_bias)


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #
@torch.library.custom_op("flextron::elastic_linear", mutates_args=())
def _elastic_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_widths: Optional[torch.Tensor],
    in_widths: Optional[torch.Tensor],
    n: int,
    k: int,
) -> torch.Tensor:
    """``x [T, Kx]`` -> ``y [T, n]``; ``k <= Kx`` input columns are used (per token:
    ``in_widths [T]``), ``n`` output columns are computed (per token: ``out_widths [T]``,
    zeros beyond)."""
    return _forward_impl(x, weight, bias, out_widths, in_widths, n, k)


@_elastic_linear_op.register_fake
def _(x, weight, bias, out_widths, in_widths, n, k):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("flextron::elastic_linear_grad_input", mutates_args=())
def _grad_input_op(
    dy: torch.Tensor,
    weight: torch.Tensor,
    out_widths: Optional[torch.Tensor],
    in_widths: Optional[torch.Tensor],
    k: int,
    kx: int,
) -> torch.Tensor:
    """``dy [T, n]`` -> ``dx [T, kx]``: ``dx[t, c] = sum_{j < n_t} dy[t, j] W[j, c]`` for
    ``c < k_t``, zero beyond."""
    return _grad_input_impl(dy, weight, out_widths, in_widths, k, kx)


@_grad_input_op.register_fake
def _(dy, weight, out_widths, in_widths, k, kx):
    return dy.new_empty(dy.shape[0], kx)


@torch.library.custom_op("flextron::elastic_linear_grad_weight_", mutates_args=("grad_weight", "grad_bias"))
def _grad_weight_op(
    grad_weight: Optional[torch.Tensor],
    grad_bias: Optional[torch.Tensor],
    dy: torch.Tensor,
    x: torch.Tensor,
    out_widths: Optional[torch.Tensor],
    in_widths: Optional[torch.Tensor],
    k: int,
) -> None:
    """``grad_weight[:n, :k] += dy.T @ x`` and ``grad_bias[:n] += dy.sum(0)`` over the
    positions each token used (``n = dy.shape[1]``)."""
    _grad_weight_impl_(grad_weight, grad_bias, dy, x, out_widths, in_widths, k)


@_grad_weight_op.register_fake
def _(grad_weight, grad_bias, dy, x, out_widths, in_widths, k):
    return None


def _backward(dy, x, weight, out_widths, in_widths, k, need_input_grad, grad_weight, grad_bias, grouping=None):
    """Shared by both autograd paths: returns ``dx`` (or None) and accumulates into the
    given gradient buffers. ``grouping``: the forward's :func:`_token_grouping`, if any."""
    dx = None
    if need_input_grad:
        dx = call_op(torch.ops.flextron.elastic_linear_grad_input, _grad_input_impl, dy, weight, out_widths, in_widths,
                     k, x.shape[1], grouping=grouping)
    if grad_weight is not None or grad_bias is not None:
        call_op(torch.ops.flextron.elastic_linear_grad_weight_, _grad_weight_impl_, grad_weight, grad_bias, dy, x,
                out_widths, in_widths, k, grouping=grouping)
    return dx


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_widths, in_widths, n, k = inputs
    ctx.save_for_backward(x, weight, out_widths, in_widths)
    ctx.k = k
    ctx.has_bias = bias is not None
    ctx.dispatch = dispatch_state()


def _autograd_backward(ctx, dy):
    x, weight, out_widths, in_widths = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_weight = torch.zeros_like(weight) if need_w else None
    grad_bias = weight.new_zeros(weight.shape[0]) if (need_b and ctx.has_bias) else None
    with dispatch_state_restored(ctx.dispatch):
        dx = _backward(dy, x, weight, out_widths, in_widths, ctx.k, need_x, grad_weight, grad_bias)
    return dx, grad_weight, grad_bias, None, None, None, None


_elastic_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _PrefixGradAccumulation(torch.autograd.Function):
    """Eager autograd path for parameters: weight and bias gradients are accumulated in
    place into the used prefix of their ``.grad``; autograd sees none."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_widths, in_widths, n, k):
        ctx.save_for_backward(x, weight, out_widths, in_widths)
        ctx.params = (weight, bias)
        ctx.k = k
        ctx.dispatch = dispatch_state()
        args = (x, weight, bias, out_widths, in_widths, n, k)
        # Grouped once, here, for the forward and both backward kernels.
        ctx.grouping = _token_grouping(x, out_widths, in_widths, n, k) if runs_directly(*args) else None
        return call_op(torch.ops.flextron.elastic_linear, _forward_impl, *args, grouping=ctx.grouping)

    @staticmethod
    def backward(ctx, dy):
        x, weight, out_widths, in_widths = ctx.saved_tensors
        weight_param, bias_param = ctx.params
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_weight = grad_buffer(weight_param) if need_w else None
        grad_bias = grad_buffer(bias_param) if (need_b and bias_param is not None) else None
        with dispatch_state_restored(ctx.dispatch):
            dx = _backward(dy, x, weight, out_widths, in_widths, ctx.k, need_x, grad_weight, grad_bias, ctx.grouping)
        return dx, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Public function
# --------------------------------------------------------------------------- #
@outside_autocast("x", "weight", "bias")
def elastic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_features: Width = None,
    in_features: Width = None,
    max_out_features: Optional[int] = None,
) -> torch.Tensor:
    """Linear layer on a prefix of ``weight``, with one width for all tokens or one per token.

    Args:
        x: ``[..., K]`` (or ``[..., k]`` when ``in_features`` is the int ``k``), fp32,
            fp16 or bf16, any strides.
        weight: ``[N, K]``, same dtype and device as ``x``.
        bias: ``[N]`` or None.
        out_features: None (``N``), an int ``n`` in ``[0, N]``, or an integer tensor of
            shape ``x.shape[:-1]`` (one width per token).
        in_features: None (``K``), an int ``k`` in ``[0, K]``, or an integer tensor of
            shape ``x.shape[:-1]``; ``x[t, k_t:]`` is ignored.
        max_out_features: with per-token ``out_features``, the width of the output
            (default ``N``); every width must be at most this.

    Returns:
        ``[..., n]`` for an int/None ``out_features``; ``[..., max_out_features or N]``
        for per-token widths, exactly 0 beyond each token's width. Same dtype as ``x``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    check_same_dtype("weight", weight, x.dtype, "x")
    n_full, k_full = weight.shape
    if bias is not None:
        check_tensor("bias", bias, device=x.device, shape=(n_full,))
        check_same_dtype("bias", bias, x.dtype, "x")
    token_shape, kx = x.shape[:-1], x.shape[-1]

    in_widths, k = check_widths(
        "in_features", in_features, high=k_full, default=k_full, token_shape=token_shape, device=x.device
    )
    allowed_kx = (k_full, k) if (in_features is not None and in_widths is None) else (k_full,)
    if kx not in allowed_kx:
        expected = " or ".join(str(v) for v in dict.fromkeys(allowed_kx))
        raise ValueError(f"x: expected last dimension {expected} (weight is {n_full}x{k_full}), got shape {tuple(x.shape)}")

    per_token_out = isinstance(out_features, torch.Tensor)
    if max_out_features is not None:
        if not per_token_out:
            raise ValueError("max_out_features: only applies when out_features is a per-token tensor")
        check_int("max_out_features", max_out_features, 0, n_full)
    out_high = max_out_features if max_out_features is not None else n_full
    out_widths, n = check_widths(
        "out_features", out_features, high=out_high, default=n_full, token_shape=token_shape, device=x.device
    )

    x2d = x if x.dim() == 2 else x.reshape(math.prod(token_shape), kx)
    if weight.requires_grad and accumulates_in_place(weight, bias):
        y = _PrefixGradAccumulation.apply(x2d, weight, bias, out_widths, in_widths, n, k)
    else:
        y = call_op(torch.ops.flextron.elastic_linear, _forward_impl, x2d, weight, bias, out_widths, in_widths, n, k)
    return y if x.dim() == 2 else y.reshape(*token_shape, n)
