"""The benchmark harness behind ``flextron bench``: latency per budget with same-run baselines.

For each budget it times, on the model's layer shapes:
- ``linear``: the up projection at the budget's MLP width (static), against cuBLAS on
  a contiguous copy of the same sub-matrix;
- ``mlp``: the elastic MLP at the budget's width (static), against the dense MLP of
  that reduced shape, and the FLOP-proportional ideal (dense full width x fraction);
- ``mlp_mixed``: per-token widths (uniform over the budgets' widths, mean fraction as
  reported), against the torch bucketed loop and the ideal;
- ``attention``: prefill attention at the budget's head count, against SDPA on dense
  tensors holding only those heads;
- ``layer``: a whole transformer block (attention + MLP) against its dense reduced twin;
- ``prefill`` / ``decode``: a model (``--layers`` of them, default the model's) over
  the prompt, and one decode step against a KV cache.
Each op and layer row is timed eagerly and, on a GPU, also replayed from CUDA graphs,
ours and the baseline alike (small calls are bound by Python and launch costs when run
eagerly; the graph replays give their GPU time). It also measures the ceilings (copy
bandwidth, dense matmul rate) and the latency table entries (MLP and attention per
choice, prefill and decode, per token count).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import flextron_kernels as fk
from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.nn import ElasticAttention
from flextron_kernels.bench.latency_table import LatencyTable
from flextron_kernels.bench.measure import copy_bandwidth_tbps, environment, graph_replay, matmul_tflops, time_ms
from flextron_kernels.bench.workloads import width_groups

MODELS = {
    # name: d_model, ffn, q_heads, kv_heads, head_dim, vocab, n_layers, arch
    "llama2-7b": dict(d_model=4096, ffn=11008, q_heads=32, kv_heads=32, head_dim=128, vocab_size=32000, n_layers=32, arch="llama"),
    "llama3-8b": dict(d_model=4096, ffn=14336, q_heads=32, kv_heads=8, head_dim=128, vocab_size=128256, n_layers=32, arch="llama"),
    "gpt2": dict(d_model=768, ffn=3072, q_heads=12, kv_heads=12, head_dim=64, vocab_size=50257, n_layers=12, arch="gpt2"),
    "tiny": dict(d_model=128, ffn=512, q_heads=4, kv_heads=2, head_dim=32, vocab_size=512, n_layers=2, arch="llama"),
    # A CPU-sized Llama-style model: large enough that the work, not the host, sets the time.
    "small": dict(d_model=1024, ffn=2816, q_heads=16, kv_heads=4, head_dim=64, vocab_size=8192, n_layers=4, arch="llama"),
}
OPS = ("linear", "mlp", "mlp_mixed", "attention", "layer", "prefill", "decode")


@dataclass
class BenchSettings:
    model: dict
    model_name: str
    device: torch.device
    dtype: torch.dtype
    budgets: list = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    tokens: int = 4096
    batch: int = 8
    phases: tuple = ("prefill", "decode")
    layers: Optional[int] = None
    lut_tokens: tuple = (1, 16, 512, 4096)


def _round_width(ffn: int, fraction: float) -> int:
    multiple = 128 if ffn >= 512 else 8
    return min(ffn, max(multiple, round(ffn * fraction / multiple) * multiple))


def _round_heads(q_heads: int, group: int, fraction: float) -> int:
    return min(q_heads, max(group, round(q_heads * fraction / group) * group))


class Harness:
    def __init__(self, settings: BenchSettings, progress: Callable[[str], None] | None = None):
        self.s = settings
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        m = settings.model
        self.group = m["q_heads"] // m["kv_heads"]
        self.widths = {b: _round_width(m["ffn"], b) for b in settings.budgets}
        self.heads = {b: _round_heads(m["q_heads"], self.group, b) for b in settings.budgets}
        gen = torch.Generator().manual_seed(0)
        dev, dt = settings.device, settings.dtype

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dev, dt)

        d, f = m["d_model"], m["ffn"]
        self.mlp = fk.ElasticMLP(d, f, gated=m["arch"] == "llama", activation="silu" if m["arch"] == "llama" else "gelu_tanh",
                                 bias=m["arch"] != "llama", device=dev, dtype=dt).requires_grad_(False)
        self.attn = ElasticAttention(d, m["q_heads"], m["kv_heads"], m["head_dim"], rotary=m["arch"] == "llama",
                                           device=dev, dtype=dt).requires_grad_(False)
        self.x = randn(settings.tokens, d)

    # -------------------------------------------------------------- pieces
    def _mlp_dense(self, x, width):
        mlp = self.mlp
        up = F.linear(x, mlp.w_up[:width], None if mlp.b_up is None else mlp.b_up[:width])
        if mlp.w_gate is not None:
            hidden = F.silu(F.linear(x, mlp.w_gate[:width])) * up
        else:
            hidden = F.gelu(up, approximate="tanh")
        return F.linear(hidden, mlp.w_down[:, :width], mlp.b_down)

    def _mlp_dense_copy(self, width):
        """Contiguous copies of the reduced MLP's weights: the dense model of that shape."""
        mlp = self.mlp
        copy = {k: (None if v is None else v.contiguous()) for k, v in dict(
            up=mlp.w_up[:width], gate=None if mlp.w_gate is None else mlp.w_gate[:width], down=mlp.w_down[:, :width],
            b_up=None if mlp.b_up is None else mlp.b_up[:width], b_down=mlp.b_down).items()}

        def run(x):
            up = F.linear(x, copy["up"], copy["b_up"])
            hidden = F.silu(F.linear(x, copy["gate"])) * up if copy["gate"] is not None else F.gelu(up, approximate="tanh")
            return F.linear(hidden, copy["down"], copy["b_down"])

        return run

    def _bucketed_mlp(self, x, widths):
        out = torch.empty_like(x)
        for w, idx in width_groups(widths):
            out.index_copy_(0, idx, self._mlp_dense(x.index_select(0, idx), w))
        return out

    def _attention_inputs(self, heads, tokens):
        m, s = self.s.model, self.s
        batch = max(1, min(s.batch, tokens))
        seq = max(1, tokens // batch)
        cu = torch.arange(0, batch * seq + 1, seq, device=s.device, dtype=torch.int32)
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(batch * seq, m["q_heads"], m["head_dim"], generator=gen).to(s.device, s.dtype)
        kv = torch.randn(batch * seq, m["kv_heads"], m["head_dim"], generator=gen).to(s.device, s.dtype)
        return q, kv, cu, batch, seq

    # -------------------------------------------------------------- measurements
    def run(self, on_row: Callable[[dict], None] | None = None) -> dict:
        """Every measurement: ``{environment, settings, ceilings, rows, complete}``.
        ``on_row`` receives the results so far after each row (``complete`` False), so
        that a run cut short still leaves its rows."""
        s = self.s
        self.progress(f"ceilings on {s.device} ...")
        ceilings = dict(copy_tbps=copy_bandwidth_tbps(s.device), matmul_tflops=matmul_tflops(s.device, s.dtype))
        rows = []
        full_width = self.s.model["ffn"]
        with torch.no_grad(), fk.skip_width_value_checks():
            t_dense_mlp = time_ms(lambda: self._mlp_dense(self.x, full_width))
            steps = [(op, b) for b in s.budgets for op in OPS if op != "mlp_mixed"] + [("mlp_mixed", None)]
            for i, (op, budget) in enumerate(steps):
                self.progress(f"[{i + 1}/{len(steps)}] {op}" + (f" at budget {budget}" if budget is not None else ""))
                started = time.perf_counter()
                rows.append(getattr(self, f"_bench_{op}")(budget, t_dense_mlp))
                self.progress(f"    {time.perf_counter() - started:.1f} s")
                if on_row is not None:
                    on_row(dict(environment=environment(), settings=self.settings_dict(), ceilings=ceilings,
                                rows=list(rows), complete=False))
        return dict(environment=environment(), settings=self.settings_dict(), ceilings=ceilings, rows=rows,
                    complete=True)

    def settings_dict(self) -> dict:
        s = self.s
        return dict(model=s.model_name, shapes=s.model, dtype=str(s.dtype).replace("torch.", ""), budgets=s.budgets,
                    tokens=s.tokens, batch=s.batch, phases=list(s.phases), layers=self._layers())

    def _layers(self) -> int:
        return self.s.layers or self.s.model["n_layers"]

    def _row(self, op, budget, ours, baseline, baseline_name, ideal=None, **extra):
        row = dict(op=op, budget=budget, ms=ours, baseline=baseline_name, baseline_ms=baseline,
                   vs_baseline=ours / baseline if baseline else None, ideal_ms=ideal,
                   vs_ideal=ours / ideal if ideal else None)
        row.update(extra)
        return row

    def _timed_row(self, op, budget, ours, baseline, baseline_name, *, ideal=None, graph_baseline=True, **extra):
        """A row for the calls ``ours`` and ``baseline``, timed eagerly (``ms``,
        ``baseline_ms``) and, on a GPU, replayed from CUDA graphs (``graph_ms``,
        ``baseline_graph_ms`` and their ratio ``vs_baseline_graph``): the GPU time without
        the Python and launch cost of small calls. ``graph_baseline``: False for a baseline
        that syncs with the host (it cannot be captured)."""
        row = self._row(op, budget, time_ms(ours), time_ms(baseline), baseline_name, ideal=ideal, **extra)
        row["graph_ms"], error = self._graph_ms(ours)
        row["baseline_graph_ms"] = self._graph_ms(baseline)[0] if graph_baseline else None
        if error:
            row["graph_error"] = error
        both = row["graph_ms"] and row["baseline_graph_ms"]
        row["vs_baseline_graph"] = row["graph_ms"] / row["baseline_graph_ms"] if both else None
        return row

    def _graph_ms(self, fn, **timing) -> tuple[Optional[float], Optional[str]]:
        """``fn`` replayed from a CUDA graph: ``(ms, None)``, or ``(None, why)`` when it
        cannot be captured (``(None, None)`` on a CPU). ``timing``: for :func:`time_ms`."""
        if self.s.device.type != "cuda":
            return None, None
        try:
            return time_ms(graph_replay(fn), **timing), None
        except RuntimeError as error:  # the row keeps its eager time and says why
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.progress(f"    no CUDA graph: {reason}")
            return None, reason

    def _bench_linear(self, budget, _):
        width = self.widths[budget]
        w = self.mlp.w_up
        sub = w[:width].contiguous()
        return self._timed_row("linear", budget, lambda: fk.elastic_linear(self.x, w, out_features=width),
                               lambda: F.linear(self.x, sub), "cublas_contiguous", width=width)

    def _bench_mlp(self, budget, t_dense_full):
        width = self.widths[budget]
        dense = self._mlp_dense_copy(width)
        return self._timed_row("mlp", budget, lambda: self.mlp(self.x, width=width), lambda: dense(self.x),
                               "dense_reduced", ideal=t_dense_full * width / self.s.model["ffn"], width=width)

    def _bench_mlp_mixed(self, _, t_dense_full):
        ffn = self.s.model["ffn"]
        choices = torch.tensor(sorted(set(self.widths.values())))
        index = torch.randint(0, choices.numel(), (self.x.shape[0],), generator=torch.Generator().manual_seed(2))
        widths = choices[index].to(self.s.device)
        fraction = widths.double().mean().item() / ffn
        return self._timed_row("mlp_mixed", round(fraction, 4), lambda: self.mlp(self.x, width=widths),
                               lambda: self._bucketed_mlp(self.x, widths), "torch_bucketed",
                               ideal=t_dense_full * fraction, graph_baseline=False, width=None)

    def _bench_attention(self, budget, _):
        heads = self.heads[budget]
        q, kv, cu, batch, seq = self._attention_inputs(heads, self.s.tokens)
        kv_heads = heads // self.group
        dq = q[:, :heads].reshape(batch, seq, heads, -1).transpose(1, 2).contiguous()
        dkv = kv[:, :kv_heads].reshape(batch, seq, kv_heads, -1).transpose(1, 2).contiguous()
        return self._timed_row(
            "attention", budget, lambda: fk.elastic_attention(q, kv, kv, heads=heads, cu_seqlens=cu),
            lambda: F.scaled_dot_product_attention(dq, dkv, dkv, is_causal=True, enable_gqa=self.group > 1),
            "sdpa_active_heads", heads=heads)

    def _bench_layer(self, budget, _):
        width, heads = self.widths[budget], self.heads[budget]
        _, _, cu, _, _ = self._attention_inputs(heads, self.s.tokens)
        x = self.x[: cu[-1].item()]

        def ours():
            h = x + self.attn(x, heads=heads, cu_seqlens=cu)
            return h + self.mlp(h, width=width)

        dense_mlp = self._mlp_dense_copy(width)
        a = self.attn
        dh, kvh = a.head_dim, heads // self.group
        wq, wk, wv = (p.weight[: n * dh].contiguous() for p, n in ((a.q_proj, heads), (a.k_proj, kvh), (a.v_proj, kvh)))
        wo = a.o_proj.weight[:, : heads * dh].contiguous()
        batch = cu.numel() - 1
        seq = x.shape[0] // batch

        def dense():
            q = F.linear(x, wq).view(batch, seq, heads, dh).transpose(1, 2)
            k = F.linear(x, wk).view(batch, seq, kvh, dh).transpose(1, 2)
            v = F.linear(x, wv).view(batch, seq, kvh, dh).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.group > 1)
            h = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], heads * dh), wo)
            return h + dense_mlp(h)

        return self._timed_row("layer", budget, ours, dense, "dense_reduced", width=width, heads=heads)

    def _model(self):
        if not hasattr(self, "_flextron"):
            m = self.s.model
            cfg = FlextronConfig(
                arch=m["arch"], vocab_size=m["vocab_size"], d_model=m["d_model"], n_layers=self._layers(),
                q_heads=m["q_heads"], kv_heads=m["kv_heads"], ffn=m["ffn"], head_dim=m["head_dim"],
                max_positions=max(4096, self.s.tokens + 16),
                mlp_choices=[sorted(set(self.widths.values()) | {m["ffn"]})] * self._layers(),
                head_choices=[sorted(set(self.heads.values()) | {m["q_heads"]})] * self._layers(),
            )
            with torch.device(self.s.device):  # random init where the weights go: fast on a GPU
                self._flextron = FlextronForCausalLM(cfg).to(dtype=self.s.dtype).eval()
        return self._flextron

    def _prompt(self):
        batch = max(1, min(self.s.batch, self.s.tokens))
        seq = max(1, self.s.tokens // batch)
        return torch.randint(0, self.s.model["vocab_size"], (batch, seq), device=self.s.device)

    def _bench_prefill(self, budget, _):
        if "prefill" not in self.s.phases:
            return self._row("prefill", budget, math.nan, None, "skipped")
        model, ids = self._model(), self._prompt()
        ours = time_ms(lambda: model(ids, budget=budget), rep=50)
        try:  # the dense model of the same reduced shape, as plain transformers runs it
            from flextron_kernels.models.io import dense_hf_model

            dense = dense_hf_model(model, budget)
            baseline, name = time_ms(lambda: dense(input_ids=ids, use_cache=False), rep=50), "transformers_dense_reduced"
            dense = None  # free its weights before the next budget's
        except ImportError:
            baseline, name = None, "none (transformers missing)"
        except Exception as error:  # e.g. a sub-network that a dense checkpoint cannot hold (GPT-2 with fewer heads)
            baseline, name = None, f"none ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        return self._row("prefill", budget, ours, baseline, name, layers=self._layers())

    def _bench_decode(self, budget, _):
        """One decode step of every request against a KV cache of the prompt: eagerly
        (``ms``) and, on a GPU, replayed from a CUDA graph (``graph_ms``, the step as
        :class:`~flextron_kernels.serving.ElasticServer` runs it); the baseline is the dense
        model of the same reduced shape in plain transformers (eager, its own KV cache)."""
        if "decode" not in self.s.phases:
            return self._row("decode", budget, math.nan, None, "skipped")
        model, ids = self._model(), self._prompt()
        batch, seq = ids.shape
        caches = model.new_caches(batch, seq + 1)
        model(ids, budget=budget, caches=caches)
        tokens = ids[:, -1]
        lengths = [c.seqlens.clone() for c in caches]

        def step():
            for c, n in zip(caches, lengths):
                c.seqlens.copy_(n)
            return model.decode_step(tokens, caches, budget=budget)

        ours = time_ms(step, rep=50)
        graph, graph_error = self._graph_ms(step, rep=50)
        baseline, name = self._dense_decode_ms(model, ids, budget)
        row = self._row("decode", budget, ours, baseline, name, layers=self._layers(), batch=batch, graph_ms=graph)
        if graph_error:
            row["graph_error"] = graph_error
        return row

    def _dense_decode_ms(self, model, ids, budget):
        """The baseline decode step: the prompt in the dense model's own KV cache (as long
        as ours), one more token, and the cache cropped back after each step."""
        try:
            from flextron_kernels.models.io import dense_hf_model

            dense = dense_hf_model(model, budget)
            cache = dense(input_ids=ids, use_cache=True).past_key_values
            last = ids[:, -1:]

            def step():
                with warnings.catch_warnings():  # newer transformers rename the argument; older ones know only this name
                    warnings.simplefilter("ignore", FutureWarning)
                    logits = dense(input_ids=last, past_key_values=cache, use_cache=True).logits
                cache.crop(-1)
                return logits

            return time_ms(step, rep=50), "transformers_dense_reduced"
        except ImportError:
            return None, "none (transformers missing)"
        except Exception as error:  # a baseline this transformers cannot run: the row keeps ours and says why
            return None, f"none ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"

    # -------------------------------------------------------------- latency table
    def latency_table(self) -> LatencyTable:
        """MLP and attention latency per choice, phase and token count."""
        s, m = self.s, self.s.model
        entries = []
        widths = sorted(set(self.widths.values()))
        heads_choices = sorted(set(self.heads.values()))
        with torch.no_grad(), fk.skip_width_value_checks():
            for tokens in s.lut_tokens:
                self.progress(f"latency table: {tokens} tokens")
                x = torch.randn(tokens, m["d_model"], device=s.device, dtype=s.dtype)
                for width in widths:
                    ms = time_ms(lambda: self.mlp(x, width=width), rep=30)
                    for phase in s.phases:
                        entries.append(dict(kind="mlp", choice=width, phase=phase, tokens=tokens, ms=ms))
                for heads in heads_choices:
                    if "prefill" in s.phases:
                        q, kv, cu, _, _ = self._attention_inputs(heads, tokens)
                        ms = time_ms(lambda: fk.elastic_attention(q, kv, kv, heads=heads, cu_seqlens=cu), rep=30)
                        entries.append(dict(kind="attention", choice=heads, phase="prefill", tokens=tokens, ms=ms))
                    if "decode" in s.phases:
                        cache_len = max(s.tokens // max(s.batch, 1), 1)
                        gen = torch.Generator().manual_seed(3)
                        q = torch.randn(tokens, m["q_heads"], m["head_dim"], generator=gen).to(s.device, s.dtype)
                        cache = torch.randn(tokens, m["kv_heads"], cache_len, m["head_dim"], generator=gen).to(s.device, s.dtype)
                        lens = torch.full((tokens,), cache_len, device=s.device, dtype=torch.int32)
                        ms = time_ms(lambda: fk.elastic_attention_decode(q, cache, cache, cache_seqlens=lens, heads=heads), rep=30)
                        entries.append(dict(kind="attention", choice=heads, phase="decode", tokens=tokens, ms=ms))
        return LatencyTable(entries, model=dict(name=s.model_name, **m), environment=environment())
