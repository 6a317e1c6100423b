#!/usr/bin/env bash
# One device call that builds, tests, sanitizes and benchmarks the CUDA path of s2m_ext, and
# writes its logs and a summary table under $OUT (8 files, the device tool's limit):
#
#   env.txt  build.log  pytest.log  sanitizer.log  cuda_targets.log  cuda_targets.json
#   bench_suite.log  summary.md
#
# Usage, as the whole device command from the repository root:   bash bench/gpu_check.sh
# It finishes within GPU_CHECK_BUDGET_S seconds (default 530, under the tool's 10-minute limit):
# every stage has a time cap, and a stage that would start too close to the deadline is skipped
# and reported as such. GPU_CHECK_STAGES (default "build pytest sanitize targets suite") picks
# stages; GPU_CHECK_PYTEST (default "tests") narrows the test run. The summary table is printed
# last (the reply carries the end of the output).
# Copy cuda_targets.json into bench/results/ afterwards: it holds device, torch, date, numbers.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-530} ))
STAGES=" ${GPU_CHECK_STAGES:-build pytest sanitize targets suite} "
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
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)"
built=0
if wants build; then
  # Only this GPU's architecture here: CI proves the sm_80 + sm_90 build (csrc/cuda/check_nvcc.sh).
  stage build 300 "$OUT/build.log" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
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
  stage pytest 210 "$OUT/pytest.log" "$PY" -m pytest ${GPU_CHECK_PYTEST:-tests} -q -rs -p no:cacheprovider \
    "${xdist[@]}" --durations=15
fi

# --------------------------------------------------------------------------- sanitizers
if (( built )) && wants sanitize; then
  if [[ -z "$SANITIZER" ]]; then
    echo "compute-sanitizer not found" >>"$OUT/sanitizer.log"
    ROWS+=("| sanitize | SKIPPED (no compute-sanitizer) | - | sanitizer.log |")
  else
    for tool in memcheck racecheck; do
      stage "sanitize-$tool" 120 "$OUT/sanitizer.log" "$SANITIZER" --tool "$tool" --error-exitcode 3 \
        --print-limit 30 "$PY" bench/gpu_check_ops.py
    done
  fi
fi

# --------------------------------------------------------------------------- benchmarks
if (( built )) && wants targets; then
  stage targets 200 "$OUT/cuda_targets.log" "$PY" bench/cuda_targets.py --out "$OUT/cuda_targets.json"
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
  if [[ -f "$OUT/cuda_targets.log" ]]; then
    echo
    sed -n '/^CUDA targets on/,$p' "$OUT/cuda_targets.log"
  fi
} >"$SUMMARY"
cat "$SUMMARY"
