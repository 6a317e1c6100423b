#!/usr/bin/env bash
# Builds the CUDA kernels of csrc/cuda for the CPU emulator (cuda_emu.h) with g++ and runs
# emu_test.cpp, which compares them with the CPU kernels. Needs only g++ (no CUDA, no torch).
#   csrc/cuda/emu/run_emu_tests.sh [em|score|kmeanspp]     (default: all)
# Env: BUILD_DIR (default build/emu), CXX (default g++), EMU_OPT (default -O1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
csrc="$(cd "$here/../.." && pwd)"
build="${BUILD_DIR:-$csrc/../build/emu}"
cxx="${CXX:-g++}"
opt="${EMU_OPT:--O1}"
mkdir -p "$build"
flags=(-std=c++17 "$opt" -g0 -DS2M_CUDA_EMU -I"$csrc" -Wall -Wno-unknown-pragmas -Wno-unused-function)
objs=()
for src in "$csrc"/cuda/*.cu "$here"/emu_test.cpp "$here"/emu_test_score.cpp; do
  obj="$build/$(basename "$src").o"
  if [[ ! -f "$obj" || "$src" -nt "$obj" || -n "$(find "$csrc/cuda" "$csrc/common" "$csrc/cpu" \( -name '*.h' -o -name '*.cuh' \) -newer "$obj" -print -quit)" ]]; then
    echo "compiling $(basename "$src")"
    "$cxx" "${flags[@]}" -x c++ -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done
"$cxx" "${objs[@]}" -o "$build/emu_test"
"$build/emu_test" "$@"
