// The CPU kernels for x86-64 CPUs with AVX2 and FMA (chosen at run time: dispatch.cpp).
#include "cpu/kernels.h"
#ifdef S2M_CPU_X86_LEVELS
#define S2M_CPU_LEVEL avx2
#define S2M_CPU_TARGET_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define S2M_CPU_TARGET_END _Pragma("GCC pop_options")
#include "cpu/kernels_impl.h"
#endif
