"""End to end on a CPU in minutes: a small GPT trained on Python's standard library, then
converted to Flextron, elastically trained and router-trained.

1. Dense pretraining of a small GPT-2 (Hugging Face ``GPT2LMHeadModel``) on the
   standard library's source files (byte-level tokens).
2. Conversion with importance ranking (``FlextronForCausalLM.from_hf``); validation
   loss per budget when the converted model is simply sliced.
3. Elastic continued-training (sandwich rule, distillation from the full network);
   validation loss per budget again.
4. A latency table measured on this machine by the benchmark harness; static-router
   training against it with the surrogate; each budget's routed latency and loss.
5. Token routers fine-tuned jointly; their validation loss and routed latency (mean per
   held-out token) per budget.

The routers are trained for budgets 0.35/0.5/0.75/1.0: on this CPU's table the smallest
sub-network already costs about 0.29 of the full model (attention dominates at 2048
tokens), so a 0.25 budget cannot be met by any route.

Writes ``results.json`` and ``loss_vs_budget.png`` to ``--out`` (default
``examples/results``). Usage: ``python examples/elastic_gpt_stdlib.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flextron_kernels.bench.harness import BenchSettings, Harness
from flextron_kernels.bench.measure import environment
from flextron_kernels.models import FlextronForCausalLM
from flextron_kernels.training import (
    ByteTokenizer,
    ElasticConfig,
    JointConfig,
    PackedSequences,
    RouterConfig,
    elastic_train,
    joint_train,
    routed_cost_ratio,
    token_routed_cost_ratio,
    tokenize_files,
    train_routers,
)
from flextron_kernels.training.common import evaluate, lm_loss
from flextron_kernels.training.data import stdlib_sources

BUDGETS = [0.25, 0.5, 0.75, 1.0]
ROUTER_BUDGETS = [0.35, 0.5, 0.75, 1.0]


def pretrain(train, steps, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=257, n_embd=128, n_layer=4, n_head=4, n_positions=256,
                                     bos_token_id=256, eos_token_id=256)
    hf = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    hf.train()
    for step in range(steps):
        rows = train.batch(16, gen)
        loss = lm_loss(hf(input_ids=rows[:, :-1]).logits, rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"  pretrain {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    return hf.eval()


def losses_per_budget(model, val):
    return {b: evaluate(model, val, b, batches=8) for b in BUDGETS}


def routed_losses(model, val, costs, token=False):
    out = {}
    for b in ROUTER_BUDGETS:
        ratio = token_routed_cost_ratio(model, val, b, costs, batches=8) if token else routed_cost_ratio(model, b, costs)
        out[b] = dict(val_loss=evaluate(model, val, b, batches=8), latency_ratio=ratio)
    return out


def plot(results: dict, path: Path) -> None:
    """Validation loss against budget from ``results`` (the content of results.json)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, key in (("converted, sliced", "sliced"), ("after elastic training", "elastic")):
        values = results["val_loss"][key]
        ax.plot([float(b) for b in values], list(values.values()), "o-", label=f"{label} (width budget)")
    for label, key, style in (("static router", "static_router", "s--"), ("token routers (joint)", "token_routers", "^--")):
        values = results[key]
        ax.plot([float(b) for b in values], [v["val_loss"] for v in values.values()], style,
                label=f"{label} (latency budget)")
    ax.set_xlabel("budget: fraction of the full width, or of the full latency by the table")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("GPT on Python's standard library, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/results.json")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out) / "loss_vs_budget.png")
        return 0
    steps = dict(pretrain=40, elastic=30, routers=60, joint=10) if args.quick else dict(pretrain=400, elastic=300, routers=300, joint=200)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("data: Python standard library sources", flush=True)
    stream = tokenize_files(stdlib_sources(2_000_000), ByteTokenizer())
    train, val = PackedSequences(stream, 128).split(0.05)
    print(f"  {stream.numel():,} tokens, {len(train)} training and {len(val)} validation sequences", flush=True)

    print("1. dense pretraining", flush=True)
    hf = pretrain(train, steps["pretrain"])

    print("2. conversion with importance ranking", flush=True)
    model = FlextronForCausalLM.from_hf(hf, calibration=train.rows[:64, :-1])
    sliced = losses_per_budget(model, val)
    print("  sliced:", {b: round(v, 3) for b, v in sliced.items()}, flush=True)

    print("3. elastic continued-training", flush=True)
    elastic_train(model, train, val, ElasticConfig(steps=steps["elastic"], batch_size=16, lr=1e-3, distill="full",
                                                   log_every=steps["elastic"]), progress=False)
    elastic = losses_per_budget(model, val)
    print("  elastic:", {b: round(v, 3) for b, v in elastic.items()}, flush=True)

    print("4. latency table and static router", flush=True)
    shapes = dict(d_model=128, ffn=512, q_heads=4, kv_heads=4, head_dim=32, vocab_size=257, n_layers=4, arch="gpt2")
    harness = Harness(BenchSettings(model=shapes, model_name="example", device=torch.device("cpu"), dtype=torch.float32,
                                    budgets=BUDGETS, tokens=2048, batch=4, lut_tokens=(2048,)), progress=lambda m: None)
    table = harness.latency_table()
    table.save(out / "latency_table.json")
    result = train_routers(model, train, RouterConfig(steps=steps["routers"], batch_size=8, tokens=2048,
                                                      budgets=ROUTER_BUDGETS), latency_table=table, progress=False)
    static = routed_losses(model, val, result["costs"])
    costs = result["costs"]
    floor = ((costs[0].min(1).values.sum() + costs[1].min(1).values.sum())
             / (costs[0][:, -1].sum() + costs[1][:, -1].sum())).item()
    print(f"  the table's smallest sub-network costs {floor:.2f} of the full model: lower budgets cannot be met", flush=True)
    print("  static router:", {b: (round(v["val_loss"], 3), round(v["latency_ratio"], 3)) for b, v in static.items()}, flush=True)

    print("5. token routers, joint fine-tuning", flush=True)
    model.attach_routers(ROUTER_BUDGETS, static=False, token=True)
    joint_train(model, train, JointConfig(steps=steps["joint"], batch_size=8, tokens=2048, budgets=ROUTER_BUDGETS),
                latency_table=table, progress=False)
    token = routed_losses(model, val, costs, token=True)
    print("  token routers:", {b: (round(v["val_loss"], 3), round(v["latency_ratio"], 3)) for b, v in token.items()},
          flush=True)

    results = dict(environment=environment(), steps=steps, seconds=round(time.time() - started, 1),
                   val_loss=dict(sliced=sliced, elastic=elastic), static_router=static, token_routers=token,
                   smallest_latency_ratio=floor, latency_table="latency_table.json")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "loss_vs_budget.png")
    print(f"wrote {out} in {results['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
