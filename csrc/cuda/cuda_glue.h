// Helpers of the CUDA glue (csrc/cuda/*_cuda.cpp): the only CUDA code that knows torch.
// Includes c10/cuda headers only (ATen/cuda/CUDAContext.h pulls cusparse.h, which a CUDA
// toolkit of compiler and runtime alone lacks).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace s2m {
namespace cuda_glue {

// float32 and float64 run as they are; float16 and bfloat16 are computed in float32
// (s2m::compute_type in checks.h).
using s2m::compute_type;

// The kernels index within one set with 32-bit ints.
inline void check_fits_int32(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value < std::numeric_limits<int32_t>::max(), what, " = ", value,
                    " is too large for the CUDA kernels (must be < 2^31)");
}

// Contiguous, in the compute dtype, 16-byte aligned (the kernels use 16-byte vector accesses).
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor out = t.to(compute).contiguous();
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) out = out.clone();
  return out;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(e));
}

// Scratch for a kernel, from torch's caching allocator (stream-ordered, graph-capture safe).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(std::max<size_t>(bytes, 16))}, like.options().dtype(at::kByte));
}

}  // namespace cuda_glue
}  // namespace s2m
