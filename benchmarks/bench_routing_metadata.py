"""Routing metadata benchmark: the extension's kernel against the torch implementation, same run.

Usage: ``python benchmarks/bench_routing_metadata.py [--out FILE.json]``.
"""

from __future__ import annotations

import argparse

import torch

import flextron_kernels as fk
from flextron_kernels.backends import backend_usable
from flextron_kernels.bench.measure import format_table, time_ms, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/routing_metadata.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    token_counts = (1, 4096, 65536, 1 << 20) if device.type == "cuda" else (1, 4096, 65536)
    backends = [b for b in ("cuda", "torch") if backend_usable(b, device.type)]
    rows = []
    for num_tokens in token_counts:
        for num_groups in (4, 32):
            boundaries = torch.arange(1, num_groups + 1, device=device, dtype=torch.int32) * 128
            widths = boundaries[torch.randint(0, num_groups, (num_tokens,), device=device)]
            row = dict(tokens=num_tokens, groups=num_groups)
            for backend in backends:
                with fk.use_backend(backend), fk.skip_width_value_checks():
                    row[f"{backend}_us"] = 1000 * time_ms(lambda: fk.routing_metadata(widths, boundaries, 128))
            if "cuda_us" in row:
                row["torch_over_cuda"] = row["torch_us"] / row["cuda_us"]
            rows.append(row)
    print(format_table(rows, ["tokens", "groups"] + [f"{b}_us" for b in backends] + (["torch_over_cuda"] if "cuda" in backends else [])))
    path = write_results(args.out, dict(benchmark="routing_metadata", device_type=device.type, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
