// Fused batched EM on the GPU: the torch-free interface of csrc/cuda/em_kernels.cu.
//
// One thread block fits one set through all T iterations (forward) or runs the analytic
// backward through all T iterations in reverse. Same math and op contract as the CPU kernels
// in csrc/cpu/em_set.h; the per-component rules come from csrc/common/gmm_math.h.
//
// Where a set's state lives (EmLayout::placement), chosen per call from the sizes:
//   kAllShared  x, w and all per-set arrays in shared memory: x is read from global memory once
//               per launch and stays on chip for every iteration;
//   kXGlobal    x is read from global memory (L1/L2) in each pass, the per-set arrays stay in
//               shared memory (sets too large to hold on chip);
//   kAllGlobal  per-set arrays also in a global workspace (very large K * D).
// All three run the same code, each compiled for its placement (a template argument), so that
// arrays in shared memory are accessed with shared-memory instructions.
//
// Pointers are device pointers to contiguous arrays; x must be 16-byte aligned.
// Compute type T: float or double (the glue converts half/bfloat16 to float).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_compat.cuh"

namespace s2m {
namespace cuda {

constexpr int kEmThreads = 256;  // threads per block (one block per set)
constexpr int kEmKC = 4;         // components per register tile

enum class Placement : int { kAllShared = 0, kXGlobal = 1, kAllGlobal = 2 };

// Element offset of set b at step t of a (steps, B, per_set) array (t = 0: of a (B, per_set)
// array). In 64 bits: steps * B * K * D passes 2^31 at large batch sizes.
__host__ __device__ inline int64_t traj_offset(int64_t t, int64_t B, int64_t b, int64_t per_set) {
  return (t * B + b) * per_set;
}

// Shapes and the arrays of one call. Trajectories are (steps, B, K[, D]).
template <typename T>
struct EmForwardArgs {
  const T* x;          // (B, N, D)
  const T* w;          // (B, N)
  const T* lw0;        // (B, K) initial log weights
  const T* mu0;        // (B, K, D)
  const T* var0;       // (B, K, D)
  T* lw_traj;          // (steps, B, K)
  T* mu_traj;          // (steps, B, K, D)
  T* var_traj;         // (steps, B, K, D)
  T* loglik;           // (B) mean weighted log-likelihood of the returned parameters
  int64_t* n_iter_used;  // (B)
  bool* converged;     // (B)
  int64_t B, N, D, K;
  int64_t n_iter;
  int64_t steps;       // n_iter + 1 when keeping the trajectory, else 1
  double var_floor;
  double tol;
};

template <typename T>
struct EmBackwardArgs {
  const T* g_lw;       // (steps, B, K) or null: gradient on the log-weight trajectory
  const T* g_mu;       // (steps, B, K, D) or null
  const T* g_var;      // (steps, B, K, D) or null
  const T* x;          // (B, N, D)
  const T* w;          // (B, N)
  const T* lw_traj;    // (steps, B, K)
  const T* mu_traj;    // (steps, B, K, D)
  const T* var_traj;   // (steps, B, K, D)
  const int64_t* n_iter_used;  // (B); clamped to [0, steps - 1] (not checked: that needs a sync)
  T* g_x;              // (B, N, D)
  T* g_w;              // (B, N)
  T* g_lw0;            // (B, K)
  T* g_mu0;            // (B, K, D)
  T* g_var0;           // (B, K, D)
  int64_t B, N, D, K;
  int64_t steps;
  double var_floor;
};

// Bytes of global workspace the call needs (0 unless the layout is kAllGlobal).
template <typename T>
size_t em_forward_workspace_bytes(int64_t B, int64_t N, int64_t D, int64_t K);
template <typename T>
size_t em_backward_workspace_bytes(int64_t B, int64_t N, int64_t D, int64_t K);

// Enqueue the fused forward / backward on `stream`. No host synchronisation.
template <typename T>
cudaError_t em_forward(const EmForwardArgs<T>& args, void* workspace, cudaStream_t stream);
template <typename T>
cudaError_t em_backward(const EmBackwardArgs<T>& args, void* workspace, cudaStream_t stream);

// Which placement a call gets (for tests and benchmarks; -1 on a device query error), and
// which it would get with max_smem bytes of shared memory per block (no device needed).
template <typename T>
int em_forward_placement(int64_t N, int64_t D, int64_t K);
template <typename T>
int em_backward_placement(int64_t N, int64_t D, int64_t K);
template <typename T>
int em_placement_for_limit(int64_t N, int64_t D, int64_t K, bool backward, int64_t max_smem);
// Bytes of dynamic shared memory per block the launch asks for under that limit.
template <typename T>
int64_t em_smem_bytes_for_limit(int64_t N, int64_t D, int64_t K, bool backward, int64_t max_smem);

}  // namespace cuda
}  // namespace s2m
