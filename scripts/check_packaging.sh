#!/usr/bin/env bash
# Packaging check: FLEXTRON_SKIP_EXT=1 gives a pure-Python wheel that installs into a
# fresh virtual environment and works without the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
FLEXTRON_SKIP_EXT=1 python3 -m pip wheel -q --no-deps . -w "$tmp/dist"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q torch==2.13.0 "numpy<2.4"
"$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/flextron_kernels-*.whl
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import torch, flextron_kernels as fk
info = fk.build_info()
assert not info["extension"], info
w = torch.tensor([3, 0, 5])
assert fk.routing_metadata(w, torch.tensor([2, 5]), 2).sorted_token_idx.tolist() == [1, 0, 2]
y = fk.elastic_linear(torch.randn(3, 4), torch.randn(5, 4), out_features=w)
assert y.shape == (3, 5) and (y[1] == 0).all()
print("pure-Python wheel OK:", info["backends"])
PY
