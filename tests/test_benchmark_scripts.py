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
