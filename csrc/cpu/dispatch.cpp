// Chooses the instruction-set level of the CPU kernels once, as ATen does with
// ATEN_CPU_CAPABILITY: the best level this CPU executes, or a lower one forced with
// S2M_CPU_CAPABILITY=baseline|avx2|avx512.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

namespace s2m {
namespace cpu {

const char* level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::kAvx2:
      return "avx2";
    case CpuLevel::kAvx512:
      return "avx512";
    default:
      return "baseline";
  }
}

CpuLevel best_level() {
#ifdef S2M_CPU_X86_LEVELS
  // libgcc's cpuid reading also checks that the OS saves the ymm and zmm registers.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return CpuLevel::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuLevel::kAvx2;
#endif
  return CpuLevel::kBaseline;
}

namespace {

CpuLevel choose_level() {
  const CpuLevel best = best_level();
  const char* forced = std::getenv("S2M_CPU_CAPABILITY");
  if (forced == nullptr || *forced == '\0') return best;
  for (int i = 0; i < kNumCpuLevels; ++i) {
    const auto level = static_cast<CpuLevel>(i);
    if (std::strcmp(forced, level_name(level)) != 0) continue;
    TORCH_CHECK_VALUE(i <= static_cast<int>(best), "S2M_CPU_CAPABILITY=", forced,
                      " asks for instruction sets this CPU (or this build) lacks; the highest "
                      "level here is ", level_name(best));
    return level;
  }
  TORCH_CHECK_VALUE(false, "S2M_CPU_CAPABILITY must be one of baseline, avx2, avx512 (or unset), got '",
                    forced, "'");
}

}  // namespace

CpuLevel active_level() {
  static const CpuLevel level = choose_level();
  return level;
}

template <typename T>
const Kernels<T>& kernels_at(CpuLevel level) {
  switch (level) {
#ifdef S2M_CPU_X86_LEVELS
    case CpuLevel::kAvx512:
      return avx512::table<T>();
    case CpuLevel::kAvx2:
      return avx2::table<T>();
#endif
    default:
      return baseline::table<T>();
  }
}
template const Kernels<float>& kernels_at(CpuLevel);
template const Kernels<double>& kernels_at(CpuLevel);

}  // namespace cpu
}  // namespace s2m
