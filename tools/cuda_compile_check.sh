#!/usr/bin/env bash
# Compile-only check of the CUDA backend, for CI machines without a GPU: configures a separate
# build directory with MARS_NATIVE_CUDA=ON and -Werror, builds every CUDA object (target
# mars_cuda_compile_check), then, unless --objects-only, links the extension with CUDA and imports
# it (build_info must say cuda_compiled=True; no device is needed or used).
#
# Usage: tools/cuda_compile_check.sh [--objects-only] [build-dir]   (default build/cuda-check)
# Env:   PYTHON (interpreter with pybind11), JOBS (parallel jobs, default 2),
#        CUDAARCHS (override the GPU architectures, e.g. "90" for a faster check).
# Exit:  0 when the check passed, or when no nvcc is installed (prints "skipped");
#        non-zero when anything fails to compile, link or import.
set -euo pipefail
cd "$(dirname "$0")/.."
OBJECTS_ONLY=0
if [[ "${1:-}" == "--objects-only" ]]; then
  OBJECTS_ONLY=1
  shift
fi
BUILD=${1:-build/cuda-check}
PY=${PYTHON:-python}
JOBS=${JOBS:-2}

NVCC=${CUDACXX:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "cuda_compile_check: no nvcc on PATH (and CUDACXX unset): skipped"
  exit 0
fi
echo "cuda_compile_check: $("$NVCC" --version | tail -n 1)"

PYBIND11_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMARS_NATIVE_WERROR=ON \
  -DMARS_NATIVE_CUDA=ON -DMARS_NATIVE_INPLACE=OFF -DCMAKE_CUDA_COMPILER="$NVCC" \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null

start=$(date +%s)
cmake --build "$BUILD" --target mars_cuda_compile_check -j "$JOBS"
echo "cuda_compile_check: CUDA objects built in $(( $(date +%s) - start )) s"
if [[ $OBJECTS_ONLY == 1 ]]; then
  exit 0
fi

cmake --build "$BUILD" --target _core -j "$JOBS"
CORE=$(ls "$BUILD"/_core*.so | head -n 1)
"$PY" - "$CORE" <<'EOF'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("_core", sys.argv[1])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
info = core.build_info()
assert info["cuda_compiled"] is True, info
assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0, info
cuda = core.cuda.info()
print(f"cuda_compile_check: _core imports; cuda_compiled=True, devices={info['cuda_devices']}, "
      f"architectures={cuda['architectures']}, reason={cuda['reason']!r}")
EOF
echo "cuda_compile_check: OK"
