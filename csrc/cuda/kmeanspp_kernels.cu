// Batched k-means++ seeding on the GPU (see kmeanspp_kernels.cuh). Torch-free.
// One block per set: distances in parallel over points, sums and the inverse-CDF search as
// block scans in double with a fixed order (deterministic).
#include "cuda/kmeanspp_kernels.cuh"

#include <climits>

#include "common/gmm_math.h"
#include "cuda/device_common.cuh"

namespace s2m {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

struct SeedScratch {
  double warp_sums[kWarps + 1];
  int warp_int[kWarps];
  int result;
};

// Inclusive prefix sum of v over the block in thread order; *total = the block's sum.
S2M_DEV double block_inclusive_scan(double v, SeedScratch* sc, double* total) {
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const double y = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += y;
  }
  if (lane == kWarpSize - 1) sc->warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = 0.0;
    for (int i = 0; i < kWarps; ++i) {
      run += sc->warp_sums[i];
      sc->warp_sums[i] = run;
    }
    sc->warp_sums[kWarps] = run;
  }
  __syncthreads();
  const double out = (warp > 0 ? sc->warp_sums[warp - 1] : 0.0) + v;
  *total = sc->warp_sums[kWarps];
  __syncthreads();  // the scratch is reused by the next call
  return out;
}

// Minimum (or maximum) of one int per thread over the block; the same in every thread.
template <bool kMax>
S2M_DEV int block_extreme(int v, SeedScratch* sc) {
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    const int o = __shfl_xor_sync(kFullMask, v, m);
    v = kMax ? (o > v ? o : v) : (o < v ? o : v);
  }
  if (lane == 0) sc->warp_int[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int r = sc->warp_int[0];
    for (int i = 1; i < kWarps; ++i) r = kMax ? (sc->warp_int[i] > r ? sc->warp_int[i] : r)
                                              : (sc->warp_int[i] < r ? sc->warp_int[i] : r);
    sc->result = r;
  }
  __syncthreads();
  const int r = sc->result;
  __syncthreads();
  return r;
}

// First index n with cumsum(p)[n] > u * sum(p) (p >= 0, sum > 0), or the last index with
// p > 0 when rounding leaves none (u within an ulp of 1). Same value in every thread.
template <class P>
S2M_DEV int sample_index(int N, const P& p, double u, SeedScratch* sc) {
  const int tid = int(threadIdx.x);
  double total = 0.0;
  {
    double part = 0.0;
    for (int n = tid; n < N; n += kThreads) part += double(p(n));
    block_inclusive_scan(part, sc, &total);
  }
  const double target = u * total;
  double carry = 0.0;
  int last_positive = -1;
  for (int base = 0; base < N; base += kThreads) {
    const int n = base + tid;
    const double pn = n < N ? double(p(n)) : 0.0;
    if (pn > 0.0) last_positive = n;
    double tile_total = 0.0;
    const double cum = carry + block_inclusive_scan(pn, sc, &tile_total);
    const int hit = block_extreme<false>(n < N && cum > target ? n : INT_MAX, sc);
    if (hit != INT_MAX) return hit;
    carry += tile_total;
  }
  const int last = block_extreme<true>(last_positive, sc);
  return last < 0 ? 0 : last;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kmeanspp_kernel(const T* x, const T* w, const double* uniforms, int N, int D, int K,
                    int64_t* idx, T* d2_all) {
  __shared__ SeedScratch scratch_storage;
  SeedScratch* sc = &scratch_storage;
  const int64_t b = blockIdx.x;
  const T* xb = x + b * int64_t(N) * D;
  const T* wb = w + b * int64_t(N);
  const double* u = uniforms + b * K;
  T* d2 = d2_all + b * int64_t(N);
  auto by_weight = [&](int n) { return wb[n]; };
  auto by_distance = [&](int n) { return weighted(wb[n], d2[n]); };
  int chosen = sample_index(N, by_weight, u[0], sc);
  if (threadIdx.x == 0) idx[b * K] = chosen;
  for (int j = 1; j < K; ++j) {
    const T* c = xb + int64_t(chosen) * D;
    for (int n = int(threadIdx.x); n < N; n += kThreads) {
      const T* xn = xb + int64_t(n) * D;
      T acc = T(0);
      for (int d = 0; d < D; ++d) {
        const T diff = xn[d] - c[d];
        acc += diff * diff;
      }
      d2[n] = (j == 1 || acc < d2[n]) ? acc : d2[n];
    }
    __syncthreads();
    double part = 0.0;
    for (int n = int(threadIdx.x); n < N; n += kThreads) part += double(by_distance(n));
    double total = 0.0;
    block_inclusive_scan(part, sc, &total);
    // Fewer distinct (weighted) points than components: fall back to sampling by weight.
    chosen = total > 0.0 ? sample_index(N, by_distance, u[j], sc)
                         : sample_index(N, by_weight, u[j], sc);
    if (threadIdx.x == 0) idx[b * K + j] = chosen;
  }
}

// The initial parameters of set blockIdx.x from its drawn indices (KmeansppInit). A kernel of
// its own: the double division's slow-path call, inlined into kmeanspp_kernel, made it spill.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    initial_parameters_kernel(const T* x, const T* w, const int64_t* idx, int N, int D, int K,
                              KmeansppInit<T> init) {
  const int64_t b = blockIdx.x;
  const T* xb = x + b * int64_t(N) * D;
  const T* wb = w + b * int64_t(N);
  // Each thread sums the weights itself, in point order: the same total everywhere.
  T total = T(0);
  for (int n = 0; n < N; ++n) total += wb[n];
  if (!(total > T(0))) total = T(1);  // no weight at all: centre and spread 0
  // One dimension a thread, points in order (as the CPU kernel): coalesced over d.
  for (int d = int(threadIdx.x); d < D; d += kThreads) {
    T centre = T(0);
    for (int n = 0; n < N; ++n) centre += wb[n] * xb[int64_t(n) * D + d];
    centre /= total;
    // Validation bounds |x| so that squared deviations are finite: a zero weight adds 0.
    T spread = T(0);
    for (int n = 0; n < N; ++n) {
      const T dev = xb[int64_t(n) * D + d] - centre;
      spread += wb[n] * (dev * dev);
    }
    const T variance = floored_variance(spread / total, init.var_floor);
    for (int k = 0; k < K; ++k) {
      const int64_t out = (b * K + k) * D + d;
      init.means[out] = xb[idx[b * K + k] * D + d];
      init.variances[out] = variance;
    }
  }
  for (int k = int(threadIdx.x); k < K; k += kThreads) init.log_weights[b * K + k] = -T(log(double(K)));
}

}  // namespace

template <typename T>
size_t kmeanspp_workspace_bytes(int64_t B, int64_t N) {
  return size_t(B * N) * sizeof(T);
}

template <typename T>
cudaError_t kmeanspp(const T* x, const T* w, const double* uniforms, int64_t B, int64_t N,
                     int64_t D, int64_t K, int64_t* idx, KmeansppInit<T> init, void* workspace,
                     cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  S2M_LAUNCH(kmeanspp_kernel<T>, dim3(unsigned(B)), dim3(kThreads), 0, stream, x, w, uniforms,
             int(N), int(D), int(K), idx, static_cast<T*>(workspace));
  if (init.means != nullptr) {
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    S2M_LAUNCH(initial_parameters_kernel<T>, dim3(unsigned(B)), dim3(kThreads), 0, stream, x, w,
               idx, int(N), int(D), int(K), init);
  }
  return cudaGetLastError();
}

template size_t kmeanspp_workspace_bytes<float>(int64_t, int64_t);
template size_t kmeanspp_workspace_bytes<double>(int64_t, int64_t);
template cudaError_t kmeanspp<float>(const float*, const float*, const double*, int64_t, int64_t,
                                     int64_t, int64_t, int64_t*, KmeansppInit<float>, void*,
                                     cudaStream_t);
template cudaError_t kmeanspp<double>(const double*, const double*, const double*, int64_t,
                                      int64_t, int64_t, int64_t, int64_t*, KmeansppInit<double>,
                                      void*, cudaStream_t);

}  // namespace cuda
}  // namespace s2m
