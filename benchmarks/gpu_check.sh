#!/usr/bin/env bash
# The GPU check of the fused backends: builds the CUDA extension, runs tests/test_gpu.py,
# compute-sanitizer and the race against apex FusedLAMB, and prints a summary last, 40 lines at
# most (stage, PASS/FAIL, key numbers, seconds). A skip is never a pass.
#
#   bash benchmarks/gpu_check.sh [--dry-run] part1|part2|all|STAGE ...
#
#   versions     the GPU, driver, nvcc, torch, Triton
#   build        LARGEDET_CUDA_BUILD=1 pip install -v; fails on any ptxas spill, or when ptxas reported no
#                kernel; then every backend of dispatch.AUTO_ORDER["cuda"] must be available
#   test         tests/test_gpu.py but its emulator tests; any skip fails it, except a two-GPU test on one GPU
#   memcheck     compute-sanitizer, PYTORCH_NO_CUDA_MEMORY_CACHING=1, over benchmarks/sanitize_step.py:
#   racecheck    an aligned bucket (the 128-bit path), then a misaligned one (the scalar path), each
#                stepped by the cuda and triton backends
#   race         benchmarks.step_time: Faster R-CNN and BERT-large, fp32 and bf16; pmdlamb[cuda] and
#                pmdlamb[triton] against apex FusedLAMB (it takes no bf16) and torch's fused AdamW;
#                apex missing fails it
#   convergence  the convergence study's gpu config; in no part, a command of its own (it needs
#                pycocotools; its time is estimated, not measured)
#   part1 = versions build test memcheck; part2 = versions build racecheck race; all = both
#
# A GPU machine with 15 minutes in all, one or two of them to start it: two commands from the
# repository root, each planned at 6 minutes or less and stopped at a 350 s deadline that leaves
# the summary its time. part1: versions 5 s, build 80 (nvcc and the backend listing), test 120,
# memcheck 2 x 60. part2: versions 5, build 80, racecheck 2 x 60, race 90, while apex's amp_C
# (all FusedLAMB needs, sm_90 only) builds beside them at low priority from NVIDIA/apex's source
# in .apex/ (ignored by git: carry it); the race waits for that build. Send part2 at once after
# part1 (the machine stays warm 30 s); a fresh machine for it needs a deadline 100 s shorter.
#
#   LARGEDET_GPU_CHECK_DEADLINE_S=350 bash benchmarks/gpu_check.sh part1
#
#   (build apex's amp_C in the background, its pid in LARGEDET_GPU_CHECK_AWAIT, its log in
#   $OUT/apex-build.log) LARGEDET_GPU_CHECK_DEADLINE_S=350 bash benchmarks/gpu_check.sh part2
#
# What comes back from $OUT, the folder whose files are kept (8 files at most; the files check
# fails when more would have to): part1: versions.log build.log test.log test-junit.xml
# memcheck.log summary.txt; part2: apex-build.log versions.log build.log racecheck.log race.log,
# the race's <device>-<date>.json and .png, summary.txt. Without $OUT they go to
# benchmarks/results/gpu-check-<time>/.
#
# PYTHON: the interpreter (python3). LARGEDET_GPU_CHECK_DRY_RUN=1 or --dry-run: the rehearsal on a
# machine without a GPU; every stage's commands run on CPU, and those that need a GPU print
# "SKIP (dry run: needs a GPU): <what>" instead. LARGEDET_GPU_CHECK_DEADLINE_S: the seconds the
# whole check may take; a command is stopped sooner, and what is left does not run (a failure).
# LARGEDET_GPU_CHECK_AWAIT: a process building a contender beside the check, awaited before the race.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY_RUN=${LARGEDET_GPU_CHECK_DRY_RUN:-0}
DEADLINE_S=${LARGEDET_GPU_CHECK_DEADLINE_S:-}
AWAIT_PID=${LARGEDET_GPU_CHECK_AWAIT:-}
RESERVE_S=15  # kept from the deadline for the checks and the summary
RACE=(--sets faster_rcnn_r50_fpn bert_large --dtypes float32 bfloat16 --warmup 3 --steps 20 --rounds 2
      --contenders "pmdlamb[cuda]" "pmdlamb[triton]" "apex FusedLAMB" "torch fused AdamW")

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

stages=()
add() { local s; for s in "$@"; do [[ " ${stages[*]-} " == *" $s "* ]] || stages+=("$s"); done; }
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    part1) add versions build test memcheck ;;
    part2) add versions build racecheck race ;;
    all) add versions build test memcheck racecheck race ;;
    versions|build|test|memcheck|racecheck|race|convergence) add "$arg" ;;
    *) echo "gpu_check.sh: unknown stage '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || { usage >&2; exit 2; }

if [ -n "${OUT:-}" ]; then
  RESULTS=$OUT KEPT=(--kept)
else
  RESULTS=benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ) KEPT=()
fi
mkdir -p "$RESULTS"
DRY=()
[ "$DRY_RUN" = 1 ] && DRY=(--dry-run)
ROWS=$(mktemp)
trap 'rm -f "$ROWS"' EXIT

dry_run() { [ "$DRY_RUN" = 1 ]; }

skip() { echo "SKIP (dry run: needs a GPU): $*"; }

# limit CAP: seconds the next command may take: CAP, or what the deadline leaves.
limit() {
  local cap=$1 left
  if [ -n "$DEADLINE_S" ]; then
    left=$((DEADLINE_S - SECONDS - RESERVE_S))
    [ "$left" -lt "$cap" ] && cap=$left
  fi
  echo "$cap"
}

# run LOG CAP CMD...: CMD, its output appended to LOG, stopped after CAP seconds or at the deadline
# (status 124, as timeout(1) gives).
run() {
  local log=$1 t
  t=$(limit "$2")
  shift 2
  echo "\$ $*" >>"$log"
  if [ "$t" -le 0 ]; then
    echo "not run: the deadline has passed" | tee -a "$log"
    return 124
  fi
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
}

# check LOG NAME ARGS...: the verdict of python -m benchmarks.gpu_check ARGS; its findings go to LOG (and
# the loud ones, "!!!", to the screen), its rows to the summary and the screen. A check that gives no row is
# itself a failure.
check() {
  local log=$1 name=$2 out
  shift 2
  out=$("$PY" -m benchmarks.gpu_check "${DRY[@]}" "$@" 2>&1)
  printf '%s\n' "$out" | grep -v $'^ROW\t' | tee -a "$log" | grep '^!!!'
  if ! printf '%s\n' "$out" | grep $'^ROW\t' | cut -f2- | tee -a "$ROWS" | awk -F'\t' '{print $1 ": " $2 " " $4}'; then
    printf '%s\tFAIL\t\tthe check itself failed (see %s)\n' "$name" "$(basename "$log")" | tee -a "$ROWS"
  fi
}

stage_versions() {
  local log=$RESULTS/versions.log
  check "$log" versions --since "$(date +%s)" versions
}

stage_build() {
  local log=$RESULTS/build.log start
  start=$(date +%s)
  # -v, so that nvcc's -Xptxas=-v report (registers, spills) reaches the log.
  run "$log" 300 env LARGEDET_CUDA_BUILD=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
  check "$log" build --since "$start" build "$log" --status $?
  check "$log" backends --since "$(date +%s)" backends
}

stage_test() {
  local log=$RESULTS/test.log xml=$RESULTS/test-junit.xml start
  start=$(date +%s)
  # The emulator tests run the CUDA kernels on CPU: CI's, not the GPU's. An unknown marker deselects nothing.
  run "$log" 300 "$PY" -m pytest -q -rs -p no:cacheprovider -m "not emulator" --junitxml="$xml" tests/test_gpu.py
  check "$log" test --since "$start" tests "$xml" "$log" --status $?
}

# stage_sanitize TOOL: compute-sanitizer TOOL over each bucket, one run and one row each.
stage_sanitize() {
  local tool=$1 log=$RESULTS/$1.log bucket start status part
  for bucket in aligned misaligned; do
    start=$(date +%s)
    part=$(mktemp)
    if dry_run; then
      skip "compute-sanitizer --tool $tool, the cuda backend; triton steps the $bucket bucket on CPU" | tee -a "$part"
      run "$part" 120 env TRITON_INTERPRET=1 "$PY" -m benchmarks.sanitize_step --bucket "$bucket" --device cpu \
        --backends triton
    else
      # Without the caching allocator every tensor is an allocation of its own: memcheck sees accesses past its end.
      run "$part" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" -m benchmarks.sanitize_step --bucket "$bucket"
    fi
    status=$?
    { echo "== $tool, $bucket bucket"; cat "$part"; } >>"$log"
    check "$log" "$tool $bucket" --since "$start" sanitizer "$tool" "$bucket" "$part" --status $status
    rm -f "$part"
  done
}

# A contender built beside the check (apex's amp_C) must be done before the race: wait for it,
# at most 3 minutes or until the deadline, then race with what there is.
await_contender() {
  local log=$1 t start=$SECONDS
  [ -n "$AWAIT_PID" ] || return 0
  t=$(limit 180)
  while kill -0 "$AWAIT_PID" 2>/dev/null && [ $((SECONDS - start)) -lt "$t" ]; do sleep 1; done
  if kill -0 "$AWAIT_PID" 2>/dev/null; then
    echo "process $AWAIT_PID still runs after $((SECONDS - start)) s: racing without it" | tee -a "$log"
  else
    echo "waited $((SECONDS - start)) s for process $AWAIT_PID" >>"$log"
  fi
}

stage_race() {
  local log=$RESULTS/race.log start device=(--device cuda)
  start=$(date +%s)
  await_contender "$log"
  if dry_run; then
    skip "the race at full size on a GPU; on CPU the first 6 tensors of each set" | tee -a "$log"
    device=(--device cpu --limit 6)
  fi
  run "$log" 300 "$PY" -m benchmarks.step_time "${RACE[@]}" "${device[@]}" --out "$RESULTS"
  check "$log" race --since "$start" race "$RESULTS" --status $?
}

stage_convergence() {
  local log=$RESULTS/convergence.log start config=(--config gpu --device cuda --jobs 4)
  start=$(date +%s)
  if dry_run; then
    skip "the gpu config on cuda; on CPU the smoke config" | tee -a "$log"
    config=(--config smoke --device cpu)
  fi
  run "$log" 3600 "$PY" -m benchmarks.convergence "${config[@]}" --out "$RESULTS"
  check "$log" convergence --since "$start" ran convergence "$log" --status $?
}

title="gpu check ${*} at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
dry_run && title+=", dry run on $(uname -n)"
for stage in "${stages[@]}"; do
  echo "== $stage"
  case "$stage" in
    memcheck|racecheck) stage_sanitize "$stage" ;;
    *) "stage_$stage" ;;
  esac
done
echo
"$PY" -m benchmarks.gpu_check "${DRY[@]}" finish "$ROWS" "$RESULTS" --title "$title" --seconds "$SECONDS" "${KEPT[@]}"
