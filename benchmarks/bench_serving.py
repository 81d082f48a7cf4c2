"""Serving benchmark: the decode step at each budget, a mixed-budget batch, tokens/s.

A Llama-2-7B-shaped model (d_model 4096, 32 heads, ffn 11008; 32 layers, or 8 with
``--quick``) with random weights, served by :class:`flextron_kernels.serving.Server`
with CUDA graphs, ``B`` requests at a time:

- per budget (25/50/75/100%): the decode step with every request at that budget, beside
  a dense model whose layers have that budget's reduced shape (its MLP width and head
  count), served by the same loop at full budget (target: elastic <= 1.05x dense);
- mixed: the ``B`` requests cycle over the four budgets, against the mean of the four
  single-budget steps (target <= 1.10x), and against serving the four budgets as four
  batches of ``B/4`` one after another (what a server of one sub-model size per
  deployment would do);
- tokens/s per budget: ``B`` over the time of a whole loop step (decode step, sampling,
  bookkeeping);
- the mixed-to-single ratio again with long prompts (``--long-prompt-len``): a short
  context's step is bound by reading the weights, where a mix reads its widest request's
  prefix; with long contexts the KV cache, which each request reads at its own head
  count, takes over.

``step_ms`` is the CUDA-graph replay of the decode step alone; ``loop_ms`` a whole
``Server.step()``. Writes JSON and a PNG plot (tokens/s against budget).

Usage: ``python benchmarks/bench_serving.py [--quick] [--batch 16] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flextron_kernels.bench.measure import format_table, time_fixed_ms, write_results
from flextron_kernels.bench.workloads import FRACTIONS
from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.serving import Request, Server

CALLS = 20  # timed calls per figure; each appends a position to the caches


def build(config: FlextronConfig, device, dtype) -> FlextronForCausalLM:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FlextronForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    return model.eval()


def serve(model, budgets, prompt_len, max_batch, gen) -> Server:
    """A server with ``len(budgets)`` requests admitted and one decode step (captured) done."""
    server = Server(model, max_batch=max_batch, max_len=prompt_len + 4 * CALLS + 16, buckets=[max_batch])
    for budget in budgets:
        prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen).tolist()
        server.submit(Request(prompt, budget=budget, max_new_tokens=3 * CALLS + 8))
    server.step()  # prefills
    server.step()  # the first decode step: eager, then captured
    return server


def timings(server: Server) -> dict:
    n = len(server.active)
    step_ms = time_fixed_ms(lambda: server._decode(n), calls=CALLS)
    loop_ms = time_fixed_ms(server.step, calls=CALLS)
    return dict(step_ms=step_ms, loop_ms=loop_ms, tokens_per_s=n / (loop_ms * 1e-3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 layers instead of 32")
    parser.add_argument("--batch", type=int, default=16, help="requests per batch (a multiple of 4)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--long-prompt-len", type=int, default=2048, help="0: skip the long-context comparison")
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    args = parser.parse_args(argv)
    if args.batch < 4 or args.batch % 4:
        parser.error(f"--batch: expected a multiple of 4, got {args.batch}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtype, shape = torch.bfloat16, dict(vocab_size=32000, d_model=4096, q_heads=32, ffn=11008, head_dim=128)
        layers = 8 if args.quick else 32
    else:
        print("no GPU: running a tiny smoke configuration (timings are not meaningful)", file=sys.stderr)
        dtype, shape, layers = torch.float32, dict(vocab_size=256, d_model=64, q_heads=4, ffn=128, head_dim=16), 2
        args.prompt_len = min(args.prompt_len, 16)
        args.long_prompt_len = min(args.long_prompt_len, 48)
    base = dict(arch="llama", n_layers=layers, kv_heads=shape["q_heads"], max_positions=4096, **shape)
    gen = torch.Generator().manual_seed(0)
    batch = args.batch

    model = build(FlextronConfig(**base), device, dtype)
    rows = []
    for fraction in FRACTIONS:
        print(f"  budget {fraction}", file=sys.stderr, flush=True)
        width, heads = model.choices_for(fraction)[0]
        row = dict(budget=fraction, mlp_width=width, heads=heads)
        row.update({f"elastic_{k}": v for k, v in timings(serve(model, [fraction] * batch, args.prompt_len, batch, gen)).items()})
        dense = build(FlextronConfig(**dict(base, ffn=width, q_heads=heads, kv_heads=heads)), device, dtype)
        row.update({f"dense_{k}": v for k, v in timings(serve(dense, [1.0] * batch, args.prompt_len, batch, gen)).items()})
        del dense
        quarter = serve(model, [fraction] * (batch // 4), args.prompt_len, batch // 4, gen)
        row["quarter_batch_step_ms"] = timings(quarter)["step_ms"]
        row["elastic_vs_dense"] = row["elastic_step_ms"] / row["dense_step_ms"]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("  mixed", file=sys.stderr, flush=True)
    mixed = timings(serve(model, [FRACTIONS[i % len(FRACTIONS)] for i in range(batch)], args.prompt_len, batch, gen))
    mean_single = sum(r["elastic_step_ms"] for r in rows) / len(rows)
    long_context = {}
    if args.long_prompt_len:
        print(f"  long prompts ({args.long_prompt_len} tokens)", file=sys.stderr, flush=True)
        for fraction in FRACTIONS:
            server = serve(model, [fraction] * batch, args.long_prompt_len, batch, gen)
            long_context[fraction] = timings(server)["step_ms"]
            del server
        mixed_long = serve(model, [FRACTIONS[i % len(FRACTIONS)] for i in range(batch)], args.long_prompt_len, batch, gen)
        long_context["mixed"] = timings(mixed_long)["step_ms"]
        del mixed_long
    sequential = sum(r["quarter_batch_step_ms"] for r in rows)
    summary = dict(
        elastic_vs_dense_max=max(r["elastic_vs_dense"] for r in rows),
        mixed_step_ms=mixed["step_ms"],
        mixed_loop_ms=mixed["loop_ms"],
        mixed_tokens_per_s=mixed["tokens_per_s"],
        mixed_vs_mean_single_budget=mixed["step_ms"] / mean_single,
        mixed_vs_four_sequential_batches=mixed["step_ms"] / sequential,
    )
    if long_context:
        single_long = [long_context[f] for f in FRACTIONS]
        summary["long_prompt_mixed_step_ms"] = long_context["mixed"]
        summary["long_prompt_mixed_vs_mean_single_budget"] = long_context["mixed"] / (sum(single_long) / len(single_long))
    print(format_table(rows, ["budget", "mlp_width", "heads", "elastic_step_ms", "dense_step_ms", "elastic_vs_dense",
                              "elastic_loop_ms", "elastic_tokens_per_s", "quarter_batch_step_ms"]))
    print("summary:", summary)
    payload = dict(
        benchmark="serving", dtype=str(dtype), batch=batch, prompt_len=args.prompt_len, layers=layers,
        shape=shape, summary=summary, rows=rows, long_prompt_len=args.long_prompt_len,
        long_prompt_step_ms={str(k): v for k, v in long_context.items()},
    )
    path = write_results(args.out, payload)
    print(f"wrote {path}")
    plot(rows, summary, Path(args.out).with_suffix(".png"), batch)
    return 0


def plot(rows, summary, path: Path, batch: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    budgets = [r["budget"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(budgets, [r["elastic_tokens_per_s"] for r in rows], "o-", label="elastic model, one budget per batch")
    ax.plot(budgets, [r["dense_tokens_per_s"] for r in rows], "s--", label="dense model of the reduced shape")
    ax.axhline(summary["mixed_tokens_per_s"], color="gray", linestyle=":", label="four budgets mixed in one batch")
    ax.set_xlabel("budget")
    ax.set_ylabel(f"tokens/s (batch {batch})")
    ax.set_title("Serving throughput per budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
