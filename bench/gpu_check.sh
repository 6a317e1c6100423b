#!/usr/bin/env bash
# One device call that builds, tests, sanitizes, benchmarks and profiles the CUDA path of
# s2m_ext, in at most 6 minutes including the build (sm_90 only, all cores). Results go to the
# folder given as the first argument, else $GPU_CHECK_OUT, else $OUT, else ./gpu_check_out:
#
#   env.txt  build.log  pytest.log  sanitizer.log  cuda_targets.log  cuda_targets.json
#   ncu_em_forward.txt  ncu_em_forward.ncu-rep  summary.md
#
# Usage, as the whole device command from the repository root:   bash bench/gpu_check.sh [DIR]
# Stages, each under a time cap (a stage that would start too close to the deadline is skipped
# and reported as such): build (FORCE_CUDA=1, sm_90), pytest (the CUDA tests), sanitize
# (compute-sanitizer memcheck, racecheck, synccheck and initcheck on python -m bench.gpu_check_ops,
# which runs every op in every EM placement), targets (python -m bench.cuda_targets) and ncu (one
# Nsight Compute report of em_forward at B=16384 N=256 D=256 K=8: speed of light, occupancy,
# warp stall reasons). GPU_CHECK_BUDGET_S (default 350) is the whole run's budget;
# GPU_CHECK_STAGES (default "build pytest sanitize targets ncu"; "suite" adds the benchmark
# suite) picks stages; GPU_CHECK_PYTEST (default "tests/test_cuda.py") narrows the test run.
# The summary table is printed last. Copy cuda_targets.json into bench/results/ afterwards: it
# holds device, torch, date and the numbers.
set -u
OUT="${1:-${GPU_CHECK_OUT:-${OUT:-$PWD/gpu_check_out}}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the script runs from the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-350} ))
STAGES=" ${GPU_CHECK_STAGES:-build pytest sanitize targets ncu} "
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.md"
ROWS=()

left() { echo $(( DEADLINE - $(date +%s) )); }
wants() { [[ "$STAGES" == *" $1 "* ]]; }

# stage NAME CAP_S LOG CMD...: runs CMD with a time cap, appends to LOG, records a row.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local avail=$(( $(left) - 15 ))
  if (( avail < 30 )); then
    echo "== $name: skipped, ${avail}s left before the deadline" >>"$log"
    ROWS+=("| $name | SKIPPED (time budget) | - | $(basename "$log") |")
    return 99
  fi
  (( cap > avail )) && cap=$avail
  echo "== $name (cap ${cap}s): $*" >>"$log"
  local t0=$(date +%s) rc=0
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >>"$log" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT after ${cap}s" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  echo "== $name: $status in ${dt}s" >>"$log"
  ROWS+=("| $name | $status | ${dt}s | $(basename "$log") |")
  return $rc
}

# --------------------------------------------------------------------------- environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi 2>&1 | head -20
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1
  echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
  SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" 2>&1
} >"$OUT/env.txt" 2>&1
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"

# --------------------------------------------------------------------------- build
# CUDA_HOME must hold include/cuda_runtime_api.h (a wrapper nvcc on PATH can mislead torch).
for dir in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 /opt/cuda; do
  if [[ -n "$dir" && -f "$dir/include/cuda_runtime_api.h" ]]; then export CUDA_HOME="$dir"; break; fi
done
built=0
if wants build; then
  # sm_90 only here: CI proves the sm_80 + sm_90 build (csrc/cuda/check_nvcc.sh).
  stage build 170 "$OUT/build.log" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace && built=1
else
  built=1
fi
if (( built )); then
  if ! "$PY" -c "import s2m_ext; i = s2m_ext.build_info(); print(i); assert i['cuda_available'], 'no CUDA in this build'" \
    >>"$OUT/build.log" 2>&1; then
    built=0
    ROWS+=("| import s2m_ext with CUDA | FAIL: later stages skipped | - | build.log |")
  fi
fi

# --------------------------------------------------------------------------- tests
if (( built )) && wants pytest; then
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  # shellcheck disable=SC2086  # GPU_CHECK_PYTEST may hold several arguments
  stage pytest 50 "$OUT/pytest.log" "$PY" -m pytest ${GPU_CHECK_PYTEST:-tests/test_cuda.py} -q -rs -p no:cacheprovider \
    "${xdist[@]}" --durations=15
fi

# --------------------------------------------------------------------------- sanitizers
if (( built )) && wants sanitize; then
  if [[ -z "$SANITIZER" ]]; then
    echo "compute-sanitizer not found" >>"$OUT/sanitizer.log"
    ROWS+=("| sanitize | SKIPPED (no compute-sanitizer) | - | sanitizer.log |")
  else
    for tool in memcheck racecheck synccheck initcheck; do
      extra=()
      [[ $tool == racecheck ]] && extra=(--racecheck-report hazard)
      stage "sanitize-$tool" 30 "$OUT/sanitizer.log" "$SANITIZER" --tool "$tool" --error-exitcode 3 \
        --print-limit 30 "${extra[@]}" "$PY" -m bench.gpu_check_ops
    done
  fi
fi

# --------------------------------------------------------------------------- benchmarks
if (( built )) && wants targets; then
  stage targets 80 "$OUT/cuda_targets.log" "$PY" -m bench.cuda_targets --out "$OUT/cuda_targets.json"
fi
if (( built )) && wants ncu; then
  NCU="$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/ncu 2>/dev/null || true)"
  if [[ -z "$NCU" ]]; then
    echo "ncu not found" >"$OUT/ncu_em_forward.txt"
    ROWS+=("| ncu | SKIPPED (no ncu) | - | ncu_em_forward.txt |")
  else
    stage ncu 40 "$OUT/ncu_em_forward.txt" "$NCU" --kernel-name regex:em_forward_kernel \
      --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --export "$OUT/ncu_em_forward" \
      --force-overwrite --print-summary none "$PY" -m bench.gpu_check_ops --profile-em-forward &&
      "$NCU" --import "$OUT/ncu_em_forward.ncu-rep" --page details >>"$OUT/ncu_em_forward.txt" 2>&1
  fi
fi
if (( built )) && wants suite; then
  if [[ -f bench/run.py || -f bench/__main__.py ]]; then
    stage suite 240 "$OUT/bench_suite.log" "$PY" -m bench --device cuda --quick --no-sweeps --no-plots --out "$OUT"
  else
    echo "no benchmark suite (bench/run.py) in this checkout" >"$OUT/bench_suite.log"
    ROWS+=("| suite | SKIPPED (no bench/run.py) | - | bench_suite.log |")
  fi
fi

# --------------------------------------------------------------------------- summary
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s"
  echo
  grep -E "^python|^nvcc|^compute-sanitizer" "$OUT/env.txt"
  echo
  echo "| stage | result | time | log |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [[ -f "$OUT/pytest.log" ]]; then
    echo "pytest: $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
  fi
  if [[ -f "$OUT/sanitizer.log" ]]; then
    echo "sanitizer: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" | tr '\n' ' ')"
  fi
  if [[ -f "$OUT/ncu_em_forward.txt" ]]; then
    echo "ncu em_forward: $(grep -E 'Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput' "$OUT/ncu_em_forward.txt" | tr -s ' ' | tr '\n' ';')"
  fi
  if [[ -f "$OUT/cuda_targets.log" ]]; then
    echo
    sed -n '/^CUDA targets on/,$p' "$OUT/cuda_targets.log"
  fi
} >"$SUMMARY"
cat "$SUMMARY"
