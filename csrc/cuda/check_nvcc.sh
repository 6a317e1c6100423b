#!/usr/bin/env bash
# Proves that the CUDA kernel sources are torch-free and compile with nvcc alone, for sm_80 and
# sm_90, and prints each kernel's registers, stack and spills (ptxas -v). Needs only nvcc.
#   csrc/cuda/check_nvcc.sh            (NVCC=..., ARCHS="80 90", BUILD_DIR=... to override)
#   csrc/cuda/check_nvcc.sh --report OUT.md
#       also writes the static performance report (report/static_report.py): registers, spills, shared
#       memory, blocks per SM at the benchmark shapes, SASS of the EM inner loops. Needs
#       nvdisasm and cuobjdump (CUDA toolkit, or pip nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump;
#       CUOBJDUMP=..., NVDISASM=... to override) and python3.
# Exit status 0 = every .cu compiled and no kernel source includes torch, ATen, c10 or pybind11.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
csrc="$(cd "$here/.." && pwd)"
nvcc="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
archs="${ARCHS:-80 90}"
out="${BUILD_DIR:-$csrc/../build/nvcc_check}"
report=""
if [[ "${1:-}" == "--report" ]]; then
  [[ -n "${2:-}" ]] || { echo "usage: $0 [--report OUT.md]" >&2; exit 2; }
  report="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
  archs="80 90"  # the report compares both
fi
mkdir -p "$out"
rm -f "$out"/*.ptxas.log "$out"/*.sass

# 1. The kernels and the headers they include know nothing of torch.
kernel_files=("$here"/*.cu "$here"/*.cuh "$csrc"/common/*.h)
if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10|pybind11)/' "${kernel_files[@]}"; then
  echo "check_nvcc: the kernel sources above include torch headers" >&2
  exit 1
fi

# 2. Each .cu compiles on its own with nvcc, with warnings as errors.
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
status=0
for src in "$here"/*.cu; do
  name="$(basename "$src" .cu)"
  log="$out/$name.ptxas.log"
  start=$(date +%s)
  if "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -lineinfo -Xptxas -v \
      "${gencode[@]}" -I"$csrc" -c "$src" -o "$out/$name.o" >"$log" 2>&1; then
    echo "ok    $name.cu  ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $name.cu" >&2
    cat "$log" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] || exit $status

# 3. Resource summary: one line per kernel and architecture.
echo
printf '%-6s %6s %6s %6s  %s\n' arch regs stack spill kernel
for log in "$out"/*.ptxas.log; do
  awk '
    /Compiling entry function/ { match($0, /_Z[^'"'"']*/); fn = substr($0, RSTART, RLENGTH);
                                 match($0, /sm_[0-9]+/); arch = substr($0, RSTART, RLENGTH) }
    /bytes stack frame/ { stack = $1; spill = $5 + $9 }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; ++i) if ($i == "Used") regs = $(i + 1);
                              printf "%-6s %6s %6s %6s  %s\n", arch, regs, stack, spill, fn }
  ' "$log"
done | c++filt | sed -E 's/s2m::cuda::\(anonymous namespace\):://g; s/s2m::cuda:://g; s/\(.*//'

[[ -n "$report" ]] || exit 0

# 4. The static report: SASS with source lines, the launch shapes, then the parser.
tool() {  # tool NAME ENV_OVERRIDE: the CUDA toolkit's binary, else the pip wheel's
  local name=$1 override=$2 cand
  if [[ -n "$override" ]]; then echo "$override"; return; fi
  for cand in "$(dirname "$nvcc")/$name" \
      "$("${PYTHON:-python3}" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)"/nvidia/*/bin/"$name"; do
    [[ -x "$cand" ]] && { echo "$cand"; return; }
  done
  command -v "$name" || { echo "check_nvcc: $name not found" >&2; exit 1; }
}
cuobjdump="$(tool cuobjdump "${CUOBJDUMP:-}")"
nvdisasm="$(tool nvdisasm "${NVDISASM:-}")"
for obj in "$out"/*.o; do
  name="$(basename "$obj" .o)"
  [[ "$name" == static_shapes ]] && continue
  (cd "$out" && "$cuobjdump" -xelf all "$obj" >/dev/null)
  for a in $archs; do
    "$nvdisasm" -gi -c "$out/$name.sm_$a.cubin" >"$out/$name.sm_$a.sass"
  done
done
"$nvcc" -std=c++17 -O3 -I"$csrc" "$here/report/static_shapes.cpp" "$out/em_kernels.o" \
  "$out/score_kernels.o" -o "$out/static_shapes"
"$out/static_shapes" >"$out/shapes.tsv"
python3 "$here/report/static_report.py" --build "$out" --src "$here" \
  --nvcc-version "$("$nvcc" --version | grep -E '^Cuda compilation|^Build' | tr '\n' ' ' | sed 's/ $//')" \
  --out "$report"
