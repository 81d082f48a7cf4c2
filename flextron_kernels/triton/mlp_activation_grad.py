"""Backward through the MLP's activation, in place, with the router scale's gradient.

Per token ``t`` and hidden unit ``f < width_t``, with ``s = scale_t`` and
``grad_h = dout @ W_down`` (before the scale):

    gated:    h = act(g) * u,   du = s * grad_h * act(g),   dg = s * grad_h * u * act'(g)
    ungated:  h = act(u),       du = s * grad_h * act'(u)
    dscale_t = sum_f h * grad_h

Buffers are overwritten in place: ``grad_h`` becomes ``h`` (the down projection's
weight gradient needs it), ``u`` becomes ``du`` and ``g`` becomes ``dg``; so the
backward needs no hidden-sized buffer beyond the two pre-activations the forward
saved and ``grad_h``. Elements at ``f >= width_t`` are written as zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flextron_kernels.triton.activations import activation_derivative, apply_activation


@triton.jit
def mlp_activation_grad_kernel(
    grad_h_ptr, up_ptr, gate_ptr, widths_ptr, scale_ptr, dscale_ptr,
    num_rows, width_limit,
    stride_t, stride_f,
    HAS_WIDTHS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """``grad_h``, ``up``, ``gate``: ``[num_rows, >= width_limit]`` with the same strides;
    ``widths [num_rows]`` integer; ``scale``/``dscale [num_rows]`` (dscale fp32)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    if HAS_WIDTHS:
        widths = tl.load(widths_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    else:
        widths = tl.where(row_mask, width_limit, 0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    tile_width = tl.max(widths, axis=0)

    dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, tile_width, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        used = row_mask[:, None] & (f[None, :] < widths[:, None])
        inside = row_mask[:, None] & (f[None, :] < width_limit)
        offsets = rows[:, None] * stride_t + f[None, :] * stride_f
        grad_h = tl.where(used, tl.load(grad_h_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
        u = tl.where(used, tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
        grad_hs = grad_h * scale[:, None]
        if GATED:
            g = tl.where(used, tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
            act_g = apply_activation(g, ACTIVATION)
            h = act_g * u
            du = grad_hs * act_g
            dg = grad_hs * u * activation_derivative(g, ACTIVATION)
            tl.store(gate_ptr + offsets, tl.where(used, dg, 0.0).to(gate_ptr.dtype.element_ty), mask=inside)
        else:
            h = apply_activation(u, ACTIVATION)
            du = grad_hs * activation_derivative(u, ACTIVATION)
        h = tl.where(used, h, 0.0)
        h_stored = h.to(grad_h_ptr.dtype.element_ty)
        # dscale from the h that the weight gradient will use, rounded alike.
        dscale += tl.sum(h_stored.to(tl.float32) * grad_h, axis=1)
        tl.store(grad_h_ptr + offsets, h_stored, mask=inside)
        tl.store(up_ptr + offsets, tl.where(used, du, 0.0).to(up_ptr.dtype.element_ty), mask=inside)
    if HAS_SCALE:
        tl.store(dscale_ptr + rows, dscale, mask=row_mask)


def mlp_activation_grad_(grad_h, up, gate, widths, scale, dscale, *, width_limit, activation, config):
    """Launch :func:`mlp_activation_grad_kernel` over ``grad_h [T, >= width_limit]``."""
    num_rows = grad_h.shape[0]
    if num_rows == 0:
        return
    assert up.stride() == grad_h.stride() and (gate is None or gate.stride() == grad_h.stride())
    grid = (triton.cdiv(num_rows, config["BLOCK_M"]),)
    mlp_activation_grad_kernel[grid](
        grad_h, up, gate if gate is not None else up,
        widths if widths is not None else grad_h,
        scale if scale is not None else grad_h,
        dscale if dscale is not None else grad_h,
        num_rows, width_limit,
        grad_h.stride(0), grad_h.stride(1),
        HAS_WIDTHS=widths is not None,
        HAS_SCALE=scale is not None,
        GATED=gate is not None,
        ACTIVATION=activation,
        **config,
    )
