#!/usr/bin/env bash
# Developer build: compiles the extension with CMake and drops _core*.so into mars_native/,
# so that `PYTHONPATH=$PWD python -c "import mars_native"` works without reinstalling.
# Usage: tools/dev_build.sh [build-dir] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=${1:-build/dev}; shift || true
PYBIND11_DIR=$($PY -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMARS_NATIVE_WERROR=ON \
  -DMARS_NATIVE_INPLACE=ON -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(command -v $PY)" "$@" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
