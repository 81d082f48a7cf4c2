"""Stage 3: joint fine-tuning of the model and its routers (the surrogate discarded).

Each batch mixes budgets (one per sequence). Routers sample hard choices with
Gumbel-softmax; the LM loss reaches them through the straight-through scales the ops
apply; both also get the latency loss of the choices they make (straight-through: the
argmax choice's latency, the softmax's gradient), token routers per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from flextron_kernels.training.common import (
    Metrics,
    Progress,
    check_budgets,
    lm_loss,
    checkpoint_due,
    resume_from,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flextron_kernels.training.routers import (
    choice_costs,
    full_budget_pull,
    latency_loss,
    resolve_table,
    straight_through,
)


@dataclass
class JointConfig:
    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    router_lr: float = 1e-2
    budgets: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    latency_weight: float = 20.0
    tolerance: float = 0.02
    tau: float = 0.5
    phase: str = "prefill"
    tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        self.budgets = check_budgets(self.budgets)


def joint_train(model, data, config: Optional[JointConfig] = None, *, latency_table=None, metrics_path=None,
                progress: bool = True, checkpoint=None, checkpoint_every: int = 0, resume: bool = False) -> list:
    """Fine-tune ``model`` and its attached routers together; returns the metrics records.

    ``checkpoint`` / ``checkpoint_every`` / ``resume``: as for the other stages (model with
    routers, optimizer, step, RNG)."""
    config = config or JointConfig()
    if model.static_router is None and model.token_routers is None:
        raise ValueError("joint_train: attach routers first (model.attach_routers or train_routers)")
    table = resolve_table(latency_table, model, config.phase)
    costs = choice_costs(model, table, config.phase, config.tokens)
    full_cost = costs[0][:, -1].sum() + costs[1][:, -1].sum()
    router_params = [p for n, p in model.named_parameters() if "router" in n]
    model_params = [p for n, p in model.named_parameters() if "router" not in n]
    optimizer = torch.optim.AdamW([dict(params=model_params, lr=config.lr), dict(params=router_params, lr=config.router_lr)])
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    budgets = torch.tensor(config.budgets)
    metrics = Metrics(metrics_path)
    bar = Progress(config.steps, "joint", progress)
    device = model.embed.weight.device
    start = 0
    if resume:
        values = resume_from(checkpoint, model=model, optimizer=optimizer)
        start = values["step"]
        set_rng_state(values["rng"], generator)
    model.train()
    model.router_tau = config.tau
    for step in range(start, config.steps):
        rows = data.batch(config.batch_size, generator).to(device)
        per_seq = budgets[torch.randint(0, len(budgets), (config.batch_size,), generator=generator)]
        lm = lm_loss(model(rows[:, :-1], budget=per_seq.to(device)), rows[:, 1:])
        loss = lm
        mlp_cost, head_cost = costs
        if model.static_router is not None:
            mlp_logits, head_logits = model.static_router(per_seq)
            mlp_probs = straight_through(F.softmax(mlp_logits, -1).double())
            head_probs = straight_through(F.softmax(head_logits, -1).double())
            loss = loss + full_budget_pull(mlp_logits, head_logits, per_seq)
        else:  # every layer's heads in full
            mlp_probs = F.one_hot(torch.full(mlp_cost.shape[:1], mlp_cost.shape[1] - 1), mlp_cost.shape[1]).double()
            head_probs = F.one_hot(torch.full(head_cost.shape[:1], head_cost.shape[1] - 1), head_cost.shape[1]).double()
            mlp_probs, head_probs = mlp_probs.expand(len(per_seq), -1, -1), head_probs.expand(len(per_seq), -1, -1)
        head_part = (head_probs * head_cost).sum((-1, -2))  # [B]
        if model.token_routers is not None:
            # Each token's own MLP choices (the static router's MLP choice is overridden).
            seq_len = rows.shape[1] - 1
            token_probs = torch.stack(model.token_router_probs, dim=1).double()  # [T, L, C]
            token_cost = (straight_through(token_probs) * mlp_cost).sum((-1, -2)).reshape(len(per_seq), seq_len)
            cost = token_cost + head_part[:, None]
            target = (per_seq.double() * full_cost)[:, None]
        else:
            cost = (mlp_probs * mlp_cost).sum((-1, -2)) + head_part
            target = per_seq.double() * full_cost
        lat = latency_loss(cost, target, config.tolerance).mean()
        loss = loss + config.latency_weight * lat.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(step + 1, rows[:, :-1].numel(), lm=lm.item(), latency=lat.item())
        metrics.log(stage="joint", step=step + 1, loss=lm.item(), latency_loss=lat.item())
        if checkpoint and checkpoint_due(step + 1, config.steps, checkpoint_every):
            save_checkpoint(checkpoint, model=model, optimizer=optimizer, step=step + 1, rng=rng_state(generator))
    model.eval()
    return metrics.records
