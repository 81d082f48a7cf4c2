"""The issues' speed targets, evaluated against result files (synthetic ones here)."""

import json
import re
from pathlib import Path

from flextron_kernels.bench import targets
from flextron_kernels.bench.report import build_report, main as report_main
from flextron_kernels.bench.targets import TARGETS, Target, evaluate, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def _write(folder: Path, name: str, **payload):
    (folder / name).write_text(json.dumps(dict(environment=dict(date="2026-11-29T03:00:00+00:00"), **payload)))


def test_lines_per_group_with_the_range_and_whether_rows_meet_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "TARGETS", (
        Target(3, "fwd", "lin.json", "ratio", 0.97, True, {"kind": "static"}, ("m",)),
        Target(4, "time", "lin.json", "time", 1.1, False, ({"kind": "a"}, {"kind": "b", "m": 2})),
        Target(9, "mixed", "serve.json", "mixed", 1.1, False, summary=True),
        Target(5, "absent", "missing.json", "x", 1.0, True),
    ))
    rows = [dict(kind="static", m=16, ratio=0.5), dict(kind="static", m=16, ratio=0.99),
            dict(kind="static", m=4096, ratio=1.0), dict(kind="static", m=4096, ratio=1.02),
            dict(kind="per-token", m=4096, ratio=0.1),  # not a static row: not counted
            dict(kind="a", m=1, time=1.0), dict(kind="b", m=2, time=1.3), dict(kind="b", m=3, time=9.0)]
    _write(tmp_path, "lin.json", rows=rows)
    _write(tmp_path, "serve.json", summary=dict(mixed=1.27), rows=[dict(x=1)])
    lines = evaluate(tmp_path)
    got = [(x["issue"], x["what"], x["measured"], x["target"], x["met"]) for x in lines]
    assert got == [
        (3, "fwd (m = 16)", "0.5-0.99", ">= 0.97", "partly"),
        (3, "fwd (m = 4096)", "1-1.02", ">= 0.97", "yes"),
        (4, "time", "1-1.3", "<= 1.1", "partly"),
        (9, "mixed", "1.27", "<= 1.1", "no"),
        (5, "absent", "not measured", ">= 1", "-"),
    ]
    assert lines[0]["date"] == "2026-11-29" and lines[-1]["date"] is None
    table = markdown_table(lines)
    assert table.splitlines()[2] == "| 3 | fwd (m = 16) | 0.5-0.99 | >= 0.97 | partly | `lin.json`, 2026-11-29 |"
    report = build_report(tmp_path)
    assert "## Targets" in report and table in report


def test_report_prints_the_targets_table(tmp_path, capsys):
    _write(tmp_path, "serving_gpu.json", summary=dict(mixed_vs_mean_single_budget=1.5),
           rows=[dict(elastic_vs_dense=1.01), dict(elastic_vs_dense=1.2)])
    assert report_main([str(tmp_path), "--targets"]) == 0
    out = capsys.readouterr().out
    assert "| 9 | serving, decode step per budget vs the dense model of the same reduced shape | 1.01-1.2 | <= 1.05 | partly |" in out
    assert "| 9 | serving, a batch mixing four budgets vs the mean of the four single-budget batches | 1.5 | <= 1.1 | no |" in out
    assert "| 3 | elastic_linear static forward" in out and "not measured" in out


def test_every_target_reads_a_file_the_gpu_check_writes_and_figures_its_rows_hold():
    """The targets follow the benchmark scripts: a renamed file, figure or column fails here
    (the figures are checked in the committed H200 results, as the scripts wrote them)."""
    gpu_check = (ROOT / "scripts" / "gpu_check.sh").read_text()
    for target in TARGETS:
        assert re.search(rf"\$results/{re.escape(target.file)}\b", gpu_check), target.file
        data = json.loads((ROOT / "benchmarks" / "results" / target.file).read_text())
        if target.summary:
            assert target.column in data["summary"], target.column
            continue
        where = target.where if isinstance(target.where, tuple) else (target.where,)
        columns = {target.column, *target.group_by, *(k for one in where for k in one)}
        assert columns <= set().union(*(row.keys() for row in data["rows"])), (target.file, columns)
        assert any(targets._matches(row, target.where) for row in data["rows"]), (target.file, target.where)


def test_the_committed_results_evaluate():
    """The H200 results in the repository give a line for every target (whatever they meet)."""
    lines = evaluate(ROOT / "benchmarks" / "results")
    assert {x["what"].split(" (")[0] for x in lines} >= {t.what.split(" (")[0] for t in TARGETS}
    assert all(x["met"] in ("yes", "partly", "no", "-") for x in lines)
