#!/usr/bin/env bash
# The GPU check of the fused backends, for a machine with a CUDA GPU and nvcc:
#   bash benchmarks/gpu_check.sh 2>&1 | tee benchmarks/results/<device>-<date>-gpu-check.txt
# builds the CUDA extension, checks every backend, dtype and option against the float64
# reference on the GPU (tests/test_gpu.py: also GradScaler skips, no host sync, CUDA-graph
# capture and replay), runs compute-sanitizer's memcheck and racecheck over a few steps,
# and times the step (benchmarks/step_time.py). Everything printed is the raw record.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0

echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
nvcc --version | tail -n 2
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| torch CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

echo "== build: LARGEDET_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e ."
LARGEDET_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . >/tmp/largedet-build.log 2>&1 || status=1
grep -E "spill|error" /tmp/largedet-build.log | sort | uniq -c
$PY -c "from largedet_kernels import dispatch; import torch; \
[print(b, dispatch.unavailable_reason(b, torch.device('cuda')) or 'available') for b in dispatch.AUTO_ORDER]"

echo "== correctness against the float64 reference: pytest tests/test_gpu.py"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=1

for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 $PY -m benchmarks.sanitize_step || status=1
done

echo "== step time: python -m benchmarks.step_time"
$PY -m benchmarks.step_time || status=1
$PY -m benchmarks.step_time --dtype bfloat16 || status=1
echo "== exit status $status"
exit $status
