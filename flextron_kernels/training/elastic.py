"""Stage 1: elastic continued-training.

Each step trains the full network and sampled sub-networks on the same batch; their
gradients accumulate into the shared weights through the ops' prefix-accumulating
backward. A sampled sub-network is either a budget (every layer at that budget's
choices) or, with probability ``random_layers``, an independent random MLP width and
head count per layer: routers later pick such heterogeneous sub-networks, so they must
be trained too. Loss per sub-network: LM loss, plus optionally ``distill_weight`` times the
KL divergence from the full network's logits (``distill="full"``) or from a frozen
teacher's (``distill="teacher"``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from flextron_kernels.ops.common import full_size_weight_grads
from flextron_kernels.training.common import (
    Metrics,
    Progress,
    check_budgets,
    distillation_loss,
    evaluate,
    lm_loss,
    checkpoint_due,
    resume_from,
    rng_state,
    sample_budgets,
    save_checkpoint,
    set_rng_state,
)


@dataclass
class ElasticConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 10
    budgets: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    subnets: int = 3
    sampling: str = "sandwich"
    random_layers: float = 0.5  # chance that a sampled sub-network (not the full or smallest) is per-layer random
    distill: str = "none"  # none | full | teacher
    distill_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    # "bfloat16": forward passes under torch.autocast (the weights, gradients and optimizer
    # state stay fp32). fp16 would need loss scaling: not offered.
    autocast: Optional[str] = None

    def __post_init__(self):
        self.budgets = check_budgets(self.budgets)
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"autocast: expected None or 'bfloat16' (fp16 would need loss scaling), got {self.autocast!r}")
        if self.distill not in ("none", "full", "teacher"):
            raise ValueError(f"distill: expected none, full or teacher, got {self.distill!r}")
        if not 0 <= self.random_layers <= 1:
            raise ValueError(f"random_layers: expected a probability in [0, 1], got {self.random_layers}")


def cosine_schedule(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def elastic_train(model, train, val=None, config: Optional[ElasticConfig] = None, *, teacher=None,
                  metrics_path=None, checkpoint=None, checkpoint_every: int = 0, resume: bool = False,
                  progress: bool = True) -> list:
    """Train ``model`` (a FlextronForCausalLM) on ``train`` (PackedSequences) for
    ``config.steps`` steps; returns the metrics records. ``checkpoint``: a file written
    every ``checkpoint_every`` steps and at the end; ``resume``: continue from it exactly
    (model, optimizer, scheduler, step, RNG)."""
    config = config or ElasticConfig()
    if config.distill == "teacher" and teacher is None:
        raise ValueError("distill: 'teacher' needs a teacher model")
    distributed, rank = distributed_rank()
    core = getattr(model, "module", model)  # the model inside a DDP wrapper
    device = core.embed.weight.device
    params = [p for n, p in model.named_parameters() if "router" not in n]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    # Sub-network sampling is identical on every rank (same seed); batches differ per rank.
    generator = torch.Generator().manual_seed(config.seed)
    data_generator = torch.Generator().manual_seed(config.seed * 7919 + rank + 1)
    start = 0
    if resume:
        values = resume_from(checkpoint, model=core, optimizer=optimizer, scheduler=scheduler)
        start = values["step"]
        set_rng_state(values["rng"], generator)
        data_generator.set_state(values["data_rng"])
    # Distributed wrappers (DDP, FSDP2) reduce gradients from autograd's accumulation hooks:
    # there, weight gradients go through autograd at full size instead of in place.
    grads_mode = full_size_weight_grads if distributed else contextlib.nullcontext
    metrics = Metrics(metrics_path)
    bar = Progress(config.steps, "elastic", progress)
    model.train()
    for step in range(start, config.steps):
        rows = train.batch(config.batch_size, data_generator).to(device)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        budgets = sample_budgets(config.budgets, config.subnets, config.sampling, generator)
        budgets = _with_random_layers(core.config, budgets, config, generator)
        optimizer.zero_grad(set_to_none=True)
        with grads_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast is not None):
            losses = _train_subnetworks(model, inputs, targets, budgets, config, teacher)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        rate = bar.update(step + 1, inputs.numel() * len(budgets), loss=sum(losses.values()) / len(losses))
        record = dict(stage="elastic", step=step + 1, loss_per_budget=losses, lr=scheduler.get_last_lr()[0],
                      tokens_per_s=rate)
        if val is not None and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            record["val_loss"] = {str(b): evaluate(core, val, b) for b in config.budgets}
        metrics.log(**record)
        if checkpoint and checkpoint_due(step + 1, config.steps, checkpoint_every):
            if rank == 0:
                save_checkpoint(checkpoint, model=core, optimizer=optimizer, scheduler=scheduler, step=step + 1,
                                rng=rng_state(generator), data_rng=data_generator.get_state(), config=asdict(config))
    return metrics.records


def distributed_rank() -> tuple:
    """(whether torch.distributed is running, this process's rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def _with_random_layers(model_config, budgets: list, config, generator) -> list:
    """``budgets`` with each entry after the full and smallest sub-networks replaced, with
    probability ``config.random_layers``, by random per-layer ``(mlp_width, heads)`` choices
    (drawn from ``generator``: the same on every rank)."""
    keep = 2 if config.sampling == "sandwich" else 1
    out = list(budgets[:keep])
    for budget in budgets[keep:]:
        if float(torch.rand((), generator=generator)) < config.random_layers:
            budget = [
                (mc[int(torch.randint(0, len(mc), (), generator=generator))],
                 hc[int(torch.randint(0, len(hc), (), generator=generator))])
                for mc, hc in zip(model_config.mlp_choices, model_config.head_choices)
            ]
        out.append(budget)
    return out


def _train_subnetworks(model, inputs, targets, budgets, config, teacher) -> dict:
    """Forward and backward of each sampled sub-network (the full one first): a budget,
    or per-layer choices; returns the LM loss per budget (``random`` for the latter, the
    last of them)."""
    losses, full_logits = {}, None
    for budget in budgets:
        per_layer = isinstance(budget, list)
        logits = model(inputs, choices=budget) if per_layer else model(inputs, budget=budget)
        loss = lm_loss(logits, targets)
        losses["random" if per_layer else str(budget)] = loss.item()
        if config.distill == "full":
            if budget == config.budgets[-1]:
                full_logits = logits.detach()
            elif full_logits is not None:
                loss = loss + config.distill_weight * distillation_loss(logits, full_logits)
        elif config.distill == "teacher":
            with torch.no_grad():
                reference = teacher(inputs)
            loss = loss + config.distill_weight * distillation_loss(logits, reference)
        (loss / len(budgets)).backward()
    return losses
