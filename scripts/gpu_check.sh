#!/usr/bin/env bash
# Build, test and benchmark on one GPU machine (H100/H200) whose Python already has the
# dependencies (torch, triton, cmake, ninja, pybind11, pytest) and no network.
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]   (default benchmarks/results; under 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
export FLEXTRON_CUDA_ARCHS=${FLEXTRON_CUDA_ARCHS:-90}
status=0
step() { echo; echo "== $* ($(date +%T))"; }

step "build and install (CUDA archs $FLEXTRON_CUDA_ARCHS)"
python -m pip install --no-build-isolation --no-deps -e . >"$results/gpu_build.log" 2>&1 \
  || { tail -40 "$results/gpu_build.log"; echo "BUILD FAILED"; exit 1; }
python - <<'PY' | tee "$results/gpu_build_info.json"
import json, flextron_kernels as fk
print(json.dumps(fk.build_info(), indent=1))
PY

step "GPU tests, and the op tests on the GPU"
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_routing_metadata.py tests/test_extension_cuda.py \
  tests/test_elastic_linear.py tests/test_elastic_mlp.py 2>&1 | tee "$results/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "benchmarks (quick)"
timeout 60 python benchmarks/bench_routing_metadata.py --out "$results/routing_metadata_gpu.json" || status=1
timeout 150 python benchmarks/bench_elastic_linear.py --quick --out "$results/elastic_linear_gpu.json" || status=1
timeout 150 python benchmarks/bench_elastic_mlp.py --quick --out "$results/elastic_mlp_gpu.json" || status=1

step "done (status $status)"
exit $status
