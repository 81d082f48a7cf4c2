"""The benchmark harness end to end on the CPU at a tiny shape (nothing timed is asserted)."""

import csv
import json

import pytest
import torch

from flextron_kernels.bench.latency_table import LatencyTable
from flextron_kernels.cli import main
from flextron_kernels.models import FlextronConfig, FlextronForCausalLM

pytest.importorskip("transformers", reason="the prefill baseline is a transformers model")

ROW_KEYS = {"op", "budget", "ms", "baseline", "baseline_ms", "vs_baseline", "ideal_ms", "vs_ideal"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "--model", "tiny", "--budgets", "0.5,1", "--tokens", "32", "--batch", "2",
                 "--out", str(out), "--lut", str(out / "lut.json")])
    assert code == 0
    return out


def test_outputs_and_schema(bench_run):
    results = json.loads((bench_run / "results.json").read_text())
    assert set(results) == {"environment", "settings", "ceilings", "rows", "complete"} and results["complete"]
    for key in ("device", "cpu", "torch", "triton", "date"):
        assert key in results["environment"]
    assert "threads" in results["environment"]["cpu"]
    assert results["settings"]["budgets"] == [0.5, 1.0]
    assert results["ceilings"]["copy_tbps"] > 0 and results["ceilings"]["matmul_tflops"] > 0
    ops = [r["op"] for r in results["rows"]]
    for op in ("linear", "mlp", "mlp_mixed", "attention", "layer", "prefill", "decode"):
        assert op in ops
    for row in results["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["ms"] > 0
        if row["op"] in ("prefill", "decode"):  # the dense model of the same reduced shape, same run
            assert row["baseline"] == "transformers_dense_reduced" and row["baseline_ms"] > 0
        if row["op"] == "decode":
            assert "graph_ms" in row  # the CUDA-graph replay of the step (None on a CPU)
        if row["op"] in ("linear", "mlp", "mlp_mixed", "attention", "layer"):
            # Ours and the baseline replayed from CUDA graphs (None on a CPU).
            assert {"graph_ms", "baseline_graph_ms", "vs_baseline_graph"} <= set(row)
            if not torch.cuda.is_available():
                assert row["graph_ms"] is None and row["baseline_graph_ms"] is None
    with open(bench_run / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["rows"])
    assert (bench_run / "plot.png").stat().st_size > 1000


def test_graph_timing_reports_a_capture_that_fails(monkeypatch):
    from types import SimpleNamespace

    from flextron_kernels.bench import harness

    messages = []
    on_gpu = SimpleNamespace(s=SimpleNamespace(device=torch.device("cuda", 0)), progress=messages.append)

    def cannot_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(harness, "graph_replay", cannot_capture)
    assert harness.Harness._graph_ms(on_gpu, lambda: None) == (None, "operation not permitted when stream is capturing")
    assert messages == ["    no CUDA graph: operation not permitted when stream is capturing"]
    monkeypatch.setattr(harness, "graph_replay", lambda fn: fn)
    monkeypatch.setattr(harness, "time_ms", lambda fn: 1.5)
    assert harness.Harness._graph_ms(on_gpu, lambda: None) == (1.5, None)


def test_a_run_cut_short_keeps_its_rows(tmp_path, monkeypatch):
    from flextron_kernels.bench.harness import Harness

    def fail(self, budget, _):
        raise RuntimeError("cut short")

    monkeypatch.setattr(Harness, "_bench_layer", fail)
    with pytest.raises(RuntimeError, match="cut short"):
        main(["bench", "--quick", "--model", "tiny", "--budgets", "0.5", "--tokens", "32", "--batch", "2",
              "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["complete"] and [r["op"] for r in results["rows"]] == ["linear", "mlp", "attention"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_latency_table_loads_into_the_model(bench_run):
    table = LatencyTable.load(bench_run / "lut.json")
    widths = table.choices("mlp", "prefill")
    heads = table.choices("attention", "decode")
    assert widths == [256, 512] and heads == [2, 4]
    assert table.latency("mlp", 256, "prefill", 16) > 0
    # Interpolation between token counts, proportional extrapolation beyond.
    low, high = table.latency("mlp", 512, "prefill", 1), table.latency("mlp", 512, "prefill", 16)
    assert min(low, high) <= table.latency("mlp", 512, "prefill", 8) <= max(low, high)
    config = FlextronConfig(arch="llama", vocab_size=64, d_model=128, n_layers=2, q_heads=4, kv_heads=2, ffn=512,
                            mlp_choices=[[256, 512]] * 2, head_choices=[[2, 4]] * 2)
    model = FlextronForCausalLM(config)
    model.load_latency_table(bench_run / "lut.json")
    half, full = model.cost(0.5, phase="decode", tokens=16), model.cost(1.0, phase="decode", tokens=16)
    assert 0 < half["latency_ms"] and 0 < full["latency_ms"]
    with pytest.raises(KeyError, match="no entry for kind='mlp', choice=100"):
        table.latency("mlp", 100, "prefill", 1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-99b"], "--model: expected one of llama2-7b, llama3-8b, gpt2, tiny"),
        (["--budgets", "0.5,1.5"], "--budgets: expected values in \\(0, 1\\]"),
        (["--budgets", "half"], "--budgets: expected comma-separated numbers"),
        (["--tokens", "0"], "--tokens: expected a positive integer"),
    ],
)
def test_bad_options(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(tmp_path)] + argv)
    text = str(exc.value.code) + capsys.readouterr().err
    assert __import__("re").search(message, text), text


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out: cannot write to"):
        main(["bench", "--model", "tiny", "--out", str(blocker / "sub")])


def test_latency_table_format_is_checked(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"format": "other", "entries": []}))
    with pytest.raises(ValueError, match="expected a latency table of format"):
        LatencyTable.load(tmp_path / "t.json")
    with pytest.raises(ValueError, match="unknown kind/phase"):
        LatencyTable([{"kind": "conv", "choice": 1, "phase": "prefill", "tokens": 1, "ms": 1.0}])


def test_benchmarks_report_is_generated_from_result_files(bench_run, tmp_path):
    from flextron_kernels.bench.report import build_report

    report = build_report(bench_run.parent)
    assert "# Benchmarks" in report and "flextron bench (tiny)" in report and "mlp_mixed" in report
    assert "No results yet" in build_report(tmp_path)


def test_report_shows_per_op_summaries_and_their_plots(tmp_path):
    from flextron_kernels.bench.report import build_report

    payload = dict(benchmark="serving", summary=dict(backend="cuda", ratio=1.25), rows=[dict(budget=0.5, step_ms=1.5)])
    (tmp_path / "serving.json").write_text(json.dumps(payload))
    (tmp_path / "serving.png").write_bytes(b"\x89PNG")
    report = build_report(tmp_path, tmp_path)
    assert "## serving" in report and "backend = cuda, ratio = 1.25" in report
    assert "](serving.png)" in report and "step_ms" in report
    (tmp_path / "docs").mkdir()
    assert "](../serving.png)" in build_report(tmp_path, tmp_path / "docs")  # linked from where the report goes
    from flextron_kernels.bench.report import summary_lines

    assert summary_lines(tmp_path) == ["serving.json: backend = cuda, ratio = 1.25"]


def test_report_shows_a_per_op_file_with_its_own_columns_even_one_named_op(tmp_path):
    from flextron_kernels.bench.report import build_report

    payload = dict(benchmark="host_overhead", rows=[dict(op="F.linear", host_us=13.6, graph_us=34.4)])
    (tmp_path / "host_overhead.json").write_text(json.dumps(payload))
    table = build_report(tmp_path).split("## host_overhead")[1]
    assert "host_us" in table and "13.6" in table and "34.4" in table
    assert "baseline_ms" not in table  # not the flextron bench columns
