"""ElasticLinear: an ``nn.Linear`` whose output and input widths are chosen per call."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from flextron_kernels.ops.elastic_linear import Width, elastic_linear


class ElasticLinear(nn.Module):
    """Holds the full ``weight [out_features, in_features]`` (and ``bias [out_features]``);
    each call uses a prefix of it (see :func:`flextron_kernels.elastic_linear`).

    Weight gradients accumulate into the used prefix of ``weight.grad`` only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so that a converted model starts where nn.Linear would.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "ElasticLinear":
        """An ElasticLinear sharing ``linear``'s parameters."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(
        self,
        x: torch.Tensor,
        *,
        out_features: Width = None,
        in_features: Width = None,
        max_out_features: Optional[int] = None,
    ) -> torch.Tensor:
        return elastic_linear(
            x, self.weight, self.bias,
            out_features=out_features, in_features=in_features, max_out_features=max_out_features,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
