// The CPU kernels for any CPU of the architecture (x86-64: SSE2), with the build's flags.
#define S2M_CPU_LEVEL baseline
#define S2M_CPU_TARGET_BEGIN
#define S2M_CPU_TARGET_END
#include "cpu/kernels_impl.h"
