#!/usr/bin/env bash
# Everything a GPU machine is used for, in one run: build offline (wiping build/ first),
# report the build and the card, run the GPU tests and compute-sanitizer, then the
# benchmarks with the anchors side by side. Results go to $OUT (or ./gpu-out).
#
#   bash bench/gpu_check.sh [--archs LIST] [--no-build] [--no-tests] [--tests "FILES"] [--no-sanitizer] [--no-bench]
#                           [--tools "memcheck racecheck initcheck synccheck"]
#                           [--bench "decode prefill verify engine decoding pay_switch"]
#                           [--stage-timeout SECONDS]
#
# --archs sets CMAKE_CUDA_ARCHITECTURES for the build (default: the GPUs of this machine);
# `--archs 80-virtual` builds compute_80 PTX alone, which the driver JIT-compiles: the path
# every non-Hopper GPU takes, run on this one. FlashInfer, the kernels' anchor, is installed
# from .anchors/flashinfer when that folder is present (see bench/README.md). BENCH_ARGS_<name>
# passes options to one benchmark, e.g. BENCH_ARGS_prefill="--flashinfer-backends fa2".
# --bench names the benchmarks to run: those of the default list above, and cascade
# (bench_cascade.py), serving (bench_serving.py) and models (bench_models.py), which run only
# when named.
# --tests limits the GPU tests to the files named (default: every test marked gpu).
# --no-build keeps the pagedlm already installed on this machine (a second call on a warm one).
# --stage-timeout bounds each test, sanitizer and benchmark command, so that a run inside a
# time limit still reaches its later stages. The deeper op fuzzing on the GPU is
# `pytest --runslow -m gpu tests/test_fuzz_ops.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
export CUDA_CACHE_MAXSIZE=4294967296  # a PTX-only build is JIT-compiled once, then read from the cache
run_build=1 run_tests=1 run_sanitizer=1 run_bench=1 benches="decode prefill verify engine decoding pay_switch"
tools="memcheck racecheck initcheck synccheck" stage_timeout=0 test_files=""
while [ $# -gt 0 ]; do
  case $1 in
    --archs) export CMAKE_CUDA_ARCHITECTURES=$2; shift ;;
    --no-build) run_build=0 ;;
    --no-tests) run_tests=0 ;;
    --tests) test_files=$2; shift ;;
    --no-sanitizer) run_sanitizer=0 ;;
    --no-bench) run_bench=0 ;;
    --bench) benches=$2; shift ;;
    --tools) tools=$2; shift ;;
    --stage-timeout) stage_timeout=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ $run_build = 1 ]; then
  rm -rf build
  { time python3 -m pip install --no-build-isolation --no-deps --no-index -q . ; } > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
pagedlm info | tee -a "$OUT/gpu.txt"
status=0

if [ $run_bench = 1 ] && [ -f .anchors/flashinfer/install.sh ]; then
  # Installed now, on the path of the benchmarks alone (the tests never import it).
  bash .anchors/flashinfer/install.sh > "$OUT/flashinfer-install.log" 2>&1 \
    && anchor_path="/tmp/fisite${PYTHONPATH:+:$PYTHONPATH}"
  tail -2 "$OUT/flashinfer-install.log"
  # FlashInfer JIT-compiles each prefill variant on first use (minutes in all): done on the CPUs
  # while the tests and the sanitizer run, so the benchmark times kernels, not compilers. At the
  # lowest priority and on half the cores: with all of them, the tests' CPU references slowed
  # past their stage time.
  if [ -n "${anchor_path:-}" ] && [[ " $benches " == *" prefill "* ]]; then
    # shellcheck disable=SC2086  # the options are meant to split
    MAX_JOBS=$(( $(nproc) / 2 )) PYTHONPATH=$anchor_path nice -n 19 python3 bench/bench_paged_prefill.py \
      --warm-anchors ${BENCH_ARGS_prefill:-} > "$OUT/flashinfer-warm.log" 2>&1 &
    warming=$!
  fi
fi

if [ $run_tests = 1 ]; then
  # shellcheck disable=SC2086  # the file names are meant to split
  timeout "$stage_timeout" python3 -m pytest -v -rfE --tb=short -m gpu -p no:cacheprovider $test_files \
    > "$OUT/pytest-gpu.log" 2>&1; rc=$?
  tail -5 "$OUT/pytest-gpu.log"
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
fi

if [ $run_sanitizer = 1 ]; then
  sanitize="timeout $stage_timeout compute-sanitizer --error-exitcode 9 --tool"
  for tool in $tools; do
    { $sanitize $tool python3 bench/sanitize_case.py && $sanitize $tool python3 bench/bench_verify.py --smoke; } \
      > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    echo "compute-sanitizer $tool: $(grep -E "SUMMARY|case done" "$OUT/sanitizer-$tool.log" | tr '\n' ' ')"
  done
  # Op fuzzing with bad values inside CUDA tensors, with and without PAGEDLM_DEBUG=1.
  for tool in $tools; do
    $sanitize $tool python3 bench/sanitize_fuzz.py --cases 40 \
      > "$OUT/sanitizer-fuzz-$tool.log" 2>&1 || status=1
    echo "compute-sanitizer $tool (fuzz): $(grep -E 'SUMMARY|PAGEDLM_DEBUG|fuzz done' "$OUT/sanitizer-fuzz-$tool.log" | tr '\n' ' ')"
  done
fi

if [ $run_bench = 1 ]; then
  [ -n "${anchor_path:-}" ] && export PYTHONPATH=$anchor_path
  if [ -n "${warming:-}" ]; then
    wait "$warming"
    tail -8 "$OUT/flashinfer-warm.log"
  fi
  if [ -d .anchors/serve ]; then  # the serve extra, for bench_serving.py, from wheels brought along
    python3 -m pip install -q --no-index --find-links .anchors/serve fastapi uvicorn prometheus-client jinja2 \
      > "$OUT/serve-install.log" 2>&1 || tail -3 "$OUT/serve-install.log"
  fi
  declare -A script=([decode]=bench_paged_decode [prefill]=bench_paged_prefill [verify]=bench_verify
                     [engine]=bench_engine [decoding]=bench_decoding [pay_switch]=bench_pay_switch
                     [cascade]=bench_cascade [serving]=bench_serving [models]=bench_models)
  for name in $benches; do
    extra="BENCH_ARGS_$name"
    # shellcheck disable=SC2086  # the options are meant to split
    timeout "$stage_timeout" python3 "bench/${script[$name]}.py" --out "$OUT/$name.md" ${!extra:-} \
      > "$OUT/bench-$name.log" 2>&1 || status=1
    tail -12 "$OUT/bench-$name.log"
  done
fi
exit $status
