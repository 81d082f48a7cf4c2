"""Shared training machinery: LM loss, budget sampling, checkpoints with exact resume,
metrics (JSONL) and a progress line."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def check_budgets(budgets: Sequence[float]) -> list:
    budgets = sorted(set(float(b) for b in budgets))
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets: expected values in (0, 1], got {list(budgets)}")
    return budgets


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [B, S, V]``, ``targets [B, S]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary, per token, averaged."""
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]), -1)
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def sample_budgets(budgets: Sequence[float], count: int, rule: str, generator: torch.Generator) -> list:
    """The sub-networks of one step, the full network first.

    ``sandwich``: full, smallest, then ``count - 2`` drawn uniformly from the others;
    ``uniform``: full, then ``count - 1`` drawn uniformly from all budgets. The same
    generator state gives the same draw on every rank."""
    budgets = list(budgets)
    full, rest = budgets[-1], budgets[:-1]
    if count < 1:
        raise ValueError(f"subnets: expected at least 1, got {count}")
    if rule == "sandwich":
        chosen = [full] + ([budgets[0]] if count > 1 and rest else [])
        pool = rest[1:] or rest
    elif rule == "uniform":
        chosen, pool = [full], budgets
    else:
        raise ValueError(f"sampling: expected 'sandwich' or 'uniform', got {rule!r}")
    while len(chosen) < count and pool:
        chosen.append(pool[int(torch.randint(0, len(pool), (1,), generator=generator))])
    return chosen


def evaluate(model, data, budget, *, batches: int = 4, batch_size: int = 8, seed: int = 1234) -> float:
    """Mean validation LM loss at ``budget`` over fixed batches."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            rows = data.batch(batch_size, gen).to(model.embed.weight.device)
            losses.append(lm_loss(model(rows[:, :-1], budget=budget), rows[:, 1:]).item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Metrics:
    """Appends one JSON object per record to ``path`` (if given) and keeps them in memory."""

    def __init__(self, path: Optional[str] = None):
        self.path = Path(path) if path else None
        self.records = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record) -> None:
        self.records.append(record)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """A one-line progress display on stderr: step, losses, tokens per second."""

    def __init__(self, total: int, stage: str, enabled: bool = True):
        self.total, self.stage, self.enabled = total, stage, enabled
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, tokens: int, **values) -> float:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.enabled:
            shown = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            end = "\n" if step == self.total else ""
            print(f"\r[{self.stage}] {step}/{self.total} {shown} {rate:,.0f} tok/s", end=end, file=sys.stderr, flush=True)
        return rate


def rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def save_checkpoint(path, **parts) -> Path:
    """``parts``: module/optimizer/scheduler objects (their state dicts are saved) and plain values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in parts.items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def checkpoint_due(step: int, total: int, every: int) -> bool:
    """Whether a checkpoint is written after ``step`` (1-based): every ``every`` steps and at the end."""
    return step == total or bool(every and step % every == 0)


def resume_from(path, **objects) -> dict:
    """:func:`load_checkpoint`, with a clear error when there is nothing to resume from."""
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    return load_checkpoint(path, **objects)


def load_checkpoint(path, **objects) -> dict:
    """Restore each object's state from ``path``; returns the plain values."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, obj in objects.items():
        if obj is not None and name in state:
            obj.load_state_dict(state[name])
    return {k: v for k, v in state.items() if k not in objects}
