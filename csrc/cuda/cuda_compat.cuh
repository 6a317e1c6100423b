// The one switch between real CUDA (nvcc) and the CPU emulator (g++ -DS2M_CUDA_EMU, used by
// csrc/cuda/emu/run_emu_tests.sh to check the kernels' logic without a GPU). Kernel sources
// include this instead of cuda_runtime.h and launch with S2M_LAUNCH. No torch here.
// S2M_LAUNCH's kernel argument must hold no comma: bind a template instantiation with several
// arguments to a variable first (auto k = kernel<T, 4>; S2M_LAUNCH(k, ...)).
#pragma once

#if defined(S2M_CUDA_EMU)
#include "cuda/emu/cuda_emu.h"
#define S2M_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::s2m_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define S2M_DYNAMIC_SHARED(name) unsigned char* name = ::s2m_emu::dynamic_shared()
#else
#include <cuda_runtime.h>
#define S2M_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define S2M_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#define S2M_DEV __device__ __forceinline__
