"""Routers that pick sub-networks: a static router (budget -> per-layer choices) and
token routers (hidden state and budget -> per-token MLP width).

Budgets are encoded as a one-hot over the trained budgets, linearly interpolated for a
budget between two of them (clamped outside). In training, choices are hard
Gumbel-softmax samples at temperature ``tau``; the chosen entry's value is 1 with the
soft probability's gradient (straight-through), and it is handed to the layer as a
``scale`` so that the router receives a gradient through the model's loss. At
inference, choices are the argmax and the scale is 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def encode_budget(budget: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """``budget [...]`` -> ``[..., n]``: interpolated one-hot over the ascending ``trained [n]`` budgets."""
    b = budget.to(trained.dtype).clamp(trained[0], trained[-1])
    upper = torch.searchsorted(trained, b.contiguous(), right=False).clamp(1, max(trained.numel() - 1, 1))
    if trained.numel() == 1:
        return torch.ones(*b.shape, 1, dtype=trained.dtype, device=b.device)
    lo, hi = trained[upper - 1], trained[upper]
    weight_hi = ((b - lo) / (hi - lo)).clamp(0, 1)
    out = torch.zeros(*b.shape, trained.numel(), dtype=trained.dtype, device=b.device)
    out.scatter_(-1, (upper - 1).unsqueeze(-1), (1 - weight_hi).unsqueeze(-1))
    out.scatter_add_(-1, upper.unsqueeze(-1), weight_hi.unsqueeze(-1))
    return out


def select(logits: torch.Tensor, *, training: bool, tau: float = 1.0, generator: Optional[torch.Generator] = None):
    """Choices from ``logits [..., C]``: ``(index [...] int64, scale [...])``.

    Training: a hard Gumbel-softmax sample, ``scale`` = 1 carrying the soft
    probability's gradient (straight-through). Inference: argmax, ``scale`` = 1 (no
    gradient)."""
    if not training:
        index = logits.argmax(-1)
        return index, torch.ones(index.shape, dtype=logits.dtype, device=logits.device)
    noise_device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape, generator=generator, device=noise_device).to(logits.device)
    exponential = -torch.log(uniform.clamp_min(1e-20))
    gumbel = -torch.log(exponential.clamp_min(1e-20))
    soft = F.softmax((logits.float() + gumbel) / tau, dim=-1)
    index = soft.argmax(-1)
    chosen = soft.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return index, chosen - chosen.detach() + 1.0


class StaticRouter(nn.Module):
    """Budget -> per-layer choice logits for the MLP width and the head count.

    ``Linear(n_budgets, hidden) -> LeakyReLU(0.1) -> Linear(hidden, n_layers * n_choices)``
    per axis. ``forward(budget [B])`` returns ``(mlp_logits [B, L, Cm], head_logits [B, L, Ch])``.
    """

    def __init__(self, budgets: Sequence[float], n_layers: int, mlp_choices: int, head_choices: int, hidden: int = 256):
        super().__init__()
        self.register_buffer("budgets", torch.tensor(sorted(budgets), dtype=torch.float32))
        self.n_layers, self.mlp_choices, self.head_choices = n_layers, mlp_choices, head_choices

        def head(n_out):
            return nn.Sequential(nn.Linear(len(budgets), hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, n_layers * n_out))

        self.mlp, self.heads = head(mlp_choices), head(head_choices)

    def forward(self, budget: torch.Tensor):
        code = encode_budget(budget.to(self.budgets.device), self.budgets)
        batch = code.shape[:-1]
        return (
            self.mlp(code).reshape(*batch, self.n_layers, self.mlp_choices),
            self.heads(code).reshape(*batch, self.n_layers, self.head_choices),
        )


class TokenRouter(nn.Module):
    """(hidden state, budget) -> a token's MLP-width choice logits, for one layer.

    ``Linear(d_model + n_budgets, hidden) -> LeakyReLU(0.1) -> Linear(hidden, n_choices)``,
    plus ``budget_code @ latency_offset``: a per-budget logit offset (zero until joint
    training calibrates it so that each budget's routes meet their latency on average);
    ``forward(x [T, d_model], budget_code [T, n_budgets]) -> [T, n_choices]``.
    """

    def __init__(self, d_model: int, n_budgets: int, n_choices: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model + n_budgets, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, n_choices))
        self.register_buffer("latency_offset", torch.zeros(n_budgets, n_choices))

    def forward(self, x: torch.Tensor, budget_code: torch.Tensor) -> torch.Tensor:
        code = budget_code.to(x.dtype)
        return self.net(torch.cat([x, code], dim=-1)) + code @ self.latency_offset.to(x.dtype)
