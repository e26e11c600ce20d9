#!/usr/bin/env bash
# The GPU check of the fused backends, for a machine with a CUDA GPU and nvcc:
#   bash benchmarks/gpu_check.sh [stage ...] 2>&1 | tee benchmarks/results/<device>-<date>-gpu-check.txt
# Stages (default: all but convergence, in this order; each sized for a 10-minute command):
#   versions  the device, driver, toolkit, torch and Triton
#   build     LARGEDET_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e .
#   test      every backend, dtype and option against the float64 reference on the GPU
#             (tests/test_gpu.py: also GradScaler skips, no host sync, CUDA-graph replay)
#   sanitize  compute-sanitizer memcheck and racecheck over a few steps of each fused backend
#   bench     the main job (python -m benchmarks.step_time): every set, fp32 and bf16
#   convergence  the convergence study's gpu config, 4 runs at a time (not in the default
#             list: a separate call, whose time is estimated, not yet measured)
# JSON and PNG files go to $OUT when it is set (the device tool brings back only that
# folder), else to benchmarks/results/.
# Everything printed is the raw record.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(versions build test sanitize bench)

for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null))"
  case "$stage" in
    versions)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      nvcc --version | tail -n 2
      $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| torch CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" ;;
    build)
      LARGEDET_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . >/tmp/largedet-build.log 2>&1 \
        || { tail -n 40 /tmp/largedet-build.log; status=1; }
      grep -E "bytes spill" /tmp/largedet-build.log | sort | uniq -c
      $PY -c "import torch; from largedet_kernels import dispatch; \
[print(b, dispatch.unavailable_reason(b, torch.device('cuda')) or 'available') for b in dispatch.AUTO_ORDER]" ;;
    test)
      $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        echo "-- compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 1 $PY -m benchmarks.sanitize_step || status=1
      done ;;
    bench)
      $PY -m benchmarks.step_time --out "$RESULTS" || status=1 ;;
    convergence)
      $PY -m benchmarks.convergence --config gpu --device cuda --jobs 4 --out "$RESULTS" || status=1 ;;
    *)
      echo "unknown stage $stage"; status=2 ;;
  esac
done
echo "== exit status $status"
exit $status
