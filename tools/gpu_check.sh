#!/usr/bin/env bash
# The GPU check of the CUDA backend, as one script for a machine with an NVIDIA GPU and a
# python3 that has torch (CUDA), numpy, pybind11, hypothesis and pytest:
#   1. machine info (nvidia-smi, nvcc, torch);
#   2. in-place build with the CUDA backend forced ON for the local GPU's architecture;
#   3. the CUDA tests (python_tests/test_cuda.py) and the defense tests (MARS(device=...));
#   4. benchmarks/bench_cuda.py (CBE of N ResNet-18 clients vs the read floor and torch);
#   5. optionally (GPU_CHECK_NCU=1) per-kernel durations of one small CBE call under ncu.
# Logs go to $OUT (default ./gpu-out). Exit status: the first failing step's.
# Usage: OUT=dir [ARCH=90] [CLIENTS=100] [TORCH_CLIENTS=10] [TORCH_REPEAT=1] [SKIP_TORCH=1] [GPU_CHECK_TESTS=0]
#        [GPU_CHECK_NCU=1] tools/gpu_check.sh
# (The PyTorch baseline is slow: one run of matrix_norm over 100 ResNet-18 clients did not finish in
# 160 s on an H200, so by default it scores the first TORCH_CLIENTS clients and mars_native is timed
# on the same ones for the ratio. The ncu step profiles every kernel and needs a small run.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
ARCH=${ARCH:-90}
CLIENTS=${CLIENTS:-100}
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT CMD...: runs CMD with a timeout, tees its log, remembers failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  nvcc --version | tail -1
  $PY -c "import sys, numpy, torch; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee "$OUT/info.log"

step build 180 env PYTHON="$PY" JOBS="$(nproc)" tools/dev_build.sh build/gpu \
  -DMARS_NATIVE_WERROR=OFF -DMARS_NATIVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" || exit $status
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import mars_native as mn; print(mn.build_info())" 2>&1 | tee -a "$OUT/info.log"

[ "${GPU_CHECK_TESTS:-1}" = 1 ] && step tests 150 $PY -m pytest -q -x -p no:cacheprovider -rs python_tests/test_cuda.py \
  python_tests/test_defense.py
step bench "${BENCH_LIMIT:-200}" $PY benchmarks/bench_cuda.py --clients "$CLIENTS" --repeat 10 \
  --torch-repeat "${TORCH_REPEAT:-1}" --torch-clients "${TORCH_CLIENTS:-10}" --json "$OUT/bench_cuda.json" \
  --profile "$OUT/profile.txt" ${SKIP_TORCH:+--skip-torch}
if [ "${GPU_CHECK_NCU:-0}" = 1 ]; then
  step ncu 80 ncu --clock-control none --print-summary per-kernel \
    $PY benchmarks/bench_cuda.py --clients 10 --repeat 1 --skip-torch
fi
exit $status
