"""Every benchmark script runs end to end in its CPU smoke configuration (nothing timed is
asserted) and writes a result file that the report can read."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py")) + [BENCHMARKS / "tune_tiles.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_script_smoke(script, tmp_path):
    spec = importlib.util.spec_from_file_location(f"_smoke_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / f"{script.stem}.json"
    assert module.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] and data["environment"]["device"]

    from flextron_kernels.bench.report import summary_lines

    assert summary_lines(tmp_path) and len(summary_lines(tmp_path)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sweep is real and writes the table")
def test_tile_sweep_never_writes_the_table_on_a_cpu(tmp_path, monkeypatch):
    from flextron_kernels.ops import tiles

    monkeypatch.setattr(tiles, "TUNED_TABLE", tmp_path / "tuned_tiles.json")
    spec = importlib.util.spec_from_file_location("_smoke_tune_tiles", BENCHMARKS / "tune_tiles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--families", "matmul", "--write-table", "--out", str(tmp_path / "t.json")]) == 0
    assert not (tmp_path / "tuned_tiles.json").exists()
    with pytest.raises(SystemExit):
        module.main(["--families", "matmull"])


def _tune_tiles_module():
    spec = importlib.util.spec_from_file_location("_tune_tiles", BENCHMARKS / "tune_tiles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tile_sweep_never_times_or_picks_a_candidate_whose_outputs_are_wrong():
    from flextron_kernels.ops import tiles

    module = _tune_tiles_module()
    weight = torch.ones(3, requires_grad=True)
    x = torch.arange(3.0)

    def run():
        # The tiles in effect decide the result: BLOCK_N=999 stands for a broken tile, which
        # also returns quickest.
        broken = tiles.matmul_config(x, 4096)["BLOCK_N"] == 999
        y = weight * x * (3.0 if broken else 1.0)
        y.sum().backward()
        return [y]

    work = module.Workload(run, (weight,))
    reference = module.outputs_of(work)
    assert [t.tolist() for t in reference] == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    timed = []

    def timer(fn):
        timed.append(tiles.matmul_config(x, 4096)["BLOCK_N"])
        return 1.0 if timed[-1] == 999 else 2.0 + len(timed)

    candidates = [dict(BLOCK_N=16), dict(BLOCK_N=999), dict(BLOCK_N=32)]
    rows, best = module.sweep_family("matmul", work, candidates, {}, reference=reference, timer=timer)
    assert timed == [16, 32]
    assert best == dict(BLOCK_N=16)
    assert [row["ms"] for row in rows] == [3.0, float("inf"), 4.0]
    assert rows[0]["difference"] == 0.0 and rows[1]["difference"] > module.MAX_RELATIVE_DIFFERENCE
    assert [row["best"] for row in rows] == [True, False, False]


def test_relative_difference_catches_shapes_counts_and_non_finite_values():
    module = _tune_tiles_module()
    a = [torch.ones(4)]
    assert module.relative_difference(a, [torch.ones(4)]) == 0.0
    assert module.relative_difference(a, [torch.ones(4) * 1.01]) == pytest.approx(0.01)
    assert module.relative_difference(a, [torch.ones(5)]) == float("inf")
    assert module.relative_difference(a, [torch.ones(4), torch.ones(4)]) == float("inf")
    assert module.relative_difference(a, [torch.tensor([1.0, 1.0, float("nan"), 1.0])]) == float("inf")
    assert module.relative_difference([torch.zeros(2)], [torch.zeros(2)]) == 0.0
