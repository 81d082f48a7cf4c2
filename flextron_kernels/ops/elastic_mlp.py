"""elastic_mlp: an MLP (SwiGLU, GeGLU, GELU, ReLU...) whose hidden width is chosen per token.

Meaning: :func:`flextron_kernels.reference.elastic_mlp`. Two custom ops, each with a
fake implementation, and an autograd function that calls them:

- ``flextron::elastic_mlp_fwd(...) -> (out, up_pre, gate_pre)``;
- ``flextron::elastic_mlp_bwd_(...) -> (dx, dscale)``, which adds the weight and bias
  gradients into the used prefix of the given buffers and overwrites the saved
  pre-activations with their gradients;
- ``flextron::elastic_mlp_pre(...) -> (up_pre, gate_pre)``, the first layer's
  pre-activations alone (for a backward that recomputes them).

Triton path (per-token widths on CUDA): tokens are grouped by width once per pass; the
first kernel computes gate and up projections of a tile together, applies the
activation in its epilogue and writes the hidden activation, at each token's width
(zeros beyond); the down projection's reduction stops at each tile's widest token, and
the router scale is applied in its epilogue.

Torch path: on a CPU, runs of like-width tokens (at most ``MAX_TORCH_RUNS``), each a
dense MLP at its own width, gathered and scattered by index; elsewhere (no host sync)
every token at the bound, masked.

The backward keeps the pre-activations by default rather than recomputing them:
recomputing costs the two first-layer GEMMs again (2/9 of forward+backward FLOPs, above
the 1.20x budget on its own), while keeping them costs two hidden-sized buffers, which
the backward then reuses in place for their own gradients, so its peak is three
hidden-sized buffers, as for autograd through a dense MLP. ``recompute=True`` trades
the other way: nothing hidden-sized lives from the forward to the backward (training
holds every layer's), for those two GEMMs (``benchmarks/bench_elastic_mlp.py`` times both).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from flextron_kernels import reference
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
from flextron_kernels.ops.tiles import has_tuned_tiles, matmul_config, weight_grad_config

ACTIVATIONS = reference.ACTIVATIONS
GATED_ACTIVATIONS = reference.GATED_ACTIVATIONS


def _select(t: torch.Tensor, per_token: bool, decode_kernel: bool = False) -> str:
    """``decode_kernel``: the fused CUDA decode kernel can run this forward (see
    :mod:`flextron_kernels.ops.elastic_mlp_decode`)."""
    if decode_kernel:
        # A memory-bound weight stream. With decode tiles tuned on this GPU, the Triton
        # kernels stream it faster than the fused CUDA kernel (H200, Llama-2-7B MLP: 0.41
        # to 0.72 of copy bandwidth against 0.32 to 0.65; elastic_mlp_decode_gpu.json).
        tuned = has_tuned_tiles("matmul_decode", t.device)
        preferred = ("triton", "cuda", "torch") if tuned else ("cuda", "triton", "torch")
        return select_backend("elastic_mlp", t.device, ("cuda", "triton", "torch"), preferred)
    # cuBLAS on strided views runs a static width at dense speed; the routed kernels pay
    # off once tokens differ in width.
    preferred = ("triton", "torch") if (t.is_cuda and per_token) else ("torch", "triton")
    return select_backend("elastic_mlp", t.device, ("triton", "torch"), preferred)


def _forward_backend(x, w_up, w_down, w_gate, b_up, b_down, widths, scale, backward_follows) -> str:
    """The forward's backend: the fused CUDA decode kernel is a candidate when no backward
    follows (inference) and it can run these arguments."""
    from flextron_kernels.ops.elastic_mlp_decode import cuda_kernel_applies

    decode_kernel = not backward_follows and cuda_kernel_applies(x, w_up, w_down, w_gate, b_up, b_down, scale)
    return _select(x, widths is not None, decode_kernel)


def token_grouping(x: torch.Tensor, widths: Optional[torch.Tensor], width_limit: int):
    """The token grouping (``group_tokens``) that the Triton kernels of one forward and its
    backward can share (each would otherwise compute it again), or None where they would
    not group: a static width, or the torch backend."""
    if widths is None or _select(x, True) != "triton":
        return None
    return group_tokens(widths, width_limit, matmul_config(x, x.shape[0])["BLOCK_M"])


def _activation_grad_config(t: torch.Tensor) -> dict:
    if t.device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_F=16)
    return dict(BLOCK_M=8, BLOCK_F=256, num_warps=4)


# --------------------------------------------------------------------------- #
# Torch backend
# --------------------------------------------------------------------------- #
def _first_layer_torch(x, w_up, w_gate, b_up, fw):
    """The up and gate pre-activations ``[T, fw]`` (gate None when ungated), unmasked."""
    up = F.linear(x, w_up[:fw], None if b_up is None else b_up[:fw])
    return up, F.linear(x, w_gate[:fw]) if w_gate is not None else None


def _forward_torch(x, w_up, w_down, w_gate, b_up, b_down, widths, fw, activation, scale, save):
    runs = torch_runs(widths, fw)
    out = x.new_empty(x.shape) if runs[0][0] is not None else None
    ups, gates = [], []
    for rows, width, mask in runs:
        xs = torch_rows(x, rows)
        up, gate = _first_layer_torch(xs, w_up, w_gate, b_up, width)
        hidden = reference.activation(activation, gate) * up if gate is not None else reference.activation(activation, up)
        run_out = F.linear(mask_columns(hidden, mask), w_down[:, :width])
        if scale is not None:
            run_out = run_out * torch_rows(scale, rows).unsqueeze(1).to(run_out.dtype)
        if b_down is not None:
            run_out = run_out + b_down
        if rows is None:
            out = run_out
        else:
            out.index_copy_(0, rows, run_out)
        if save:
            ups.append((rows, width, mask_columns(up, mask)))
            if gate is not None:
                gates.append((rows, width, mask_columns(gate, mask)))
    up_pre = assemble_runs((x.shape[0], fw), x, ups) if save else None
    gate_pre = assemble_runs((x.shape[0], fw), x, gates) if (save and w_gate is not None) else None
    return out, up_pre, gate_pre


def _pre_torch(x, w_up, w_gate, b_up, widths, fw):
    """The masked pre-activations ``up_pre``/``gate_pre [T, fw]`` alone (gate None when ungated)."""
    ups, gates = [], []
    for rows, width, mask in torch_runs(widths, fw):
        up, gate = _first_layer_torch(torch_rows(x, rows), w_up, w_gate, b_up, width)
        ups.append((rows, width, mask_columns(up, mask)))
        if gate is not None:
            gates.append((rows, width, mask_columns(gate, mask)))
    shape = (x.shape[0], fw)
    return assemble_runs(shape, x, ups), assemble_runs(shape, x, gates) if w_gate is not None else None


def activation_derivative(activation: str, z: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz, elementwise (the torch backend's backward runs below autograd)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "relu2":
        return 2 * torch.relu(z)
    raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _backward_torch(grads, dout, x, w_up, w_down, w_gate, widths, fw, activation, scale, up_pre, gate_pre, need_dx):
    runs = torch_runs(widths, fw)
    if len(runs) == 1 and runs[0][0] is None:
        rows, width, mask = runs[0]
        return _backward_run(grads, dout, x, w_up, w_down, w_gate, mask, width, activation, scale, up_pre[:, :width],
                             None if gate_pre is None else gate_pre[:, :width], need_dx)
    dx = x.new_empty(x.shape) if need_dx else None
    dscale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if scale is not None else None
    for rows, width, mask in runs:
        run_dx, run_dscale = _backward_run(
            grads, torch_rows(dout, rows), torch_rows(x, rows), w_up, w_down, w_gate, mask, width, activation,
            torch_rows(scale, rows), up_pre[rows, :width], None if gate_pre is None else gate_pre[rows, :width], need_dx)
        if need_dx:
            dx.index_copy_(0, rows, run_dx)
        if scale is not None:
            dscale.index_copy_(0, rows, run_dscale)
    return dx, dscale


def _backward_run(grads, dout, x, w_up, w_down, w_gate, widths, fw, activation, scale, up_pre, gate_pre, need_dx):
    """The backward of tokens computed together at width ``fw`` (``widths``: their own
    widths to mask with, or None); ``up_pre``/``gate_pre [T, fw]``. Adds into ``grads``."""
    grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down = grads
    f32 = torch.float32
    grad_h = mask_columns(dout @ w_down[:, :fw], widths).to(f32)
    s = scale.to(f32).unsqueeze(1) if scale is not None else 1.0
    u = up_pre.to(f32)
    if gate_pre is not None:
        g = gate_pre.to(f32)
        act_g = reference.activation(activation, g)
        hidden = act_g * u
        d_up = grad_h * s * act_g
        d_gate = mask_columns(grad_h * s * u * activation_derivative(activation, g), widths).to(x.dtype)
    else:
        hidden = reference.activation(activation, u)
        d_up = grad_h * s * activation_derivative(activation, u)
    hidden = mask_columns(hidden, widths).to(x.dtype)
    d_up = mask_columns(d_up, widths).to(x.dtype)
    dscale = (hidden.to(f32) * grad_h).sum(1) if scale is not None else None

    if grad_w_down is not None:
        scaled_dout = dout * scale.unsqueeze(1).to(dout.dtype) if scale is not None else dout
        grad_w_down[:, :fw].addmm_(scaled_dout.T, hidden)
    if grad_b_down is not None:
        grad_b_down += dout.sum(0)
    if grad_w_up is not None:
        grad_w_up[:fw].addmm_(d_up.T, x)
    if grad_b_up is not None:
        grad_b_up[:fw] += d_up.sum(0)
    if grad_w_gate is not None:
        grad_w_gate[:fw].addmm_(d_gate.T, x)
    dx = None
    if need_dx:
        dx = d_up @ w_up[:fw]
        if gate_pre is not None:
            dx = dx + d_gate @ w_gate[:fw]
    return dx, dscale


# --------------------------------------------------------------------------- #
# Triton backend
# --------------------------------------------------------------------------- #
def _first_layer_triton(x, w_up, w_gate, b_up, widths, fw, activation, save, grouping=None):
    """The gate/up kernel: ``hidden [T, fw]`` and, with ``save``, the pre-activations
    (zeros past each token's width); also the routing and tiles, for the down projection."""
    from flextron_kernels.triton.routed_matmul import routed_matmul

    num_rows, d_model = x.shape
    config = matmul_config(x, num_rows)
    routing = matmul_routing(widths, fw, num_rows, config["BLOCK_M"], grouped=grouping[0] if grouping else None)
    first_config = matmul_config(x, num_rows, gated=True) if w_gate is not None else config
    hidden = new_output((num_rows, fw), dtype=x.dtype, device=x.device)
    up_pre = new_output((num_rows, fw), dtype=x.dtype, device=x.device) if save else None
    gate_pre = new_output((num_rows, fw), dtype=x.dtype, device=x.device) if (save and w_gate is not None) else None
    routed_matmul(
        x, x.stride(), w_up, w_up.stride(), b_up, hidden,
        out_widths=widths, red_widths=None, out_limit=fw, red_limit=d_model, routing=routing, config=first_config,
        gate=w_gate, gate_strides=None if w_gate is None else w_gate.stride(), activation=activation,
        pre_out=up_pre, gate_pre_out=gate_pre,
    )
    return hidden, up_pre, gate_pre, routing, config


def _forward_triton(x, w_up, w_down, w_gate, b_up, b_down, widths, fw, activation, scale, save, grouping=None):
    from flextron_kernels.triton.routed_matmul import routed_matmul

    num_rows, d_model = x.shape
    hidden, up_pre, gate_pre, routing, config = _first_layer_triton(x, w_up, w_gate, b_up, widths, fw, activation,
                                                                    save, grouping)
    out = new_output((num_rows, d_model), dtype=x.dtype, device=x.device)
    routed_matmul(
        hidden, hidden.stride(), w_down, w_down.stride(), b_down, out,
        out_widths=None, red_widths=widths, out_limit=d_model, red_limit=fw, routing=routing, config=config,
        row_scale=scale,
    )
    return out, up_pre, gate_pre


def _backward_triton(grads, dout, x, w_up, w_down, w_gate, widths, fw, activation, scale, up_pre, gate_pre, need_dx,
                     grouping=None):
    from flextron_kernels.triton.mlp_activation_grad import mlp_activation_grad_
    from flextron_kernels.triton.prefix_weight_grad import prefix_weight_grad_
    from flextron_kernels.triton.routed_matmul import routed_matmul

    grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down = grads
    num_rows, d_model = dout.shape
    config = matmul_config(dout, num_rows)
    grouped, boundaries = grouping or group_tokens(widths, fw, config["BLOCK_M"])
    routing = matmul_routing(widths, fw, num_rows, config["BLOCK_M"], grouped=grouped)
    grad_h = new_output((num_rows, fw), dtype=dout.dtype, device=dout.device)
    routed_matmul(
        dout, dout.stride(), w_down, (w_down.stride(1), w_down.stride(0)), None, grad_h,
        out_widths=widths, red_widths=None, out_limit=fw, red_limit=d_model, routing=routing, config=config,
    )
    dscale = torch.empty(num_rows, dtype=torch.float32, device=dout.device) if scale is not None else None
    mlp_activation_grad_(
        grad_h, up_pre, gate_pre, widths, scale, dscale,
        width_limit=fw, activation=activation, config=_activation_grad_config(dout),
    )
    hidden, d_up, d_gate = grad_h, up_pre, gate_pre  # overwritten in place

    # The weight-gradient kernel reads only the token order and group offsets of the
    # routing metadata, which do not depend on the block size. The hidden activation and
    # both pre-activation gradients are exact zeros past each token's width, so only the
    # grouping (to skip tiles) is passed, not the widths.
    wconfig = weight_grad_config(dout)
    common = dict(routing=grouped, boundaries=boundaries, config=wconfig, out_widths=None, in_widths=None)
    if grad_w_down is not None:
        scaled_dout = dout * scale.unsqueeze(1).to(dout.dtype) if scale is not None else dout
        prefix_weight_grad_(grad_w_down, None, scaled_dout, hidden, in_limit=fw, sort_by_out=False, **common)
    if grad_b_down is not None:
        grad_b_down += dout.sum(0)
    if grad_w_up is not None:
        prefix_weight_grad_(grad_w_up, grad_b_up, d_up, x, in_limit=d_model, sort_by_out=True, **common)
    elif grad_b_up is not None:
        grad_b_up[:fw] += d_up.sum(0)
    if grad_w_gate is not None:
        prefix_weight_grad_(grad_w_gate, None, d_gate, x, in_limit=d_model, sort_by_out=True, **common)
    dx = None
    if need_dx:
        dx = new_output((num_rows, d_model), dtype=dout.dtype, device=dout.device)
        for i, (grad, weight) in enumerate(((d_up, w_up), (d_gate, w_gate))):
            if weight is None:
                continue
            routed_matmul(
                grad, grad.stride(), weight, (weight.stride(1), weight.stride(0)), None, dx,
                out_widths=None, red_widths=widths, out_limit=d_model, red_limit=fw, routing=routing,
                config=config, accumulate=i > 0,
            )
    # The kernels wrote these in place (the pre-activations now hold their gradients).
    mark_written(grad_w_up, grad_w_down, grad_w_gate, grad_b_up, up_pre, gate_pre)
    return dx, dscale


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #
@torch.library.custom_op("flextron::elastic_mlp_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    b_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    widths: Optional[torch.Tensor],
    width: int,
    activation: str,
    scale: Optional[torch.Tensor],
    save_for_backward: bool,
    backward_follows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, D]`` -> ``out [T, D]``; with ``save_for_backward``, also the
    pre-activations ``up_pre``/``gate_pre [T, width]`` (zeros past each token's width;
    ``[0]`` when not saved). ``widths [T]`` per token, or None for ``width`` everywhere.
    ``backward_follows``: a backward will recompute the pre-activations (so this is no
    inference call, whose small batches may take the fused decode kernel)."""
    return forward_impl(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale, save_for_backward,
                        backward_follows)


def forward_impl(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale, save_for_backward,
                 backward_follows=False, *, grouping=None):
    """The implementation of :func:`_fwd_op` (the decode op shares it). ``grouping``:
    :func:`token_grouping` of these widths, if at hand."""
    from flextron_kernels.ops.elastic_mlp_decode import forward_cuda

    backend = _forward_backend(x, w_up, w_down, w_gate, b_up, b_down, widths, scale,
                               save_for_backward or backward_follows)
    if backend == "cuda":
        out = forward_cuda(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale)
        return out, x.new_empty(0), x.new_empty(0)
    if backend == "triton":
        out, up_pre, gate_pre = _forward_triton(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation,
                                                scale, save_for_backward, grouping)
    else:
        out, up_pre, gate_pre = _forward_torch(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation,
                                               scale, save_for_backward)
    return out, up_pre if up_pre is not None else x.new_empty(0), gate_pre if gate_pre is not None else x.new_empty(0)


@_fwd_op.register_fake
def _(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale, save_for_backward,
      backward_follows=False):
    saved = (x.shape[0], width) if save_for_backward else (0,)
    return x.new_empty(x.shape), x.new_empty(saved), x.new_empty(saved if w_gate is not None else (0,))


@torch.library.custom_op(
    "flextron::elastic_mlp_bwd_",
    mutates_args=("grad_w_up", "grad_w_down", "grad_w_gate", "grad_b_up", "grad_b_down", "up_pre", "gate_pre"),
)
def _bwd_op(
    grad_w_up: Optional[torch.Tensor],
    grad_w_down: Optional[torch.Tensor],
    grad_w_gate: Optional[torch.Tensor],
    grad_b_up: Optional[torch.Tensor],
    grad_b_down: Optional[torch.Tensor],
    dout: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    widths: Optional[torch.Tensor],
    width: int,
    activation: str,
    scale: Optional[torch.Tensor],
    up_pre: torch.Tensor,
    gate_pre: Optional[torch.Tensor],
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`_fwd_op`. Adds into the used prefix of each given gradient
    buffer; overwrites ``up_pre``/``gate_pre`` (the saved pre-activations). Returns
    ``dx [T, D]`` (``[0]`` unless ``need_dx``) and ``dscale [T]`` fp32 (``[0]`` without
    a scale)."""
    return _backward_impl(grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down, dout, x, w_up, w_down, w_gate,
                          widths, width, activation, scale, up_pre, gate_pre, need_dx)


def _backward_impl(grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down, dout, x, w_up, w_down, w_gate, widths,
                   width, activation, scale, up_pre, gate_pre, need_dx, *, grouping=None):
    """The implementation of :func:`_bwd_op`; ``grouping``: the forward's, if any."""
    grads = (grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down)
    args = (grads, dout, x, w_up, w_down, w_gate, widths, width, activation, scale, up_pre, gate_pre, need_dx)
    if _select(dout, widths is not None) == "triton":
        dx, dscale = _backward_triton(*args, grouping)
    else:
        dx, dscale = _backward_torch(*args)
    return (dx if dx is not None else dout.new_empty(0)), (dscale if dscale is not None else dout.new_empty(0, dtype=torch.float32))


@_bwd_op.register_fake
def _(grad_w_up, grad_w_down, grad_w_gate, grad_b_up, grad_b_down, dout, x, w_up, w_down, w_gate, widths, width,
      activation, scale, up_pre, gate_pre, need_dx):
    dx = dout.new_empty(x.shape if need_dx else (0,))
    return dx, dout.new_empty((x.shape[0],) if scale is not None else (0,), dtype=torch.float32)


@torch.library.custom_op("flextron::elastic_mlp_pre", mutates_args=())
def _pre_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    b_up: Optional[torch.Tensor],
    widths: Optional[torch.Tensor],
    width: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-activations of :func:`_fwd_op`'s first layer alone: ``up_pre``/``gate_pre
    [T, width]``, zeros past each token's width (``gate_pre`` ``[0]`` when ungated)."""
    return _pre_impl(x, w_up, w_gate, b_up, widths, width, activation)


def _pre_impl(x, w_up, w_gate, b_up, widths, width, activation, *, grouping=None):
    """The implementation of :func:`_pre_op`; ``grouping``: the forward's, if any."""
    if _select(x, widths is not None) == "triton":
        _, up_pre, gate_pre, _, _ = _first_layer_triton(x, w_up, w_gate, b_up, widths, width, activation, True,
                                                        grouping)
    else:
        up_pre, gate_pre = _pre_torch(x, w_up, w_gate, b_up, widths, width)
    return up_pre, gate_pre if gate_pre is not None else x.new_empty(0)


@_pre_op.register_fake
def _(x, w_up, w_gate, b_up, widths, width, activation):
    return x.new_empty(x.shape[0], width), x.new_empty((x.shape[0], width) if w_gate is not None else (0,))


class _ElasticMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, w_gate, b_up, b_down, scale, widths, width, activation, in_place, recompute):
        backward_follows = any(ctx.needs_input_grad[:7])
        save = backward_follows and not recompute
        args = (x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale, save, backward_follows)
        # Grouped once, here, for the forward's and the backward's kernels.
        ctx.grouping = token_grouping(x, widths, width) if runs_directly(*args) else None
        out, up_pre, gate_pre = call_op(torch.ops.flextron.elastic_mlp_fwd, forward_impl, *args, grouping=ctx.grouping)
        if recompute:  # the backward recomputes the pre-activations from these
            ctx.save_for_backward(x, w_up, w_down, w_gate, widths, scale, b_up)
        else:
            ctx.save_for_backward(x, w_up, w_down, w_gate, widths, scale, up_pre,
                                  gate_pre if w_gate is not None else None)
        ctx.params = (w_up, w_down, w_gate, b_up, b_down)
        ctx.width, ctx.activation, ctx.in_place, ctx.recompute = width, activation, in_place, recompute
        ctx.consumed = False
        ctx.dispatch = dispatch_state()
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.consumed:
            raise RuntimeError("elastic_mlp: its backward cannot run twice (retain_graph=True is not supported)")
        ctx.consumed = True
        if ctx.recompute:
            x, w_up, w_down, w_gate, widths, scale, b_up = ctx.saved_tensors
            with dispatch_state_restored(ctx.dispatch):
                up_pre, gate_pre = call_op(torch.ops.flextron.elastic_mlp_pre, _pre_impl, x, w_up, w_gate, b_up, widths,
                                           ctx.width, ctx.activation, grouping=ctx.grouping)
            gate_pre = gate_pre if w_gate is not None else None
        else:
            x, w_up, w_down, w_gate, widths, scale, up_pre, gate_pre = ctx.saved_tensors
        needs = ctx.needs_input_grad
        buffers = []
        for param, need in zip(ctx.params, needs[1:6]):
            if param is None or not need:
                buffers.append(None)
            else:
                buffers.append(grad_buffer(param) if ctx.in_place else torch.zeros_like(param))
        with dispatch_state_restored(ctx.dispatch):
            dx, dscale = call_op(
                torch.ops.flextron.elastic_mlp_bwd_, _backward_impl,
                *buffers, dout, x, w_up, w_down, w_gate, widths, ctx.width, ctx.activation, scale, up_pre, gate_pre,
                needs[0], grouping=ctx.grouping,
            )
        ctx.grouping = None  # the backward runs once: free it now
        param_grads = [None] * 5 if ctx.in_place else buffers
        return (
            dx if needs[0] else None,
            *param_grads,
            dscale.to(scale.dtype) if (scale is not None and needs[6]) else None,
            None, None, None, None, None,
        )


# --------------------------------------------------------------------------- #
# Public function
# --------------------------------------------------------------------------- #
def check_mlp_arguments(x, w_up, w_down, width, w_gate, b_up, b_down, activation, scale, max_width=None):
    """The argument checks of :func:`elastic_mlp` (and of the decode op). Returns
    ``(widths [T] or None, static width, scale [T] or None)``; with per-token widths the
    static width is their bound, ``max_width`` or ``F``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    d_model = x.shape[-1]
    check_tensor("w_up", w_up, ndim=2, device=x.device)
    check_same_dtype("w_up", w_up, x.dtype, "x")
    ffn = w_up.shape[0]
    if w_up.shape[1] != d_model:
        raise ValueError(f"w_up: expected shape [F, {d_model}] (D from x), got {tuple(w_up.shape)}")
    check_tensor("w_down", w_down, device=x.device, shape=(d_model, ffn))
    check_same_dtype("w_down", w_down, x.dtype, "x")
    if w_gate is not None:
        check_tensor("w_gate", w_gate, device=x.device, shape=(ffn, d_model))
        check_same_dtype("w_gate", w_gate, x.dtype, "x")
    if b_up is not None:
        check_tensor("b_up", b_up, device=x.device, shape=(ffn,))
        check_same_dtype("b_up", b_up, x.dtype, "x")
    if b_down is not None:
        check_tensor("b_down", b_down, device=x.device, shape=(d_model,))
        check_same_dtype("b_down", b_down, x.dtype, "x")
    valid = GATED_ACTIVATIONS if w_gate is not None else ACTIVATIONS
    if activation not in valid:
        kind = "a gated MLP (w_gate given)" if w_gate is not None else "an ungated MLP"
        raise ValueError(f"activation: expected one of {', '.join(valid)} for {kind}, got {activation!r}")
    token_shape = x.shape[:-1]
    if width is None:
        raise TypeError("width: expected an int or an integer tensor of shape x.shape[:-1], got None")
    high = ffn
    if max_width is not None and isinstance(width, torch.Tensor):
        high = check_int("max_width", max_width, 0, ffn)
    widths, fw = check_widths("width", width, high=high, default=ffn, token_shape=token_shape, device=x.device)
    if scale is not None:
        check_tensor("scale", scale, dtypes=FLOAT_DTYPES, device=x.device, shape=token_shape)
        scale = scale.reshape(-1)
    return widths, fw, scale


@outside_autocast("x", "w_up", "w_down", "w_gate", "b_up", "b_down")
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
    max_width: Optional[int] = None,
    recompute: bool = False,
) -> torch.Tensor:
    """MLP at a hidden width chosen per token (or once for all tokens).

    Args:
        x: ``[..., D]``, fp32/fp16/bf16, any strides.
        w_up: ``[F, D]``; ``w_gate``: ``[F, D]`` or None (ungated); ``w_down``: ``[D, F]``.
        b_up: ``[F]`` or None; ``b_down``: ``[D]`` or None.
        width: an int in ``[0, F]`` or an integer tensor of shape ``x.shape[:-1]``.
        activation: gated (``w_gate`` given): ``silu`` (SwiGLU) or ``gelu`` (GeGLU);
            ungated: ``silu``, ``gelu``, ``gelu_tanh``, ``relu`` or ``relu2``.
        scale: optional float tensor of shape ``x.shape[:-1]`` multiplying each token's
            down projection (before ``b_down``); it receives a gradient (the router's
            straight-through estimator).
        max_width: with per-token widths, an int bound on them in ``[0, F]`` (default
            ``F``): the hidden activations, and the pre-activations kept for the backward,
            are ``[T, max_width]``, so a batch known to stay below ``F`` (a router whose
            choices stop short of it, say) does not pay for the full width. Ignored for
            an int ``width``.
        recompute: when a backward will run, keep nothing hidden-sized from the forward
            and recompute the first layer's pre-activations in the backward (its two
            GEMMs run again); default: keep them (see the module docstring).

    Returns:
        ``[..., D]``, the dtype of ``x``.
    """
    widths, fw, scale = check_mlp_arguments(x, w_up, w_down, width, w_gate, b_up, b_down, activation, scale, max_width)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute: expected a bool, got {type(recompute).__name__}")
    token_shape, d_model = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(math.prod(token_shape), d_model)
    inputs = (x2d, w_up, w_down, w_gate, b_up, b_down, scale)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        # Inference: nothing to save for a backward (inside the autograd function,
        # needs_input_grad would still report parameters that require grad under no_grad),
        # so at most 64 tokens on a GPU take the fused decode kernel.
        out = call_op(torch.ops.flextron.elastic_mlp_fwd, forward_impl, x2d, w_up, w_down, w_gate, b_up, b_down,
                      widths, fw, activation, scale, False)[0]
        return out.reshape(x.shape)
    in_place = accumulates_in_place(w_up, w_down, w_gate, b_up, b_down)
    out = _ElasticMLPFunction.apply(x2d, w_up, w_down, w_gate, b_up, b_down, scale, widths, fw, activation, in_place,
                                    recompute)
    return out.reshape(x.shape)
