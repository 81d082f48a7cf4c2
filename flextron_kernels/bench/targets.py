"""The issues' speed targets, checked against the result files of the benchmark scripts.

Each :class:`Target` names a result file under ``benchmarks/results/``, the rows it is
about, the figure of each row that the target bounds, and the bound. :func:`evaluate`
reads the files and gives one line per target and token count (or batch): the range
measured, the bound, and whether every row, some or none meet it. ``BENCHMARKS.md``
starts with this table (:mod:`flextron_kernels.bench.report`), so that what is claimed
met is what the files hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class Target:
    """``column`` of the rows of ``file`` that match ``where`` must be ``>= bound``
    (``higher_is_better``) or ``<= bound``. ``where``: per column a value or a tuple of
    accepted values; a tuple of such dicts accepts a row any of them matches.
    ``group_by``: one line per value of these columns (token counts, batch sizes)."""

    issue: int
    what: str
    file: str
    column: str
    bound: float
    higher_is_better: bool
    where: Union[dict, tuple] = field(default_factory=dict)
    group_by: tuple = ()
    summary: bool = False  # ``column`` is a key of the file's summary, not of its rows


# The decode MLP's target: batch 1 at every width, and a batch of 16 mixing widths.
_DECODE_MLP_ROWS = ({"batch": 1}, {"batch": 16, "widths": "mixed"})

TARGETS = (
    Target(3, "elastic_linear static forward, throughput vs cuBLAS on the contiguous sub-matrix",
           "elastic_linear_gpu.json", "fwd_vs_cublas", 0.97, True, {"kind": "static"}, ("m",)),
    Target(3, "elastic_linear static backward, throughput vs cuBLAS's dense backward",
           "elastic_linear_gpu.json", "bwd_vs_cublas", 0.95, True, {"kind": "static"}, ("m",)),
    Target(3, "elastic_linear static backward, peak extra memory vs the used weight gradient",
           "elastic_linear_gpu.json", "bwd_extra_mem_vs_used_grad", 1.0, False, {"kind": "static"}),
    Target(3, "elastic_linear per-token widths, forward vs the FLOP-proportional ideal",
           "elastic_linear_gpu.json", "fwd_vs_ideal", 1.15, False, {"kind": "per-token"}, ("m",)),
    Target(3, "elastic_linear per-token widths, forward vs the torch bucketed loop",
           "elastic_linear_gpu.json", "fwd_vs_bucketed", 1.0, False, {"kind": "per-token"}, ("m",)),
    Target(3, "elastic_linear per-token widths, forward+backward vs the ideal",
           "elastic_linear_gpu.json", "fwd_bwd_vs_ideal", 1.25, False, {"kind": "per-token"}, ("m",)),
    Target(4, "elastic_mlp per-token widths, forward vs the FLOP-proportional ideal",
           "elastic_mlp_gpu.json", "fwd_vs_ideal", 1.10, False, {}, ("tokens",)),
    Target(4, "elastic_mlp, every token at full width, forward vs the dense cuBLAS MLP",
           "elastic_mlp_gpu.json", "fwd_vs_dense", 1.05, False, {"mix": "all100"}, ("tokens",)),
    Target(4, "elastic_mlp per-token widths, forward+backward vs the ideal",
           "elastic_mlp_gpu.json", "fwd_bwd_vs_ideal", 1.20, False, {}, ("tokens",)),
    Target(5, "elastic_attention prefill forward vs SDPA on the active heads",
           "elastic_attention_gpu.json", "fwd_vs_sdpa", 1.10, False, {"heads": (0.25, 0.5, 0.75, 1.0)}),
    Target(5, "elastic_attention prefill forward+backward vs SDPA on the active heads",
           "elastic_attention_gpu.json", "fwd_bwd_vs_sdpa", 1.20, False, {"heads": (0.25, 0.5, 0.75, 1.0)}),
    Target(5, "elastic_attention_decode, fraction of copy bandwidth on the active heads' KV",
           "elastic_attention_decode_gpu.json", "bw_vs_copy", 0.70, True, {}, ("batch", "kv_len")),
    Target(9, "elastic_mlp_decode (CUDA kernel), fraction of copy bandwidth on the used weights",
           "elastic_mlp_decode_gpu.json", "cuda_bw_vs_copy", 0.80, True, _DECODE_MLP_ROWS, ("batch",)),
    Target(9, "elastic_mlp_decode (Triton kernels), fraction of copy bandwidth on the used weights",
           "elastic_mlp_decode_gpu.json", "triton_bw_vs_copy", 0.80, True, _DECODE_MLP_ROWS, ("batch",)),
    Target(9, "serving, decode step per budget vs the dense model of the same reduced shape",
           "serving_gpu.json", "elastic_vs_dense", 1.05, False),
    Target(9, "serving, a batch mixing four budgets vs the mean of the four single-budget batches",
           "serving_gpu.json", "mixed_vs_mean_single_budget", 1.10, False, summary=True),
)


def _matches(row: dict, where) -> bool:
    if isinstance(where, tuple):
        return any(_matches(row, one) for one in where)
    return all(row.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in where.items())


def _line(target: Target, group, values: list, path: Path) -> dict:
    meets = [v >= target.bound if target.higher_is_better else v <= target.bound for v in values]
    return dict(
        issue=target.issue,
        what=target.what + ("" if group is None else " (" + ", ".join(f"{k} = {v}" for k, v in zip(target.group_by, group)) + ")"),
        measured=(f"{min(values):.3g}" if min(values) == max(values) else f"{min(values):.3g}-{max(values):.3g}")
        if values else "not measured",
        target=(">= " if target.higher_is_better else "<= ") + f"{target.bound:g}",
        met=("yes" if all(meets) else "partly" if any(meets) else "no") if values else "-",
        file=path.name, date=None,
    )


def evaluate(results_dir: Path) -> list[dict]:
    """One line per target and group: ``issue, what, measured, target, met, file, date``."""
    lines = []
    for target in TARGETS:
        path = Path(results_dir) / target.file
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(_line(target, None, [], path))
            continue
        date = data.get("environment", {}).get("date", "?")[:10]
        if target.summary:
            value = data.get("summary", {}).get(target.column)
            groups = {None: [float(value)] if isinstance(value, (int, float)) else []}
        else:
            groups = {}
            for row in data.get("rows", []):
                value = row.get(target.column)
                if _matches(row, target.where) and isinstance(value, (int, float)):
                    key = tuple(row.get(k) for k in target.group_by) if target.group_by else None
                    groups.setdefault(key, []).append(float(value))
            groups = groups or {None: []}
        for group in sorted(groups, key=lambda g: () if g is None else tuple((isinstance(v, str), v) for v in g)):
            lines.append(dict(_line(target, group, groups[group], path), date=date))
    return lines


def markdown_table(lines: list[dict]) -> str:
    header = ["| issue | what | measured | target | met | file, date |", "| --- | --- | --- | --- | --- | --- |"]
    return "\n".join(header + [f"| {x['issue']} | {x['what']} | {x['measured']} | {x['target']} | {x['met']} | "
                               f"`{x['file']}`, {x['date'] or '-'} |" for x in lines])
