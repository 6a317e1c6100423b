// Device helpers shared by the CUDA kernels: deterministic warp reductions, aligned vector
// loads, launch-error and device-limit helpers. Torch-free.
//
// Determinism: every reduction here has a fixed order that depends only on the problem sizes
// (never on timing, atomics or the number of blocks), so a kernel gives the same bits run to
// run, and the forward and backward EM kernels, which both call the same E-step, take the same
// alive/dead decisions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_compat.cuh"

namespace s2m {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

template <typename T>
S2M_DEV T neg_inf() {
  return T(-INFINITY);
}

S2M_DEV int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Butterfly sum over the 32 lanes of a warp; every lane ends with the same bits (IEEE addition
// is commutative, so lanes i and i^m compute the same sum at every step). Full warps only.
template <typename T>
S2M_DEV T warp_sum(T v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

template <typename T>
S2M_DEV T warp_max(T v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    const T o = __shfl_xor_sync(kFullMask, v, m);
    v = o > v ? o : v;
  }
  return v;
}

// sum_{i < n} f(i) computed by one whole warp in a fixed order: lane l adds i = l, l + 32, ...
// in sequence, then the butterfly. The bits depend on n and the values only.
template <typename T, class F>
S2M_DEV T warp_ordered_sum(int n, F f) {
  const int lane = int(threadIdx.x) % kWarpSize;
  T acc = T(0);
  for (int i = lane; i < n; i += kWarpSize) acc += f(i);
  return warp_sum(acc);
}

// N consecutive elements loaded or stored as one access (N * sizeof(T) <= 16 bytes, aligned).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
S2M_DEV Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
S2M_DEV void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// The widest vector of T in one 16-byte access.
template <typename T>
constexpr int max_vec() {
  return int(16 / sizeof(T));
}

// Loads KC consecutive elements (a row of per-component values) in 16-byte pieces.
template <typename T, int N>
S2M_DEV void load_elems(const T* p, T* out);

template <typename T, int KC>
S2M_DEV void load_row(const T* p, T (&out)[KC]) {
  load_elems<T, KC>(p, out);
}

// Loads N consecutive elements into out[0..N) in 16-byte pieces (p aligned to the piece).
template <typename T, int N>
S2M_DEV void load_elems(const T* p, T* out) {
  constexpr int kPiece = N < max_vec<T>() ? N : max_vec<T>();
  static_assert(N % kPiece == 0, "length must be a multiple of the access width");
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    const Vec<T, kPiece> v = load_vec<T, kPiece>(p + i);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) out[i + j] = v.v[j];
  }
}

// Stores in[0..N) to N consecutive elements in 16-byte pieces (p aligned to the piece).
template <typename T, int N>
S2M_DEV void store_elems(T* p, const T* in) {
  constexpr int kPiece = N < max_vec<T>() ? N : max_vec<T>();
  static_assert(N % kPiece == 0, "length must be a multiple of the access width");
#pragma unroll
  for (int i = 0; i < N; i += kPiece) {
    Vec<T, kPiece> v;
#pragma unroll
    for (int j = 0; j < kPiece; ++j) v.v[j] = in[i + j];
    store_vec<T, kPiece>(p + i, v);
  }
}

// ----------------------------------------------------------------------------- host helpers
struct DeviceLimits {
  int max_smem_optin;  // bytes of dynamic shared memory a block may opt in to
  int sm_count;
};

// Reads the current device's limits (cheap attribute queries; no synchronisation).
// S2M_CUDA_MAX_SMEM=<bytes> lowers the shared-memory limit the kernels plan with, so that tests
// and compute-sanitizer runs reach every EM placement on any GPU.
inline cudaError_t query_device_limits(DeviceLimits* out) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&out->max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  if (const char* cap = std::getenv("S2M_CUDA_MAX_SMEM")) {
    const long bytes = std::strtol(cap, nullptr, 10);
    if (bytes > 0 && bytes < out->max_smem_optin) out->max_smem_optin = int(bytes);
  }
  return cudaDeviceGetAttribute(&out->sm_count, cudaDevAttrMultiProcessorCount, device);
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB,
// once per kernel and device (so that a CUDA graph capture after a warm-up calls nothing).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> raised;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = raised[{reinterpret_cast<const void*>(kernel), device}];
  if (have >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e == cudaSuccess) have = bytes;
  return e;
}

__host__ __device__ inline size_t round_up(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace cuda
}  // namespace s2m
