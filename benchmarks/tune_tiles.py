"""Tile sweep for the Triton kernels: times each candidate configuration on the ops
themselves (per-token widths, bf16, Llama-2-7B shapes) and keeps the fastest per kernel
family in the tuned table that :mod:`flextron_kernels.ops.tiles` reads for this GPU.

Families are swept in order, each with the winners of the ones before it:
``matmul`` (per-token linear forward and backward, output widths and input widths),
``matmul_small`` (the same over 512 tokens, and the MLP forward), ``matmul_gated``
(the MLP forward), ``matmul_decode`` (the linear forward over 16 tokens, replayed
from a CUDA graph, as serving runs decode steps: an eager call's host time, which TMA
descriptors add to, is not timed), ``weight_grad`` (per-token linear forward and backward),
``attention_fwd``, ``attention_bwd_dq`` and ``attention_bwd_dkdv`` (B=8, S=2048, Hq=32,
Hkv=8, Dh=128, causal, a per-token head mix; the backward families timed as forward and
backward), ``attention_decode`` (one request over 32768 cached positions at 16 of 32
heads, and 16 requests over 4096, replayed from a CUDA graph). Before it is timed, each
candidate's outputs and gradients are compared with the torch backend's: one that
disagrees (``MAX_RELATIVE_DIFFERENCE``) is reported and never picked.

Usage: ``python benchmarks/tune_tiles.py [--families matmul,...] [--out FILE.json]
[--write-table]`` (``--write-table`` merges the winners into the package's
``tuned_tiles.json`` under this GPU's name). On a CPU it runs a tiny smoke sweep and
never writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, NamedTuple, Sequence

import torch

import flextron_kernels as fk
from flextron_kernels.bench.measure import format_table, graph_replay, time_ms, write_results
from flextron_kernels.bench.workloads import mixed_widths
from flextron_kernels.ops import tiles

CANDIDATES = {
    # The first candidate of each family is its current default. The kernels' options (B_TMA:
    # the routed matmul's weight tiles through TMA descriptors; OVERLAP, KV_TMA: see
    # attention_fwd and attention_bwd_dq) are stated in each, as a tuned table may hold
    # either setting.
    "matmul": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=True),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=True),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=True),
    ],
    # Measured at 512 tokens (see SMALL_TOKENS).
    "matmul_small": [
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, B_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=True),
    ],
    "matmul_gated": [
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=False),
        dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=False),
        dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2, B_TMA=False),
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=True),
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, B_TMA=True),
    ],
    "matmul_decode": [
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=False),
        dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3, B_TMA=False),
        dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4, B_TMA=False),
        dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=6, B_TMA=False),
        dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, B_TMA=True),
        dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3, B_TMA=True),
        dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, B_TMA=True),
    ],
    "weight_grad": [
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    ],
    # OVERLAP: the softmax of one key block during the next block's scores (more registers);
    # KV_TMA: keys and values through TMA descriptors.
    "attention_fwd": [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, OVERLAP=True, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, OVERLAP=True, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, OVERLAP=False, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, OVERLAP=False, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, OVERLAP=False, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, OVERLAP=False, KV_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, OVERLAP=True, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, OVERLAP=True, KV_TMA=True),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, OVERLAP=True, KV_TMA=True),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, OVERLAP=False, KV_TMA=True),
    ],
    # Backward candidates: sm_90 builds without register spills, or nearly (see
    # scripts/compile_triton_kernels.py), each timed as the whole forward and backward.
    "attention_bwd_dq": [
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, KV_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, KV_TMA=False),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, KV_TMA=False),
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, KV_TMA=True),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, KV_TMA=True),
    ],
    "attention_bwd_dkdv": [
        dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    # Decode attention: shorter splits in more programs, or longer ones streamed deeper.
    "attention_decode": [
        dict(BLOCK_N=64, PROGRAMS_PER_SM=8, num_warps=4, num_stages=2),
        dict(BLOCK_N=64, PROGRAMS_PER_SM=4, num_warps=4, num_stages=2),
        dict(BLOCK_N=64, PROGRAMS_PER_SM=4, num_warps=4, num_stages=3),
        dict(BLOCK_N=64, PROGRAMS_PER_SM=2, num_warps=4, num_stages=4),
        dict(BLOCK_N=128, PROGRAMS_PER_SM=4, num_warps=4, num_stages=2),
        dict(BLOCK_N=32, PROGRAMS_PER_SM=8, num_warps=4, num_stages=3),
        dict(BLOCK_N=64, PROGRAMS_PER_SM=16, num_warps=4, num_stages=2),
        # One wave or less, long splits: fewer partials for the combine, which one request
        # leaves with few programs (B x Hq) and so on the critical path.
        dict(BLOCK_N=64, PROGRAMS_PER_SM=1, num_warps=4, num_stages=4),
        dict(BLOCK_N=128, PROGRAMS_PER_SM=2, num_warps=4, num_stages=3),
    ],
}


class Workload(NamedTuple):
    """``run()`` makes one call of the timed ops and returns their outputs; ``leaves``: the
    tensors whose gradients its backward computes (compared as outputs, see
    :func:`outputs_of`)."""

    run: Callable[[], list]
    leaves: Sequence[torch.Tensor] = ()


def linear_workloads(device, dtype, tokens, d_model, ffn, backward):
    """Per-token linear, Llama-2-7B up (output widths) and down (input widths)."""
    x_up = torch.randn(tokens, d_model, device=device, dtype=dtype)
    x_down = torch.randn(tokens, ffn, device=device, dtype=dtype)
    up = fk.ElasticLinear(d_model, ffn, bias=False, device=device, dtype=dtype)
    down = fk.ElasticLinear(ffn, d_model, bias=False, device=device, dtype=dtype)
    widths = mixed_widths(ffn, tokens, "uniform", device)
    dy_up = torch.randn(tokens, ffn, device=device, dtype=dtype)
    dy_down = torch.randn(tokens, d_model, device=device, dtype=dtype)

    def run():
        y_up = up(x_up, out_features=widths)
        y_down = down(x_down, in_features=widths)
        if backward:
            y_up.backward(dy_up)
            y_down.backward(dy_down)
        return [y_up, y_down]

    return Workload(run, (up.weight, down.weight) if backward else ())


def decode_attention_workload(device, dtype, cases, q_heads, kv_heads, head_dim):
    """Decode attention over each ``(batch, cache length, active heads)`` case, full caches."""
    calls = []
    for batch, kv_len, heads in cases:
        q = torch.randn(batch, q_heads, head_dim, device=device, dtype=dtype)
        # K and V apart: one tensor for both would serve each V block from L2.
        k, v = (torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=dtype) for _ in range(2))
        lens = torch.full((batch,), kv_len, device=device, dtype=torch.int32)
        calls.append(lambda q=q, k=k, v=v, lens=lens, heads=heads: fk.elastic_attention_decode(
            q, k, v, cache_seqlens=lens, heads=heads))
    return Workload(lambda: [call() for call in calls])


def mlp_workload(device, dtype, tokens, d_model, ffn):
    mlp = fk.ElasticMLP(d_model, ffn, gated=True, device=device, dtype=dtype)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    widths = mixed_widths(ffn, tokens, "uniform", device)
    return Workload(lambda: [mlp(x, width=widths)])


def attention_workload(device, dtype, batch, seq_len, q_heads, kv_heads, head_dim, backward):
    tokens = batch * seq_len
    group = q_heads // kv_heads
    cu = torch.arange(0, tokens + 1, seq_len, device=device, dtype=torch.int32)
    q = torch.randn(tokens, q_heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    choices = torch.tensor([max(group, q_heads * i // 4 // group * group) for i in range(1, 5)])
    heads = choices[torch.randint(0, 4, (tokens,), generator=torch.Generator().manual_seed(0))].to(device)
    dout = torch.randn_like(q)

    def run():
        out = fk.elastic_attention(q, k, v, heads=heads, cu_seqlens=cu)
        if backward:
            out.backward(dout)
        return [out]

    return Workload(run, (q, k, v) if backward else ())


# The token count of the ``matmul_small`` sweep (its forward and backward, and the MLP's).
SMALL_TOKENS = 512


def workload(family, device, dtype, smoke):
    if smoke:
        tokens, d_model, ffn, attn = 64, 32, 96, (2, 32, 4, 2, 16)
    else:
        tokens, d_model, ffn, attn = 4096, 4096, 11008, (8, 2048, 32, 8, 128)
    if family == "matmul":  # its tiles serve the input gradients too (B_TMA reads W.T there)
        return linear_workloads(device, dtype, tokens, d_model, ffn, backward=True)
    if family == "matmul_small":
        small = min(tokens, SMALL_TOKENS)
        linear = linear_workloads(device, dtype, small, d_model, ffn, backward=True)
        mlp = mlp_workload(device, dtype, small, d_model, ffn)
        return Workload(lambda: linear.run() + mlp.run(), linear.leaves)
    if family == "matmul_gated":
        return mlp_workload(device, dtype, tokens, d_model, ffn)
    if family == "matmul_decode":
        return linear_workloads(device, dtype, 16, d_model, ffn, backward=False)
    if family == "weight_grad":
        return linear_workloads(device, dtype, tokens, d_model, ffn, backward=True)
    if family == "attention_decode":
        # The cases furthest from the target: one request over a long cache (64 MiB of
        # KV at half the heads), and a batch of 16 over 4096 positions.
        cases = ((1, 64, 2), (2, 32, 4)) if smoke else ((1, 32768, 16), (16, 4096, 32))
        return decode_attention_workload(device, dtype, cases, *((4, 2, 16) if smoke else (32, 8, 128)))
    return attention_workload(device, dtype, *attn, backward=family.startswith("attention_bwd"))


# A candidate whose outputs (and gradients) differ from the torch backend's by more than
# this, relative in norm, is not timed: two correct summation orders differ by about 1e-3
# in bf16, a wrong tile (a mask or a TMA descriptor reaching past a prefix) by O(1).
MAX_RELATIVE_DIFFERENCE = 2e-2


def outputs_of(work: Workload) -> list[torch.Tensor]:
    """The outputs of one call of ``work`` and the gradients of its leaves from that call
    alone, in fp32."""
    for leaf in work.leaves:
        leaf.grad = None
    outputs = [out.detach().float().clone() for out in work.run()]
    return outputs + [leaf.grad.float().clone() for leaf in work.leaves]


def relative_difference(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """The largest ``||actual - expected|| / ||expected||`` over the outputs; inf where the
    counts or shapes differ or ``actual`` holds a value that is not finite."""
    if len(expected) != len(actual):
        return math.inf
    worst = 0.0
    for want, got in zip(expected, actual):
        if want.shape != got.shape or not bool(torch.isfinite(got).all()):
            return math.inf
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float32).tiny)))
    return worst


def sweep_family(family, work, candidates, winners, *, reference, timer):
    """Times ``work`` under each candidate configuration of ``family`` (with the
    ``winners`` of the families before it) whose outputs agree with ``reference``.
    Returns the rows (one per candidate: its time, or inf where it failed to build or
    disagreed) and the fastest candidate (the first, the default, when none ran)."""
    rows = []
    for config in candidates:
        print(f"  {family} {config}", file=sys.stderr, flush=True)
        with tiles.override_tiles(**winners, **{family: config}), fk.skip_width_value_checks():
            try:
                difference = relative_difference(reference, outputs_of(work))
                if difference <= MAX_RELATIVE_DIFFERENCE:
                    ms = timer(work.run)
                else:
                    print(f"    wrong: outputs differ from the torch backend's by {difference:.3g} (relative, "
                          f"in norm; at most {MAX_RELATIVE_DIFFERENCE} accepted): not timed", file=sys.stderr)
                    ms = math.inf
            except Exception as error:  # a configuration the compiler rejects (resources)
                print(f"    failed: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
                difference, ms = math.nan, math.inf
        rows.append(dict(family=family, config=json.dumps(config), difference=difference, ms=ms))
    timed = [(row["ms"], config) for row, config in zip(rows, candidates) if math.isfinite(row["ms"])]
    best = min(timed, key=lambda item: item[0])[1] if timed else candidates[0]
    for row in rows:
        row["vs_default"] = row["ms"] / rows[0]["ms"] if rows[0]["ms"] else math.nan
        row["best"] = row["config"] == json.dumps(best)
    return rows, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(tiles.FAMILIES))
    parser.add_argument("--out", default="benchmarks/results/tune_tiles.json")
    parser.add_argument("--write-table", action="store_true", help="merge the winners into the package's tuned table")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(tiles.FAMILIES)
    if unknown:
        parser.error(f"--families: expected names among {', '.join(tiles.FAMILIES)}, got {sorted(unknown)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = device.type == "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        print("no GPU: running a tiny smoke sweep (the CPU runs the torch backend: no tiles are timed)",
              file=sys.stderr)

    rows, winners = [], {}
    for family in families:
        work = workload(family, device, dtype, smoke)
        with fk.use_backend("torch"):
            reference = outputs_of(work)
        # Decode-sized calls take microseconds: timed as CUDA graph replays.
        replay = family in ("matmul_decode", "attention_decode")
        timer = (lambda run: time_ms(graph_replay(run))) if replay else time_ms
        candidates = CANDIDATES[family][:2] if smoke else CANDIDATES[family]
        family_rows, winners[family] = sweep_family(family, work, candidates, winners, reference=reference, timer=timer)
        rows += family_rows
    print(format_table(rows, ["family", "config", "difference", "ms", "vs_default", "best"]))
    path = write_results(args.out, dict(benchmark="tune_tiles", device_type=device.type, winners=winners, rows=rows))
    print(f"wrote {path}")
    if args.write_table and device.type == "cuda":
        if any(not math.isfinite(r["ms"]) for r in rows if r["best"]):
            print("not writing the table: a family has no timed winner (compile-only pass?)", file=sys.stderr)
            return 0
        table = json.loads(tiles.TUNED_TABLE.read_text()) if tiles.TUNED_TABLE.exists() else {"devices": {}}
        name = torch.cuda.get_device_name(device)
        table["devices"][name] = {**table["devices"].get(name, {}), **winners}
        tiles.TUNED_TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote the winners for {name} to {tiles.TUNED_TABLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
