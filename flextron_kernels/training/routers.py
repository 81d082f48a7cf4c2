"""Stage 2: router training against a surrogate of the LM loss and a latency table.

The model is frozen. Sampled router choices are run through the model to record
(choice one-hots -> LM loss) pairs; a small MLP, the surrogate, learns to predict the
loss from router probabilities. The static router is then updated on
``surrogate(probs) + latency_weight * latency_loss``, only while the surrogate's relative
error on fresh samples stays under ``surrogate_threshold`` (otherwise it is refreshed
with more samples). A choice set's latency is the sum over layers of the latency
table's MLP and attention entries (fallback without a table: a parameter count, which
is proportional to FLOPs); the target is ``budget x`` the full model's latency, and the
loss ``| expected / target - 1 |`` is zero within ``tolerance``; at budget 1 the router is also pulled to
the largest choices.

The latency target is the constraint and the surrogate picks among the routes that meet
it. Gradient updates move a discrete route (the argmax) only by crossing probabilities,
and the surrogate's pull toward larger routes can leave it one layer's step over its
target when training stops; so training ends by projecting each budget's route onto its
latency band: one layer choice at a time, the step down (while over the target) or up
(while under it, or while the surrogate predicts a lower loss and the band allows)
with the best predicted loss change per unit of latency, then fitting the router to the
projected routes. Budgets are projected in ascending order and a route never goes below
the previous budget's in any layer: routes are nested, like the sub-networks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flextron_kernels.bench.latency_table import LatencyTable
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


@dataclass
class RouterConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-2
    budgets: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    samples: int = 48  # (choices, loss) pairs per surrogate refresh
    surrogate_steps: int = 300
    surrogate_threshold: float = 0.05  # relative error on fresh samples
    check_every: int = 50
    latency_weight: float = 20.0
    surrogate_weight: float = 0.2  # the latency target is the constraint; the surrogate picks among configs meeting it
    tolerance: float = 0.02  # no latency loss within 2% of the target (routes are judged at 5%)
    fit_steps: int = 500  # router updates that fit it to the projected routes
    tau_start: float = 1.0
    tau_end: float = 0.1
    phase: str = "prefill"
    tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        self.budgets = check_budgets(self.budgets)


class Surrogate(nn.Module):
    """Router probabilities (per layer, MLP then heads, flattened) -> predicted LM loss."""

    def __init__(self, n_inputs: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_inputs, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 1))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs).squeeze(-1)


def choice_costs(model, table: Optional[LatencyTable], phase: str, tokens: int):
    """Per layer, the cost of each MLP-width and head-count choice: ``([L, Cm], [L, Ch])``
    latencies from ``table``, or parameter counts without one."""
    cfg = model.config
    mlp, heads = [], []
    for mc, hc in zip(cfg.mlp_choices, cfg.head_choices):
        if table is not None:
            mlp.append([table.latency("mlp", c, phase, tokens) for c in mc])
            heads.append([table.latency("attention", h, phase, tokens) for h in hc])
        else:
            per_neuron = cfg.d_model * (3 if cfg.arch == "llama" else 2)
            mlp.append([c * per_neuron for c in mc])
            heads.append([h * cfg.head_dim * cfg.d_model * (2 + 2 / cfg.group) for h in hc])
    return torch.tensor(mlp, dtype=torch.float64), torch.tensor(heads, dtype=torch.float64)


def full_cost(costs) -> torch.Tensor:
    """The full model's cost under :func:`choice_costs`: every layer's largest choices."""
    return costs[0][:, -1].sum() + costs[1][:, -1].sum()


def check_table(model, table: LatencyTable, phase: str) -> None:
    """Raise ValueError if ``table`` lacks any of the model's choices."""
    for kind, per_layer in (("mlp", model.config.mlp_choices), ("attention", model.config.head_choices)):
        have = set(table.choices(kind, phase))
        need = {c for layer in per_layer for c in layer}
        if not need <= have:
            raise ValueError(f"latency table: no {phase} entries for {kind} choices {sorted(need - have)} "
                             f"(the table has {sorted(have)}); measure it with the model's choices")


def straight_through(probs: torch.Tensor) -> torch.Tensor:
    """The argmax one-hot of ``probs [..., C]`` carrying their gradient: the cost of the
    choice actually made, differentiable."""
    hard = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
    return hard - probs.detach() + probs


def resolve_table(table, model, phase: str) -> Optional[LatencyTable]:
    """``table`` (a LatencyTable, a path to one, or None), checked against the model's choices."""
    if table is None:
        return None
    if not isinstance(table, LatencyTable):
        table = LatencyTable.load(table)
    check_table(model, table, phase)
    return table


def expected_cost(mlp_probs, head_probs, costs):
    """``[B]``: sum over layers of the probability-weighted choice costs."""
    mlp_cost, head_cost = (c.to(mlp_probs.dtype) for c in costs)
    return (mlp_probs * mlp_cost).sum((-1, -2)) + (head_probs * head_cost).sum((-1, -2))


def latency_loss(cost, target, tolerance):
    excess = (cost / target - 1).abs()
    return torch.where(excess < tolerance, torch.zeros_like(excess), excess)


def full_budget_pull(mlp_logits, head_logits, budgets):
    """At budget 1 the latency target allows everything: pull the router to the largest
    choices there (cross-entropy toward the last choice of every layer)."""
    full = budgets >= 1.0
    if not bool(full.any()):
        return mlp_logits.new_zeros(())
    terms = []
    for logits in (mlp_logits[full], head_logits[full]):
        target = torch.full(logits.shape[:-1], logits.shape[-1] - 1, dtype=torch.int64)
        terms.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)))
    return sum(terms)


def _route_features(mlp_choice: torch.Tensor, head_choice: torch.Tensor) -> torch.Tensor:
    """The surrogate's input for one route: its one-hot choices ``[L, Cm]`` and ``[L, Ch]``
    (or ``[1, L, C]``), flattened and concatenated."""
    return torch.cat([mlp_choice.flatten(), head_choice.flatten()])


def _collect(model, data, budgets, n, batch_size, generator, tau):
    """(one-hot choices [n, features], LM losses [n]) from routes sampled at random budgets."""
    router = model.static_router
    features, losses, sampled = [], [], []
    with torch.no_grad():
        for _ in range(n):
            budget = budgets[int(torch.randint(0, len(budgets), (1,), generator=generator))]
            rows = data.batch(batch_size, generator).to(model.embed.weight.device)
            mlp_logits, head_logits = router(torch.tensor([budget]))
            gumbel = lambda lg: F.gumbel_softmax(lg, tau=tau, hard=True)  # noqa: E731
            mlp_choice, head_choice = gumbel(mlp_logits), gumbel(head_logits)
            loss = _loss_with_choices(model, rows, mlp_choice[0].argmax(-1), head_choice[0].argmax(-1))
            features.append(_route_features(mlp_choice, head_choice))
            losses.append(loss)
            sampled.append(budget)
    return torch.stack(features), torch.tensor(losses)


def _loss_with_choices(model, rows, mlp_index, head_index) -> float:
    """LM loss of the sub-network with these per-layer choice indices."""
    cfg = model.config
    choices = [(mc[i], hc[j]) for mc, hc, i, j in zip(cfg.mlp_choices, cfg.head_choices, mlp_index.tolist(), head_index.tolist())]
    was_training = model.training
    model.eval()
    loss = lm_loss(model(rows[:, :-1], choices=choices), rows[:, 1:]).item()
    model.train(was_training)
    return loss


def _fit(surrogate, features, losses, steps, lr=3e-3):
    opt = torch.optim.Adam(surrogate.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(surrogate(features), losses).backward()
        opt.step()


def _relative_error(surrogate, features, losses) -> float:
    with torch.no_grad():
        return ((surrogate(features) - losses).abs() / losses.abs().clamp_min(1e-6)).mean().item()


def train_routers(model, data, config: Optional[RouterConfig] = None, *, latency_table=None, metrics_path=None,
                  progress: bool = True, checkpoint=None, checkpoint_every: int = 0, resume: bool = False) -> dict:
    """Train ``model.static_router`` (attached if missing) with the model frozen.

    ``checkpoint``: a file written every ``checkpoint_every`` steps and at the end (routers,
    surrogate and its samples, optimizer, step, RNG); ``resume``: continue from it exactly.
    Returns ``{"surrogate": Surrogate, "records": [...], "costs": ..., "full_cost": ...}``."""
    config = config or RouterConfig()
    table = resolve_table(latency_table, model, config.phase)
    if model.static_router is None:
        model.attach_routers(config.budgets, static=True, token=False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("static_router."))
    router = model.static_router
    costs = choice_costs(model, table, config.phase, config.tokens)
    full = full_cost(costs)
    floor = ((costs[0].min(1).values.sum() + costs[1].min(1).values.sum()) / full).item()
    below = [b for b in config.budgets if b < floor * (1 - config.tolerance)]
    if below:
        warnings.warn(f"budgets {below} cannot be met: the smallest sub-network costs {floor:.3f} of the full "
                      f"model ({'by the latency table' if table is not None else 'by parameter count'}); "
                      "their routes will be the smallest sub-network")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    metrics = Metrics(metrics_path)
    bar = Progress(config.steps, "routers", progress)
    n_features = sum(len(c) for c in model.config.mlp_choices) + sum(len(c) for c in model.config.head_choices)
    surrogate = Surrogate(n_features)
    opt = torch.optim.Adam(router.parameters(), lr=config.lr)
    start = 0
    if resume:
        values = resume_from(checkpoint, router=router, surrogate=surrogate, optimizer=opt)
        start, error = values["step"], values["error"]
        features, losses = values["features"], values["losses"]
        set_rng_state(values["rng"], generator)
    else:
        features, losses = _collect(model, data, config.budgets, config.samples, config.batch_size, generator,
                                    config.tau_start)
        _fit(surrogate, features, losses, config.surrogate_steps)
        fresh = _collect(model, data, config.budgets, config.samples // 2, config.batch_size, generator, config.tau_start)
        error = _relative_error(surrogate, *fresh)
    budgets = torch.tensor(config.budgets, dtype=torch.float32)

    def latency_term():
        mlp_logits, head_logits = router(budgets)
        # Temperature 1 here: an annealed temperature saturates the softmax and starves the
        # straight-through gradient (tau anneals the sampling of routes for the surrogate).
        mlp_probs, head_probs = F.softmax(mlp_logits, -1), F.softmax(head_logits, -1)
        # The latency of the choice the router makes (its argmax), with the soft gradient.
        cost = expected_cost(straight_through(mlp_probs.double()), straight_through(head_probs.double()), costs)
        lat = latency_loss(cost, budgets.double() * full, config.tolerance)
        loss = config.latency_weight * lat.mean() + full_budget_pull(mlp_logits, head_logits, budgets)
        return loss, lat, mlp_probs, head_probs

    for step in range(start, config.steps):
        tau = config.tau_start * (config.tau_end / config.tau_start) ** (step / max(config.steps - 1, 1))
        if step and step % config.check_every == 0:
            fresh_f, fresh_l = _collect(model, data, config.budgets, config.samples // 2, config.batch_size, generator, tau)
            error = _relative_error(surrogate, fresh_f, fresh_l)
            if error >= config.surrogate_threshold:  # refresh the surrogate before trusting it again
                features, losses = torch.cat([features, fresh_f]), torch.cat([losses, fresh_l])
                _fit(surrogate, features, losses, config.surrogate_steps)
                error = _relative_error(surrogate, fresh_f, fresh_l)
        loss, lat, mlp_probs, head_probs = latency_term()
        if error < config.surrogate_threshold:
            probs = torch.cat([mlp_probs.flatten(1), head_probs.flatten(1)], dim=1)
            loss = loss + config.surrogate_weight * surrogate(probs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(step + 1, 0, loss=loss.item(), surrogate_error=error)
        metrics.log(stage="routers", step=step + 1, loss=loss.item(), latency_loss=lat.mean().item(),
                    surrogate_error=error, tau=tau)
        if checkpoint and checkpoint_due(step + 1, config.steps, checkpoint_every):
            save_checkpoint(checkpoint, router=router, surrogate=surrogate, optimizer=opt, step=step + 1, error=error,
                            features=features, losses=losses, rng=rng_state(generator))
    with torch.no_grad():
        mlp_logits, head_logits = router(budgets)
        routes, floor = [], None
        for m, h, b in zip(mlp_logits.argmax(-1), head_logits.argmax(-1), budgets):  # ascending budgets
            floor = project_route(m, h, costs, float(b) * full, config.tolerance, surrogate, floor=floor)
            routes.append(floor)
    fitted = _fit_router(router, budgets, routes, config.fit_steps, config.lr)
    metrics.log(stage="routers", projected=True, fitted=fitted)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"surrogate": surrogate, "records": metrics.records, "costs": costs, "full_cost": full.item()}


def project_route(mlp_index, head_index, costs, target: float, tolerance: float, surrogate, floor=None):
    """The route ``(mlp_index [L], head_index [L])`` moved, one layer choice at a time,
    into ``target * (1 +- tolerance)`` (or as near as the choices allow): steps down while
    over, up while under or while the surrogate predicts a lower loss within the band;
    each time the step with the best predicted loss change per unit of latency. ``floor``:
    a route that no choice goes below (the previous budget's)."""
    mlp_cost, head_cost = costs
    route = [mlp_index.clone().cpu(), head_index.clone().cpu()]
    if floor is not None:
        route = [torch.maximum(r, f) for r, f in zip(route, floor)]
    low = [torch.zeros_like(r) for r in route] if floor is None else floor
    axes = ((0, mlp_cost), (1, head_cost))

    def cost(r):
        return float(mlp_cost.gather(1, r[0][:, None]).sum() + head_cost.gather(1, r[1][:, None]).sum())

    def predicted(r):
        features = _route_features(F.one_hot(r[0], mlp_cost.shape[1]), F.one_hot(r[1], head_cost.shape[1]))
        return float(surrogate(features.float()[None])[0])

    def steps(direction):
        for axis, table in axes:
            for layer in range(table.shape[0]):
                index = int(route[axis][layer]) + direction
                if int(low[axis][layer]) <= index < table.shape[1]:
                    moved = [route[0].clone(), route[1].clone()]
                    moved[axis][layer] = index
                    yield moved

    upper, lower = target * (1 + tolerance), target * (1 - tolerance)
    with torch.no_grad():
        while cost(route) > upper:  # over: the cheapest loss increase per unit of latency saved
            here = predicted(route)
            options = [(max(predicted(m) - here, 1e-9) / (cost(route) - cost(m)), m) for m in steps(-1)]
            if not options:
                break
            route = min(options, key=lambda o: o[0])[1]
        while True:  # under, or a better route within the band: the best loss change per unit added
            here, now = predicted(route), cost(route)
            options = [((predicted(m) - here) / (cost(m) - now), m) for m in steps(+1) if cost(m) <= upper]
            if now >= lower:
                options = [o for o in options if o[0] < 0]
            if not options:
                break
            route = min(options, key=lambda o: o[0])[1]
    return route


def _fit_router(router, budgets, routes, steps: int, lr: float) -> bool:
    """Fit ``router`` so that its argmax at each budget is that budget's route; returns
    whether it does."""
    mlp_target = torch.stack([r[0] for r in routes])
    head_target = torch.stack([r[1] for r in routes])
    opt = torch.optim.Adam(router.parameters(), lr=lr)

    def matches(mlp_logits, head_logits):
        return torch.equal(mlp_logits.argmax(-1), mlp_target) and torch.equal(head_logits.argmax(-1), head_target)

    for _ in range(steps):
        mlp_logits, head_logits = router(budgets)
        if matches(mlp_logits, head_logits):
            return True
        loss = (F.cross_entropy(mlp_logits.flatten(0, 1), mlp_target.flatten())
                + F.cross_entropy(head_logits.flatten(0, 1), head_target.flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return matches(*router(budgets))


def routed_cost_ratio(model, budget: float, costs) -> float:
    """The latency (by ``costs``) of the router's argmax choice at ``budget``, over the full model's."""
    with torch.no_grad():
        mlp_logits, head_logits = model.static_router(torch.tensor([budget]))
        mlp = F.one_hot(mlp_logits.argmax(-1), mlp_logits.shape[-1]).double()
        heads = F.one_hot(head_logits.argmax(-1), head_logits.shape[-1]).double()
        return (expected_cost(mlp, heads, costs) / full_cost(costs)).item()


def token_routed_cost_ratio(model, data, budget: float, costs, *, batches: int = 4, batch_size: int = 8,
                            seed: int = 1234) -> float:
    """With token routers: the mean latency (by ``costs``) per held-out token of the routes
    taken at ``budget``, over the full model's: each token's MLP choices from the token
    routers, the heads from the static router (all heads without one)."""
    mlp_cost, head_cost = costs
    if model.static_router is not None:
        with torch.no_grad():
            _, head_logits = model.static_router(torch.tensor([budget]))
        head_part = head_cost.gather(1, head_logits[0].argmax(-1).cpu()[:, None]).sum()
    else:
        head_part = head_cost[:, -1].sum()
    full = full_cost(costs)
    gen = torch.Generator().manual_seed(seed)
    was_training, model.record_token_choices = model.training, True
    model.eval()
    per_token = []
    try:
        with torch.no_grad():
            for _ in range(batches):
                rows = data.batch(batch_size, gen).to(model.embed.weight.device)
                model(rows[:, :-1], budget=budget)
                index = torch.stack(model.token_router_choices, dim=1).cpu()  # [T, L]
                per_token.append(mlp_cost.gather(1, index.T).sum(0))  # [T]
    finally:
        model.record_token_choices = False
        model.train(was_training)
    return ((torch.cat(per_token).mean() + head_part) / full).item()
