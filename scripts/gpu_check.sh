#!/usr/bin/env bash
# Build, test and benchmark on one GPU machine (H100/H200) whose Python already has the
# dependencies (torch, triton, cmake, ninja, pybind11, pytest) and no network.
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]   (default benchmarks/results)
# Each step has a time limit; together they add up to 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
export FLEXTRON_CUDA_ARCHS=${FLEXTRON_CUDA_ARCHS:-90}
status=0
step() { echo; echo "== $* ($(date +%T))"; }
# run LIMIT LOG CMD...: run CMD with a time limit, its output in LOG; show the tail.
run() {
  local limit=$1 log=$2; shift 2
  timeout "$limit" "$@" >"$log" 2>&1 || { echo "!! failed or timed out: $*"; status=1; }
  tail -n 20 "$log"
}

step "build and install (CUDA archs $FLEXTRON_CUDA_ARCHS)"
timeout 90 python -m pip install --no-build-isolation --no-deps -e . >"$results/gpu_build.log" 2>&1 \
  || { tail -40 "$results/gpu_build.log"; echo "BUILD FAILED"; exit 1; }
python - <<'PY' | tee "$results/gpu_build_info.json"
import json, flextron_kernels as fk
print(json.dumps(fk.build_info(), indent=1))
PY

step "GPU tests (bf16 against fp64, the CUDA kernels, CUDA graphs; Triton compiles here, cached for later steps)"
run 140 "$results/gpu_tests.log" python -m pytest -q -p no:cacheprovider -m gpu tests/
step "the CPU test suite's op tests, compiled on the GPU (fp32/fp16)"
run 35 "$results/gpu_op_tests.log" python -m pytest -q -x -p no:cacheprovider -m "not gpu" \
  tests/test_routing_metadata.py tests/test_elastic_linear.py tests/test_elastic_mlp.py tests/test_elastic_attention.py

step "benchmarks (quick)"
run 10 "$results/bench_routing_metadata.log" python benchmarks/bench_routing_metadata.py --out "$results/routing_metadata_gpu.json"
run 30 "$results/bench_elastic_linear.log" python benchmarks/bench_elastic_linear.py --quick --out "$results/elastic_linear_gpu.json"
run 30 "$results/bench_elastic_mlp.log" python benchmarks/bench_elastic_mlp.py --quick --out "$results/elastic_mlp_gpu.json"
run 25 "$results/bench_elastic_attention.log" python benchmarks/bench_elastic_attention.py --quick --out "$results/elastic_attention_gpu.json"
run 15 "$results/bench_elastic_attention_decode.log" python benchmarks/bench_elastic_attention_decode.py --quick --out "$results/elastic_attention_decode_gpu.json"
run 20 "$results/bench_elastic_mlp_decode.log" python benchmarks/bench_elastic_mlp_decode.py --quick --out "$results/elastic_mlp_decode_gpu.json"
run 55 "$results/bench_serving.log" python benchmarks/bench_serving.py --quick --out "$results/serving_gpu.json"
run 30 "$results/flextron_bench.log" python -m flextron_kernels.bench --quick --out "$results/flextron_bench_gpu" \
  --lut "$results/flextron_bench_gpu/latency_table.json"

python -m flextron_kernels.bench.report "$results" --out BENCHMARKS.md || { echo "!! the report failed"; status=1; }

step "summary"
python -m flextron_kernels.bench.report "$results" --summary
for log in gpu_tests gpu_op_tests; do echo "$log: $(tail -n 1 "$results/$log.log")"; done

step "done (status $status)"
exit $status
