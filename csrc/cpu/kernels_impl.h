// One instruction-set level's CPU kernels: the entries of kernels.h's table, over ranges of
// sets. Included once by each level file, which defines
//   S2M_CPU_LEVEL         the level's namespace (baseline, avx2, avx512), and
//   S2M_CPU_TARGET_BEGIN  the pragmas that compile what follows for that level (empty for
//                         the baseline), closed here with S2M_CPU_TARGET_END.
// Everything included before S2M_CPU_TARGET_BEGIN (the standard library, the rules header,
// kernels.h) is compiled for the baseline, so any copy of it the linker keeps runs on every
// CPU; everything after it is in the level's namespace.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/gmm_math.h"
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#if !defined(S2M_CPU_LEVEL) || !defined(S2M_CPU_TARGET_BEGIN) || !defined(S2M_CPU_TARGET_END)
#error "include kernels_impl.h from a level file (csrc/cpu/level_*.cpp)"
#endif

S2M_CPU_TARGET_BEGIN

#include "cpu/diag_gauss.h"
#include "cpu/em_set.h"

namespace s2m {
namespace cpu {
namespace S2M_CPU_LEVEL {

template <typename P>
Trajectory<P> set_trajectory(P* lw, P* mu, P* var, int64_t b, int64_t steps, int64_t B, int64_t K,
                             int64_t D) {
  return {lw + b * K, mu + b * K * D, var + b * K * D, B * K, B * K * D, steps};
}

template <typename T>
void em_forward(const EmForwardArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, D = a.D, K = a.K;
  const SetShape s{N, D, K};
  Workspace<T> ws(s, false);
  for (int64_t b = begin; b < end; ++b) {
    ConstParams<T> init(a.lw0 + b * K, a.mu0 + b * K * D, a.var0 + b * K * D);
    auto traj = set_trajectory(a.lw_traj, a.mu_traj, a.var_traj, b, a.steps, a.B, K, D);
    const FitReport r =
        em_forward_set(a.x + b * N * D, a.w + b * N, s, init, a.cfg, traj, ws, a.points);
    a.loglik[b] = T(r.loglik);
    a.n_iter_used[b] = r.n_iter;
    a.converged[b] = r.converged;
  }
}

template <typename T>
void em_backward(const EmBackwardArgs<T>& a, int64_t begin, int64_t end) {
  // Subnormal results and inputs flushed to zero (FTZ and DAZ) for the kernel, the thread's own
  // mode restored after. Gradients carried back through many EM iterations decay into
  // subnormals, which cost about 100 cycles an operation: with the gradient on the last step
  // only, the core shape's backward took 112 ms instead of 43 ms. What is flushed is below
  // 1.2e-38 (float32) or 2.2e-308 (float64).
  const FpMode::Scope flush(FpMode().flushing_subnormals());
  const int64_t N = a.N, D = a.D, K = a.K;
  const SetShape s{N, D, K};
  Workspace<T> ws(s, true);
  for (int64_t b = begin; b < end; ++b) {
    auto traj = set_trajectory(a.lw_traj, a.mu_traj, a.var_traj, b, a.steps, a.B, K, D);
    auto gtraj = set_trajectory(a.g_lw_traj, a.g_mu_traj, a.g_var_traj, b, a.steps, a.B, K, D);
    Params<T> g_init{a.g_lw0 + b * K, a.g_mu0 + b * K * D, a.g_var0 + b * K * D};
    em_backward_set(a.x + b * N * D, a.w + b * N, s, a.n_iter_used[b], a.var_floor, traj, gtraj,
                    a.has_grad, a.g_x + b * N * D, a.g_w + b * N, g_init, ws, a.points);
  }
}

template <typename T>
void paired_precompute(const PairedArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t K = a.K, D = a.D;
  for (int64_t b = begin; b < end; ++b)
    precompute_components(a.lw + b * K, a.var + b * K * D, K, D, a.inv_var + b * K * D,
                          a.log_norm + b * K);
}

template <typename T>
void paired_rows(const PairedArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t K = a.K, D = a.D, Q = a.Q;
  const int64_t chunks = (Q + kPairedRows - 1) / kPairedRows;
  std::vector<T> l(kBlock * K), pad(kBlock * D);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / chunks, q0 = (task % chunks) * kPairedRows;
    const int64_t rows = std::min(kPairedRows, Q - q0), base = b * Q + q0;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t count = std::min(kBlock, rows - r0);
      const T* zb = padded_block(a.z + (base + r0) * D, count, D, pad.data());
      T lse[kBlock];
      block_log_densities(zb, a.mu + b * K * D, a.inv_var + b * K * D, a.log_norm + b * K, K, D,
                          l.data());
      block_posteriors(l.data(), K, static_cast<T*>(nullptr), lse);
      std::copy(lse, lse + count, a.out + base + r0);
    }
  }
}

// One set per call of the inner loop: its parameter gradients are sums over its own queries.
template <typename T>
void paired_backward(const PairedArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t K = a.K, D = a.D, Q = a.Q;
  std::vector<T> inv_var(K * D), log_norm(K), l(kBlock * K), g_l(kBlock * K);
  std::vector<T> pad(kBlock * D), g_pad(kBlock * D);
  for (int64_t b = begin; b < end; ++b) {
    const T* means = a.mu + b * K * D;
    precompute_components(a.lw + b * K, a.var + b * K * D, K, D, inv_var.data(), log_norm.data());
    for (int64_t q0 = 0; q0 < Q; q0 += kBlock) {
      const int64_t count = std::min(kBlock, Q - q0), i0 = b * Q + q0;
      const T* zb = padded_block(a.z + i0 * D, count, D, pad.data());
      block_log_densities(zb, means, inv_var.data(), log_norm.data(), K, D, l.data());
      T lse[kBlock];
      block_posteriors(l.data(), K, g_l.data(), lse);
      for (int64_t j = 0; j < kBlock; ++j) {  // dL/dl = dL/dlog p times the posteriors
        const T g = j < count && scored_point_passes_gradient(lse[j]) ? a.grad[i0 + j] : T(0);
        for (int64_t k = 0; k < K; ++k) g_l[j * K + k] *= g;
      }
      // A partial block writes its z-gradient to scratch, then copies the real rows.
      T* gzb = count == kBlock ? a.g_z + i0 * D : g_pad.data();
      if (count < kBlock) std::fill(g_pad.begin(), g_pad.end(), T(0));
      block_log_densities_backward(zb, means, inv_var.data(), g_l.data(), K, D, a.g_lw + b * K,
                                   a.g_mu + b * K * D, a.g_var + b * K * D, gzb);
      if (count < kBlock) std::copy(g_pad.begin(), g_pad.begin() + count * D, a.g_z + i0 * D);
    }
  }
}

// First index n with cumsum(p)[n] > u * sum(p) (p >= 0, sum(p) > 0): inverse-CDF sampling.
template <typename T>
int64_t sample_index(const T* p, int64_t n, double u) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += double(p[i]);
  const double target = u * total;
  double cum = 0;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += double(p[i]);
    if (p[i] > T(0)) last_positive = i;
    if (cum > target) return i;
  }
  return last_positive;  // only reached through rounding when u is within an ulp of 1
}

// k-means++ (D^2) seeding of one set from its uniforms u (K).
template <typename T>
void seed_set(const T* x, const T* w, const double* u, int64_t N, int64_t D, int64_t K,
              int64_t* idx, std::vector<T>& d2, std::vector<T>& p) {
  d2.assign(N, std::numeric_limits<T>::infinity());
  p.resize(N);
  idx[0] = sample_index(w, N, u[0]);
  for (int64_t j = 1; j < K; ++j) {
    const T* c = x + idx[j - 1] * D;
    double total = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* xn = x + n * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) {
        const T diff = xn[d] - c[d];
        acc += diff * diff;
      }
      d2[n] = std::min(d2[n], acc);
      p[n] = weighted(w[n], d2[n]);  // a far zero-weight point: 0, not 0 * Inf
      total += double(p[n]);
    }
    // Fewer distinct (weighted) points than components: fall back to sampling by weight.
    idx[j] = total > 0 ? sample_index(p.data(), N, u[j]) : sample_index(w, N, u[j]);
  }
}

// The initial parameters of set b (see KmeansppArgs) from its drawn indices. The set's points
// are in cache from the draws; centre and spread are sums over points in point order.
template <typename T>
void initial_parameters(const KmeansppArgs<T>& a, int64_t b, std::vector<T>& centre,
                        std::vector<T>& spread) {
  const int64_t N = a.N, D = a.D, K = a.K;
  const T *x = a.x + b * N * D, *w = a.w + b * N;
  T total = 0;
  for (int64_t n = 0; n < N; ++n) total += w[n];
  if (!(total > T(0))) total = T(1);  // no weight at all: centre and spread 0
  centre.assign(D, T(0));
  spread.assign(D, T(0));
  T* c = centre.data();
  T* s = spread.data();
  for (int64_t n = 0; n < N; ++n) {
    const T wn = w[n];
    const T* xn = x + n * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) c[d] += wn * xn[d];
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) c[d] /= total;
  // Validation bounds |x| so that squared deviations are finite: a zero weight adds 0.
  for (int64_t n = 0; n < N; ++n) {
    const T wn = w[n];
    const T* xn = x + n * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T dev = xn[d] - c[d];
      s[d] += wn * (dev * dev);
    }
  }
  for (int64_t d = 0; d < D; ++d) s[d] = floored_variance(s[d] / total, a.var_floor);
  const T log_weight = -T(std::log(double(K)));
  for (int64_t k = 0; k < K; ++k) {
    a.log_weights[b * K + k] = log_weight;
    std::copy(x + a.idx[b * K + k] * D, x + (a.idx[b * K + k] + 1) * D, a.means + (b * K + k) * D);
    std::copy(s, s + D, a.variances + (b * K + k) * D);
  }
}

template <typename T>
void kmeanspp(const KmeansppArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> d2, p, centre, spread;
  for (int64_t b = begin; b < end; ++b) {
    seed_set(a.x + b * a.N * a.D, a.w + b * a.N, a.u + b * a.K, a.N, a.D, a.K, a.idx + b * a.K, d2, p);
    if (a.means != nullptr) initial_parameters(a, b, centre, spread);
  }
}

template <typename T>
const Kernels<T>& table() {
  static const Kernels<T> entries{&em_forward<T>,  &em_backward<T>,     &paired_precompute<T>,
                                  &paired_rows<T>, &paired_backward<T>, &kmeanspp<T>};
  return entries;
}
template const Kernels<float>& table();
template const Kernels<double>& table();

}  // namespace S2M_CPU_LEVEL
}  // namespace cpu
}  // namespace s2m

S2M_CPU_TARGET_END
