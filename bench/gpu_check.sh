#!/usr/bin/env bash
# Everything the GPU machine is used for, in one call (see shared/GPU.md): build offline
# (wiping build/ first), report the build and the card, run the GPU tests, then the CPU
# tests there too. Results go to $OUT (or ./gpu-out).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16

rm -rf build
{ time python3 -m pip install --no-build-isolation --no-deps --no-index -q . ; } > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
pagedlm info | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest-gpu.log" 2>&1
gpu_rc=$?  # 5: no GPU test collected
tail -3 "$OUT/pytest-gpu.log"
python3 -m pytest -q -p no:cacheprovider > "$OUT/pytest-cpu.log" 2>&1
cpu_rc=$?
tail -3 "$OUT/pytest-cpu.log"
[ $gpu_rc -eq 0 ] || [ $gpu_rc -eq 5 ] && [ $cpu_rc -eq 0 ]
