"""Stage 3: joint fine-tuning of the model and its routers (the surrogate discarded).

Each batch mixes budgets (one per sequence). Routers sample hard choices with
Gumbel-softmax; the LM loss reaches them through the straight-through scales the ops
apply; both also get the latency loss of the choices they make (straight-through: the
argmax choice's latency, the softmax's gradient), per sequence: its heads' latency plus
the mean over its tokens of their MLP choices'. At budget 1 both are also pulled to the
largest choices (the latency target allows everything).

With token routers, training ends with a calibration: per trained budget, a logit offset
``-lambda * (each choice's share of its layer's largest MLP latency)`` (a Lagrange
multiplier on the latency constraint), with ``lambda`` found by bisection so that the
routes taken on ``calibration_tokens`` training tokens meet the budget's latency on
average, within ``tolerance``. The gradient steps leave the average a few per cent off,
since the LM loss keeps pulling toward wider routes.
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
    full_cost,
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
    calibration_tokens: int = 16384  # 0: no calibration
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
    full = full_cost(costs)
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
            # At budget 1 the target allows everything: pull those tokens to the largest width.
            full_seqs = per_seq >= 1.0  # on the host: no device sync to test it
            if bool(full_seqs.any()):
                full_tokens = full_seqs.repeat_interleave(seq_len).to(token_probs.device)
                loss = loss - token_probs[full_tokens, :, -1].clamp_min(1e-12).log().mean().float()
            # A sequence meets its budget on average over its tokens: the routers may give
            # some tokens more width than others (per-token targets would ask each token to hit
            # a latency that the discrete choices rarely allow).
            cost = token_cost.mean(1) + head_part
        else:
            cost = (mlp_probs * mlp_cost).sum((-1, -2)) + head_part
        target = per_seq.double() * full
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
    if model.token_routers is not None and config.calibration_tokens:
        batch_size = 16
        batches = -(-config.calibration_tokens // (batch_size * data.seq_len))
        lambdas = calibrate_token_routers(model, data, costs, config.budgets, config.tolerance,
                                          batches=batches, batch_size=batch_size)
        metrics.log(stage="joint", calibration=lambdas)
    return metrics.records


def calibrate_token_routers(model, data, costs, budgets, tolerance: float, *, batches: int = 2, batch_size: int = 8,
                            iterations: int = 30, bound: float = 30.0) -> dict:
    """Set each token router's ``latency_offset`` so that, per budget, the routes taken on
    ``batches`` batches of ``data`` cost ``budget`` times the full model within
    ``tolerance`` (see the module docstring); returns ``{budget: lambda}``. Where no
    ``lambda`` in ``[-bound, bound]`` gets there, the nearest end is kept."""
    from flextron_kernels.training.routers import token_routed_cost_ratio

    mlp_cost = costs[0]
    share = (mlp_cost / mlp_cost[:, -1:]).float()  # [L, C]
    trained = model.router_budgets.tolist()
    lambdas = {}
    for budget in budgets:
        index = min(range(len(trained)), key=lambda i: abs(trained[i] - budget))

        def ratio(lam):
            for layer, router in enumerate(model.token_routers):
                router.latency_offset[index] = -lam * share[layer].to(router.latency_offset.device)
            return token_routed_cost_ratio(model, data, budget, costs, batches=batches, batch_size=batch_size,
                                           seed=4321)

        low, high = -bound, bound  # the ratio falls as lambda grows
        lam, value = 0.0, ratio(0.0)
        for _ in range(iterations):
            if abs(value / budget - 1) <= tolerance:
                break
            if value > budget:
                low = lam
            else:
                high = lam
            lam = (low + high) / 2
            value = ratio(lam)
        lambdas[budget] = lam
    return lambdas
