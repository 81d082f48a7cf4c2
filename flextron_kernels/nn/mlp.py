"""ElasticMLP: an MLP whose hidden width (and router scale) is given per call."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from flextron_kernels.ops.elastic_mlp import elastic_mlp


class ElasticMLP(nn.Module):
    """Holds ``up [F, D]``, ``gate [F, D]`` (when ``gated``) and ``down [D, F]`` weights and
    optional biases; each call runs the first ``width`` hidden units (per token or for
    all), see :func:`flextron_kernels.elastic_mlp`.

    Llama-style SwiGLU: ``ElasticMLP(d, f, gated=True, activation="silu", bias=False)``;
    GPT-2: ``ElasticMLP(d, f, gated=False, activation="gelu_tanh", bias=True)``.
    ``recompute=True``: the backward recomputes the first layer's pre-activations instead
    of keeping them from the forward (less memory held between the two).
    """

    def __init__(self, d_model: int, ffn: int, *, gated: bool = True, activation: str = "silu", bias: bool = False,
                 recompute: bool = False, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.ffn, self.activation = d_model, ffn, activation
        self.recompute = recompute  # see elastic_mlp
        self.w_up = nn.Parameter(torch.empty(ffn, d_model, **factory))
        self.w_gate = nn.Parameter(torch.empty(ffn, d_model, **factory)) if gated else None
        self.w_down = nn.Parameter(torch.empty(d_model, ffn, **factory))
        self.b_up = nn.Parameter(torch.zeros(ffn, **factory)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(d_model, **factory)) if bias else None
        for w in (self.w_up, self.w_gate, self.w_down):
            if w is not None:
                # nn.Linear's initialisation.
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, *, width: Union[int, torch.Tensor, None] = None,
                scale: Optional[torch.Tensor] = None, max_width: Optional[int] = None) -> torch.Tensor:
        return elastic_mlp(
            x, self.w_up, self.w_down, width=self.ffn if width is None else width, w_gate=self.w_gate,
            b_up=self.b_up, b_down=self.b_down, activation=self.activation, scale=scale, max_width=max_width,
            recompute=self.recompute,
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, ffn={self.ffn}, gated={self.w_gate is not None}, "
                f"activation={self.activation!r}, bias={self.b_up is not None}, recompute={self.recompute}")
