// Batched k-means++ (D^2) seeding on the GPU: the torch-free interface of kmeanspp_kernels.cu.
// Same rule as csrc/cpu/kmeanspp_cpu.cpp: the first index drawn with probability proportional
// to the weight, each next one proportional to weight x squared distance to the nearest chosen
// point (by weight again when all of those are 0), by inverse-CDF sampling with one given
// uniform per draw. The randomness comes in as uniforms, so the kernel is a pure function of
// its inputs: deterministic for a given generator.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_compat.cuh"

namespace s2m {
namespace cuda {

template <typename T>
size_t kmeanspp_workspace_bytes(int64_t B, int64_t N);

// The initial parameters of a k-means++ fit (s2m::kmeanspp_init), all null for s2m::kmeanspp:
// log weights (B,K) = -log K, means (B,K,D) = the drawn points, variances (B,K,D) = the set's
// weighted variance + var_floor (floored_variance), the same for every component.
template <typename T>
struct KmeansppInit {
  T* log_weights = nullptr;
  T* means = nullptr;
  T* variances = nullptr;
  T var_floor = T(0);
};

// x (B,N,D), w (B,N), uniforms (B,K) in [0,1) -> idx (B,K) int64, and init's parameters where
// given. One block per set.
template <typename T>
cudaError_t kmeanspp(const T* x, const T* w, const double* uniforms, int64_t B, int64_t N,
                     int64_t D, int64_t K, int64_t* idx, KmeansppInit<T> init, void* workspace,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace s2m
