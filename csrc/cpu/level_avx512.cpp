// The CPU kernels for x86-64 CPUs with AVX-512 F, VL, BW and DQ, in 512-bit vectors
// (chosen at run time: dispatch.cpp).
#include "cpu/kernels.h"
#ifdef S2M_CPU_X86_LEVELS
#define S2M_CPU_LEVEL avx512
#define S2M_CPU_TARGET_BEGIN                                                        \
  _Pragma("GCC push_options")                                                       \
  _Pragma("GCC target(\"avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512\")")
#define S2M_CPU_TARGET_END _Pragma("GCC pop_options")
#include "cpu/kernels_impl.h"
#endif
