// Per-point math of a diagonal Gaussian mixture on the CPU, torch-free: the E-step and the
// scoring ops both evaluate component log-densities with block_log_densities and
// backpropagate through them with block_log_densities_backward.
//
// Points go in blocks of kBlock = 4 rows with one named accumulator per row: each
// component's mean, inverse variance and gradient accumulators are then loaded once per
// block instead of once per point (about 1.4-3x fewer instructions in these loops, measured
// in bench/NOTES.md). Callers hand in whole blocks; padding rows carry weight or gradient 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/gmm_math.h"

namespace s2m {
namespace cpu {

constexpr int64_t kBlock = 4;

inline int64_t round_up_to_block(int64_t rows) { return (rows + kBlock - 1) / kBlock * kBlock; }

// sum_d log v[d] with one log per 16 values: v = m 2^e with m in [0.5, 1), so the product of
// 16 mantissas stays in [2^-16, 1) and log(prod m) + ln2 sum e loses nothing to overflow.
template <typename T>
T sum_log(const T* v, int64_t D) {
  constexpr int64_t kGroup = 16;
  T total = 0;
  int64_t exponents = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kGroup) {
    T prod = 1;
    for (int64_t d = d0; d < std::min(D, d0 + kGroup); ++d) {
      int e;
      prod *= std::frexp(v[d], &e);
      exponents += e;
    }
    total += std::log(prod);
  }
  return total + T(exponents) * T(0.69314718055994530941723212145818);
}

// Per-component constants of a mixture: inv_var (K,D) = 1/v and log_norm (K) = log pi - 1/2
// sum_d log(2 pi v). Computed once per mixture (per EM iteration), used for every point.
template <typename T>
void precompute_components(const T* log_weights, const T* variances, int64_t K, int64_t D,
                           T* inv_var, T* log_norm) {
  for (int64_t k = 0; k < K; ++k) {
    const T* v = variances + k * D;
    T* iv = inv_var + k * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) iv[d] = T(1) / v[d];
    log_norm[k] = component_log_norm(log_weights[k], sum_log(v, D), D);
  }
}

// l (4,K): l[j,k] = log_norm[k] - 1/2 sum_d (z[j,d] - mu[k,d])^2 / v[k,d] for 4 points z (4,D).
template <typename T>
void block_log_densities(const T* z, const T* means, const T* inv_var, const T* log_norm,
                         int64_t K, int64_t D, T* l) {
  const T *z0 = z, *z1 = z + D, *z2 = z + 2 * D, *z3 = z + 3 * D;
  for (int64_t k = 0; k < K; ++k) {
    const T* mu = means + k * D;
    const T* iv = inv_var + k * D;
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < D; ++d) {
      const T m = mu[d], v = iv[d];
      const T e0 = z0[d] - m, e1 = z1[d] - m, e2 = z2[d] - m, e3 = z3[d] - m;
      a0 += e0 * e0 * v;
      a1 += e1 * e1 * v;
      a2 += e2 * e2 * v;
      a3 += e3 * e3 * v;
    }
    l[k] = log_norm[k] - T(0.5) * a0;
    l[K + k] = log_norm[k] - T(0.5) * a1;
    l[2 * K + k] = log_norm[k] - T(0.5) * a2;
    l[3 * K + k] = log_norm[k] - T(0.5) * a3;
  }
}

// logsumexp_k l[k] of one point; if resp is given, also the posteriors exp(l - lse).
// l is scratch: it may be overwritten.
template <typename T>
T log_sum_exp(T* l, int64_t K, T* resp) {
  T lmax = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) lmax = std::max(lmax, l[k]);
  // The posteriors reuse the exponentials of the sum (one exp per component, not two).
  T* e = resp != nullptr ? resp : l;
  T sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    e[k] = std::exp(l[k] - lmax);
    sum += e[k];
  }
  if (resp != nullptr) {
    const T inv = T(1) / sum;
    for (int64_t k = 0; k < K; ++k) resp[k] *= inv;
  }
  return lmax + std::log(sum);
}

// Reverse of block_log_densities: given g_l (4,K) = dL/dl, accumulate
//   dL/dlog_weight[k] += sum_j g_l[j,k]
//   dL/dmean[k,d]     += sum_j g_l[j,k] e[j,k,d]      with e = (z - mu) / v
//   dL/dvar[k,d]      += sum_j g_l[j,k] (e^2 - 1/v) / 2
//   dL/dz[j,d]        -= sum_k g_l[j,k] e[j,k,d]
template <typename T>
void block_log_densities_backward(const T* z, const T* means, const T* inv_var, const T* g_l,
                                  int64_t K, int64_t D, T* g_log_weights, T* g_means,
                                  T* g_vars, T* g_z) {
  const T *z0 = z, *z1 = z + D, *z2 = z + 2 * D, *z3 = z + 3 * D;
  T *gz0 = g_z, *gz1 = g_z + D, *gz2 = g_z + 2 * D, *gz3 = g_z + 3 * D;
  for (int64_t k = 0; k < K; ++k) {
    const T g0 = g_l[k], g1 = g_l[K + k], g2 = g_l[2 * K + k], g3 = g_l[3 * K + k];
    const T g_sum = (g0 + g1) + (g2 + g3);
    g_log_weights[k] += g_sum;
    if (g0 == T(0) && g1 == T(0) && g2 == T(0) && g3 == T(0)) continue;
    const T* mu = means + k * D;
    const T* iv = inv_var + k * D;
    T* gm = g_means + k * D;
    T* gv = g_vars + k * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T m = mu[d], v = iv[d];
      const T e0 = (z0[d] - m) * v, e1 = (z1[d] - m) * v, e2 = (z2[d] - m) * v, e3 = (z3[d] - m) * v;
      const T h0 = g0 * e0, h1 = g1 * e1, h2 = g2 * e2, h3 = g3 * e3;
      gm[d] += (h0 + h1) + (h2 + h3);
      gv[d] += T(0.5) * (((h0 * e0 + h1 * e1) + (h2 * e2 + h3 * e3)) - g_sum * v);
      gz0[d] -= h0;
      gz1[d] -= h1;
      gz2[d] -= h2;
      gz3[d] -= h3;
    }
  }
}

// Softmax backward: g_l[k] = r[k] (g_r[k] - sum_j r[j] g_r[j]).
template <typename T>
void softmax_backward(const T* resp, const T* g_resp, int64_t K, T* g_l) {
  T dot = 0;
  for (int64_t k = 0; k < K; ++k) dot += resp[k] * g_resp[k];
  for (int64_t k = 0; k < K; ++k) g_l[k] = resp[k] * (g_resp[k] - dot);
}

// Copies rows [r0, r0 + count) of a (rows, D) matrix into a (4, D) block, zero-filling the
// missing rows, for the last partial block of a caller that cannot pad its input.
template <typename T>
const T* padded_block(const T* src, int64_t count, int64_t D, T* block) {
  if (count == kBlock) return src;
  std::copy(src, src + count * D, block);
  std::fill(block + count * D, block + kBlock * D, T(0));
  return block;
}

}  // namespace cpu
}  // namespace s2m
