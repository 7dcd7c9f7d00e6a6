#!/usr/bin/env bash
# Builds the pagedlm wheel and installs it with its test dependencies into .venv, builds and
# runs the C++ unit tests, then runs pytest (which also installs the wheel into a fresh venv). The CUDA kernels are compiled whenever nvcc is present (nothing runs
# them without a GPU; `pytest -m gpu` does on a GPU machine). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

# C++ test dependencies (GoogleTest, Google Benchmark) from the system's packages.
if ! dpkg -s libgtest-dev libbenchmark-dev >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev libbenchmark-dev
  else
    echo "tools/test.sh: install libgtest-dev and libbenchmark-dev (GoogleTest, Google Benchmark)" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "torch==${PAGEDLM_TEST_TORCH:-2.13.0}" scikit-build-core nanobind
# One wheel, built once: the test environment installs it, and tests/test_wheel.py installs it
# again into a fresh venv with nothing but its declared dependencies.
rm -rf dist
$PY -m pip wheel -q --no-build-isolation --no-deps -w dist .
WHEEL=$(ls "$PWD"/dist/pagedlm-*.whl)
$PY -m pip install -q "$WHEEL[test]"
$PY -m pip install -q --force-reinstall --no-deps "$WHEEL"
export PAGEDLM_WHEEL=$WHEEL PAGEDLM_WHEEL_TORCH="torch==${PAGEDLM_TEST_TORCH:-2.13.0}"

if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  $PY -c "import pagedlm._C as C; assert C.cuda_compiled, 'nvcc is here but the CUDA kernels were not built'"
fi
.venv/bin/pagedlm info

cmake -S . -B build/cpp -G Ninja -DPAGEDLM_BUILD_TESTS=ON -DPAGEDLM_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cpp
ctest --test-dir build/cpp --output-on-failure

$PY -m pytest -q "$@"

# A fixed sample of planted bugs, each of which some test must catch (docs/testing.md).
$PY tools/mutate.py --quick --no-baseline
