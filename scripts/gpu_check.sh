#!/usr/bin/env bash
# Build, test and benchmark on one GPU machine (H100/H200) whose Python already has the
# dependencies (torch, triton, cmake, ninja, pybind11, pytest) and no network.
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]   (default benchmarks/results)
#   ONLY="tests bench_mlp ..."  run only the named steps (build always runs); OP_TESTS="..."
#   narrows the op tests to the given files; the steps:
#   tests (the GPU tests), op_tests (the CPU suite's op tests, compiled), tune (the tile
#   sweep, which rewrites the package's tuned table for this GPU: only when named), then
#   the benchmarks bench_routing bench_linear bench_mlp
#   bench_attention bench_attention_decode bench_mlp_decode bench_host bench_serving flextron_bench
#   bench_kernels (each op's kernels and their GPU time), profile_ncu (the same cases under
#   Nsight Compute, where it can read the counters; minutes: only when named), then report.
#   Default: everything but tune and profile_ncu.
# Each step has a time limit. On an H200 the build takes about 35 s, the side-by-side step
# (GPU tests, op tests, a compile-only pass over every benchmark to fill the Triton
# cache) about 2 minutes (180 s at most), and the timed benchmarks, one at a time, about
# 4 to 5 minutes: about 8 minutes by default (the limits add up to about 15). The tile
# sweep (ten families) adds about 3 minutes with its compile passes: run it in a call of
# its own (ONLY="tests op_tests tune"), the benchmarks in another. Within a shorter device
# budget, run subsets with ONLY.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
export FLEXTRON_CUDA_ARCHS=${FLEXTRON_CUDA_ARCHS:-90}
PY=$(command -v python3 || command -v python)
# The CPU suite's op tests that run compiled on the GPU (OP_TESTS narrows them).
OP_TESTS=${OP_TESTS:-"tests/test_routing_metadata.py tests/test_elastic_linear.py tests/test_elastic_mlp.py tests/test_elastic_attention.py"}
status=0
step() { echo; echo "== $* ($(date +%T))"; }
want() { if [[ -z "${ONLY:-}" ]]; then [[ $1 != tune && $1 != profile_ncu ]]; else [[ " $ONLY " == *" $1 "* ]]; fi; }
# run LIMIT LOG CMD...: run CMD with a time limit, its output in LOG; show the tail.
run() {
  local limit=$1 log=$2; shift 2
  timeout "$limit" "$@" >"$log" 2>&1 || { echo "!! failed or timed out: $*"; status=1; }
  tail -n 20 "$log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true

step "build and install (CUDA archs $FLEXTRON_CUDA_ARCHS)"
if ! timeout 120 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$results/gpu_build.log" 2>&1; then
  # An older setuptools may reject the metadata: build the module with CMake alone and
  # import the package from the checkout.
  tail -20 "$results/gpu_build.log"; echo "!! pip install failed: building with CMake instead"; status=1
  timeout 120 bash -c "cmake -S . -B build/gpu -G Ninja -DFLEXTRON_CUDA_ARCHS=$FLEXTRON_CUDA_ARCHS \
      -DPython_EXECUTABLE=$PY && cmake --build build/gpu && cp build/gpu/_C*.so flextron_kernels/" \
    >>"$results/gpu_build.log" 2>&1 || { tail -40 "$results/gpu_build.log"; echo "BUILD FAILED"; exit 1; }
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'PY' | tee "$results/gpu_build_info.json"
import json, flextron_kernels as fk
print(json.dumps(fk.build_info(), indent=1))
PY

# name LIMIT SCRIPT ARGS...: the benchmarks, in the order they run.
benchmarks=(
  "bench_routing 40 benchmarks/bench_routing_metadata.py --out $results/routing_metadata_gpu.json"
  "bench_linear 35 benchmarks/bench_elastic_linear.py --quick --out $results/elastic_linear_gpu.json"
  "bench_mlp 45 benchmarks/bench_elastic_mlp.py --quick --out $results/elastic_mlp_gpu.json"
  "bench_attention 25 benchmarks/bench_elastic_attention.py --quick --out $results/elastic_attention_gpu.json"
  "bench_attention_decode 45 benchmarks/bench_elastic_attention_decode.py --quick --out $results/elastic_attention_decode_gpu.json"
  "bench_mlp_decode 20 benchmarks/bench_elastic_mlp_decode.py --quick --out $results/elastic_mlp_decode_gpu.json"
  "bench_host 20 benchmarks/bench_host_overhead.py --out $results/host_overhead_gpu.json"
  "bench_serving 50 benchmarks/bench_serving.py --quick --out $results/serving_gpu.json"
  "flextron_bench 240 -m flextron_kernels.bench --quick --out $results/flextron_bench_gpu --lut $results/flextron_bench_gpu/latency_table.json"
  "bench_kernels 120 benchmarks/bench_kernel_breakdown.py --out $results/kernel_breakdown_gpu.json"
  "profile_ncu 480 benchmarks/bench_kernel_breakdown.py --ncu --out $results/kernel_breakdown_ncu_gpu.json"
)
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }

# compile_benchmarks: every benchmark once in compile-only mode, all side by side, to fill
# the Triton cache before the timed runs (its results go to a scratch folder).
warm_pids=()
compile_benchmarks() {
  local warm_dir entry name script args
  warm_dir=$(mktemp -d)
  for entry in "${benchmarks[@]}"; do
    read -r name _ script args <<<"$entry"
    want "$name" || continue
    args=${args//$results/$warm_dir}
    # shellcheck disable=SC2086
    FLEXTRON_BENCH_COMPILE_ONLY=1 timeout 140 "$PY" $script $args >"$warm_dir/$name.log" 2>&1 &
    warm_pids+=($!)
  done
  WARM_DIR=$warm_dir
}
# wait_benchmarks: wait for the compile-only passes; show the logs of those that failed.
WARM_DIR=$(mktemp -d)
wait_benchmarks() {
  local pid log
  for pid in ${warm_pids[@]+"${warm_pids[@]}"}; do wait "$pid" || echo "!! a compile-only pass failed (see below)"; done
  warm_pids=()
  for log in "$WARM_DIR"/*.log; do
    [[ -f $log ]] && grep -q -E "Error|Traceback" "$log" && { echo "-- $log"; tail -n 6 "$log"; }
  done
  return 0
}
families="matmul matmul_small matmul_gated matmul_decode weight_grad attention_fwd attention_bwd_dq attention_bwd_dkdv attention_decode"

if want tests || want op_tests || want tune; then
  step "side by side, those asked for: the GPU tests (bf16 against fp64, the CUDA kernels, CUDA graphs), the op tests compiled (fp32/fp16), a compile-only pass over the tile sweep (with tune) or else over the benchmarks"
  pids=()
  if want tests; then
    # shellcheck disable=SC2046
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider $(xdist 8) -m gpu tests/ >"$results/gpu_tests.log" 2>&1 &
    pids+=($!)
  fi
  if want op_tests; then
    # shellcheck disable=SC2046
    # shellcheck disable=SC2086
    timeout 140 "$PY" -m pytest -q -p no:cacheprovider $(xdist 4) -m "not gpu" $OP_TESTS \
      >"$results/gpu_op_tests.log" 2>&1 &
    pids+=($!)
  fi
  if want tune; then
    WARM_DIR=$(mktemp -d)
    for family in $families; do
      FLEXTRON_BENCH_COMPILE_ONLY=1 timeout 140 "$PY" benchmarks/tune_tiles.py --families "$family" \
        --out "$WARM_DIR/tune_$family.json" >"$WARM_DIR/tune_compile_$family.log" 2>&1 &
      pids+=($!)
    done
  else
    compile_benchmarks
  fi
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || { echo "!! a step failed or timed out (see its log)"; status=1; }; done
  want tests && tail -n 25 "$results/gpu_tests.log"
  want op_tests && tail -n 8 "$results/gpu_op_tests.log"
  wait_benchmarks
fi

if want tune; then
  step "tile sweep (timed), the winners written to the tuned table"
  run 120 "$results/tune_tiles.log" "$PY" benchmarks/tune_tiles.py --out "$results/tune_tiles_gpu.json" --write-table
  step "compile-only pass over the benchmarks, side by side, with the tuned tiles"
  compile_benchmarks
  wait_benchmarks
fi

step "benchmarks (quick), one at a time"
for entry in "${benchmarks[@]}"; do
  read -r name limit script args <<<"$entry"
  want "$name" || continue
  # shellcheck disable=SC2086
  run "$limit" "$results/$name.log" "$PY" $script $args
done

if want report; then
  "$PY" -m flextron_kernels.bench.report "$results" --out BENCHMARKS.md || { echo "!! the report failed"; status=1; }
fi

step "summary"
"$PY" -m flextron_kernels.bench.report "$results" --summary
"$PY" -m flextron_kernels.bench.report "$results" --targets
for log in gpu_tests gpu_op_tests; do [[ -f "$results/$log.log" ]] && echo "$log: $(tail -n 1 "$results/$log.log")"; done

step "done (status $status)"
exit $status
