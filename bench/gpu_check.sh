#!/usr/bin/env bash
# Everything the GPU machine is used for, in one call (see shared/GPU.md): build offline
# (wiping build/ first), report the build and the card, run the GPU tests and
# compute-sanitizer, then the benchmarks with the anchors side by side. Results go to
# $OUT (or ./gpu-out). FlashInfer's sdist is expected in .anchors/ (carried).
#   bash bench/gpu_check.sh [--no-tests] [--no-bench] [--bench "decode prefill verify engine decoding pay_switch"]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
run_tests=1 run_bench=1 benches="decode prefill verify engine decoding pay_switch"
while [ $# -gt 0 ]; do
  case $1 in --no-tests) run_tests=0 ;; --no-bench) run_bench=0 ;; --bench) benches=$2; shift ;; esac
  shift
done

rm -rf build
{ time python3 -m pip install --no-build-isolation --no-deps --no-index -q . ; } > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
pagedlm info | tee -a "$OUT/gpu.txt"
status=0

if [ $run_tests = 1 ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1; rc=$?
  tail -5 "$OUT/pytest-gpu.log"
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
  for tool in memcheck racecheck; do
    { compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py \
      && compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/bench_verify.py --smoke; } \
      > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    echo "compute-sanitizer $tool: $(grep -E 'SUMMARY|case done' "$OUT/sanitizer-$tool.log" | tr '\n' ' ')"
  done
  # Op fuzzing with bad values inside CUDA tensors, with and without PAGEDLM_DEBUG=1.
  for tool in memcheck racecheck initcheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_fuzz.py --cases 40 \
      > "$OUT/sanitizer-fuzz-$tool.log" 2>&1 || status=1
    echo "compute-sanitizer $tool (fuzz): $(grep -E 'SUMMARY|PAGEDLM_DEBUG|fuzz done' "$OUT/sanitizer-fuzz-$tool.log" | tr '\n' ' ')"
  done
  python3 -m pytest -q -p no:cacheprovider --runslow -m gpu tests/test_fuzz_ops.py > "$OUT/pytest-fuzz-gpu.log" 2>&1 \
    || status=1
  tail -3 "$OUT/pytest-fuzz-gpu.log"
fi

if [ $run_bench = 1 ]; then
  if ls .anchors/flashinfer_python-*.tar.gz >/dev/null 2>&1; then
    tar xzf .anchors/flashinfer_python-*.tar.gz -C /tmp
    # FlashInfer's sampling kernels need three substitutions to build under CUDA 13 (shared/GPU.md).
    sed -i -e 's/cub::Max()/cuda::maximum<>()/g' -e 's/cub::Min()/cuda::minimum<>()/g' \
      -e 's/max(q_vec\[j\] - p_vec\[j\], 0)/fmaxf(q_vec[j] - p_vec[j], 0.f)/g' \
      /tmp/flashinfer_python-*/include/flashinfer/sampling.cuh
    python3 -m pip install -q --no-build-isolation --no-deps --no-index /tmp/flashinfer_python-* > "$OUT/flashinfer-install.log" 2>&1
    printf '#!/bin/sh\nexec /usr/local/cuda/bin/nvcc -static-global-template-stub=false "$@"\n' > /tmp/nvcc-wrapper
    chmod +x /tmp/nvcc-wrapper
    export PYTORCH_NVCC=/tmp/nvcc-wrapper
  fi
  export PAGEDLM_COMMIT=$(cat .git-commit 2>/dev/null || echo unknown)
  declare -A script=([decode]=bench_paged_decode [prefill]=bench_paged_prefill [verify]=bench_verify
                     [engine]=bench_engine [decoding]=bench_decoding
                     [pay_switch]=bench_pay_switch)
  for name in $benches; do
    python3 "bench/${script[$name]}.py" --out "$OUT/$name.md" > "$OUT/bench-$name.log" 2>&1 || status=1
    tail -12 "$OUT/bench-$name.log"
  done
fi
exit $status
