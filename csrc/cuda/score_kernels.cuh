// Scoring on the GPU: the torch-free interface of csrc/cuda/score_kernels.cu.
//
//   score_paired            z (B,Q,D) against its own set's mixture -> (B,Q)
//   score_paired_backward   gradients of sum grad * score wrt z and the mixtures
//   score_pool              a shared pool z (M,D) against every mixture -> (B,M): one fused
//                           register-tiled kernel (an SGEMM-like tiling of pool rows x mixture
//                           components), logsumexp in registers; the (M, B*K) log-densities never
//                           touch memory. No tensor cores, so TF32 settings cannot change it.
//   score_pool_backward     gradients of sum grad * score wrt z and the mixtures
//
// Pointers are device pointers to contiguous arrays. T: float or double. Reductions have a
// fixed order: results are the same run to run. Each call enqueues its kernels on `stream`
// and never synchronises.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_compat.cuh"

namespace s2m {
namespace cuda {

template <typename T>
struct MixtureArgs {
  const T* log_weights;  // (B, K)
  const T* means;        // (B, K, D)
  const T* variances;    // (B, K, D)
  int64_t B, K, D;
};

// ---------------------------------------------------------------- paired
template <typename T>
size_t score_paired_workspace_bytes(int64_t B, int64_t K, int64_t D);
template <typename T>
cudaError_t score_paired(const T* z, int64_t Q, const MixtureArgs<T>& mix, T* out, void* workspace,
                         cudaStream_t stream);

// Gradients of L = sum_{b,q} grad[b,q] log p_b(z_b[q]) where z_b = z + b * z_batch_stride
// (Q*D for paired scoring; 0 for a shared pool, whose z gradient is then not written).
template <typename T>
struct ScoreBackwardArgs {
  const T* grad;           // (B, Q)
  const T* z;
  int64_t z_batch_stride;  // elements between the query blocks of consecutive sets
  int64_t Q;
  MixtureArgs<T> mix;
  T* g_z;                  // (B, Q, D) or null
  T* g_log_weights;        // (B, K)
  T* g_means;              // (B, K, D)
  T* g_variances;          // (B, K, D)
};
template <typename T>
size_t score_backward_workspace_bytes(int64_t B, int64_t Q, int64_t K, int64_t D);
template <typename T>
cudaError_t score_paired_backward(const ScoreBackwardArgs<T>& args, void* workspace,
                                  cudaStream_t stream);

// ---------------------------------------------------------------- pool
template <typename T>
size_t score_pool_workspace_bytes(int64_t B, int64_t K, int64_t D);
template <typename T>
cudaError_t score_pool(const T* z, int64_t M, const MixtureArgs<T>& mix, T* out, void* workspace,
                       cudaStream_t stream);

template <typename T>
size_t score_pool_backward_workspace_bytes(int64_t B, int64_t M, int64_t K, int64_t D);
// Dynamic shared memory per block of the pool kernels (score_pool's tile kernel, and the
// per-item gradient kernel of score_pool_backward under max_smem bytes per block; 0 if it
// cannot run), and the threads of that block.
template <typename T>
size_t score_pool_smem_bytes();
template <typename T>
size_t pool_grad_z_smem_bytes(int64_t K, int64_t D, int64_t max_smem, int* threads);

// g_z (M, D) and the mixtures' gradients of L = sum_{b,m} grad[b,m] log p_b(z[m]).
template <typename T>
cudaError_t score_pool_backward(const T* grad, const T* z, int64_t M, const MixtureArgs<T>& mix,
                                T* g_z, T* g_log_weights, T* g_means, T* g_variances,
                                void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace s2m
