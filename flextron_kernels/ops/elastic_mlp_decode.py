"""elastic_mlp_decode: the MLP of a decode step, for up to 64 tokens at per-token widths
(forward only).

Meaning: :func:`flextron_kernels.reference.elastic_mlp`. It runs elastic_mlp's forward
op (``flextron::elastic_mlp_fwd``) with nothing saved for a backward; this module holds
the fused CUDA kernel's launcher, which that op dispatches to.

Backends:
- ``cuda``: the extension's fused kernel (``csrc/decode_mlp.cu``): gate, up, activation
  and down projection in two launches that read only the weight prefix of the batch's
  widest token, with no host sync and launch shapes from the sizes only (CUDA-graph
  capturable). It takes fp16/bf16, ``D`` and ``F`` multiples of 8, rows that start on
  16 bytes and contiguous last dimensions; other inputs go to the next backend.
- ``triton``, ``torch``: the forward of :mod:`flextron_kernels.ops.elastic_mlp`.

:func:`flextron_kernels.elastic_mlp` itself runs this kernel when it needs no backward
and has at most 64 tokens on a GPU; this op is for callers that want the decode path
explicitly (it refuses inputs that require a gradient).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch

from flextron_kernels import reference
from flextron_kernels.backends import device_index, extension, extension_has_cuda
from flextron_kernels.ops.checks import new_output
from flextron_kernels.ops.common import call_op, outside_autocast
from flextron_kernels.ops.elastic_mlp import check_mlp_arguments, forward_impl

MAX_TOKENS = 64
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


@functools.lru_cache(maxsize=None)
def _has_mma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # mma.m16n8k16 with bf16


def cuda_kernel_applies(x, w_up, w_down, w_gate, b_up, b_down, scale) -> bool:
    """Whether the fused CUDA kernel can run on these (already checked) 2-D inputs."""
    if not x.is_cuda or x.dtype not in _DTYPE_CODES or x.shape[0] > MAX_TOKENS or not extension_has_cuda():
        return False
    if not _has_mma(device_index(x.device)):
        return False
    d_model, ffn = x.shape[1], w_up.shape[0]
    if d_model % 8 or ffn % 8:
        return False
    for t in (x, w_up, w_down, w_gate):
        if t is None:
            continue
        if t.stride(1) != 1 or t.stride(0) % 8 or t.stride(0) < t.shape[1] or t.data_ptr() % 16:
            return False
    return True


def forward_cuda(x, w_up, w_down, w_gate, b_up, b_down, widths, width, activation, scale) -> torch.Tensor:
    """The fused kernel, for inputs where :func:`cuda_kernel_applies`. ``x [T, D]``;
    ``widths [T]`` or None (every token at ``width``). Returns ``out [T, D]``."""
    num_tokens, d_model = x.shape
    ffn = w_up.shape[0]
    out = new_output((num_tokens, d_model), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or d_model == 0:
        return out
    # The kernel writes every hidden entry it later reads.
    hidden = torch.empty((num_tokens, ffn), dtype=x.dtype, device=x.device)
    widths32 = widths.to(torch.int32).contiguous() if widths is not None else None
    b_up = b_up.contiguous() if b_up is not None else None
    b_down = b_down.contiguous() if b_down is not None else None
    scale = scale.to(x.dtype).contiguous() if scale is not None else None

    def address(t):
        return 0 if t is None else t.data_ptr()

    with torch.cuda.device(x.device):
        extension().elastic_mlp_decode_cuda(
            dtype=_DTYPE_CODES[x.dtype], activation=reference.ACTIVATIONS.index(activation),
            num_tokens=num_tokens, d_model=d_model, ffn=ffn,
            x_ptr=x.data_ptr(), x_stride=x.stride(0),
            w_up_ptr=w_up.data_ptr(), w_up_stride=w_up.stride(0),
            w_gate_ptr=address(w_gate), w_gate_stride=w_gate.stride(0) if w_gate is not None else 0,
            w_down_ptr=w_down.data_ptr(), w_down_stride=w_down.stride(0),
            b_up_ptr=address(b_up), b_down_ptr=address(b_down), scale_ptr=address(scale),
            widths_ptr=address(widths32), static_width=width,
            hidden_ptr=hidden.data_ptr(), out_ptr=out.data_ptr(), out_stride=out.stride(0),
            stream=torch.cuda.current_stream().cuda_stream,
        )
    return out


@outside_autocast("x", "w_up", "w_down", "w_gate", "b_up", "b_down")
def elastic_mlp_decode(
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
    """:func:`~flextron_kernels.elastic_mlp` for a decode step: at most 64 tokens, no
    backward. Same arguments and meaning.

    Args:
        x: ``[..., D]`` with at most 64 tokens (``prod(x.shape[:-1]) <= 64``), fp32/fp16/bf16.
        w_up, w_gate: ``[F, D]`` (``w_gate`` None: ungated); ``w_down``: ``[D, F]``.
        b_up: ``[F]`` or None; ``b_down``: ``[D]`` or None.
        width: an int in ``[0, F]`` or an integer tensor of shape ``x.shape[:-1]``.
        activation: as for :func:`~flextron_kernels.elastic_mlp`.
        scale: optional float tensor of shape ``x.shape[:-1]`` multiplying each token's
            down projection (before ``b_down``).

    Returns:
        ``[..., D]``, the dtype of ``x``.
    """
    widths, fw, scale = check_mlp_arguments(x, w_up, w_down, width, w_gate, b_up, b_down, activation, scale)
    token_shape, d_model = x.shape[:-1], x.shape[-1]
    num_tokens = math.prod(token_shape)
    if num_tokens > MAX_TOKENS:
        raise ValueError(
            f"x: expected at most {MAX_TOKENS} tokens for the decode MLP, got {num_tokens} "
            f"(shape {tuple(x.shape)}); use elastic_mlp"
        )
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_up, w_down, w_gate, b_up, b_down, scale)
    ):
        raise ValueError(
            "elastic_mlp_decode: has no backward, but an input requires grad; run it under "
            "torch.no_grad() or use elastic_mlp"
        )
    out = call_op(torch.ops.flextron.elastic_mlp_fwd, forward_impl,
                  x.reshape(num_tokens, d_model), w_up, w_down, w_gate, b_up, b_down, widths, fw, activation, scale,
                  False)[0]
    return out.reshape(x.shape)
