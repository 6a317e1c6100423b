// Per-point math of a diagonal Gaussian mixture on the CPU, torch-free: the E-step and the
// scoring ops both evaluate component log-densities with point_log_densities and
// backpropagate through them with point_log_densities_backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/gmm_math.h"

namespace s2m {
namespace cpu {

// Per-component constants of a mixture: inv_var (K,D) = 1/v and log_norm (K) = log pi - 1/2
// sum_d log(2 pi v). Computed once per mixture (per EM iteration), used for every point.
template <typename T>
void precompute_components(const T* log_weights, const T* variances, int64_t K, int64_t D,
                           T* inv_var, T* log_norm) {
  for (int64_t k = 0; k < K; ++k) {
    const T* v = variances + k * D;
    T* iv = inv_var + k * D;
    T sum_log = 0;
    for (int64_t d = 0; d < D; ++d) {
      iv[d] = T(1) / v[d];
      sum_log += std::log(v[d]);
    }
    log_norm[k] = component_log_norm(log_weights[k], sum_log, D);
  }
}

// l[k] = log_norm[k] - 1/2 sum_d (z_d - mu_kd)^2 / v_kd for one point z (D). Returns
// logsumexp_k l[k] and, if resp is given, writes the posteriors exp(l - lse) there.
template <typename T>
T point_log_densities(const T* z, const T* means, const T* inv_var, const T* log_norm,
                      int64_t K, int64_t D, T* l, T* resp) {
  T lmax = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    const T* mu = means + k * D;
    const T* iv = inv_var + k * D;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const T diff = z[d] - mu[d];
      acc += diff * diff * iv[d];
    }
    l[k] = log_norm[k] - T(0.5) * acc;
    lmax = std::max(lmax, l[k]);
  }
  T sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += std::exp(l[k] - lmax);
  const T lse = lmax + std::log(sum);
  if (resp != nullptr) {
    for (int64_t k = 0; k < K; ++k) resp[k] = std::exp(l[k] - lse);
  }
  return lse;
}

// Reverse of point_log_densities for one point: given g_l[k] = dL/dl[k], accumulate
//   dL/dlog_weight[k] += g_l[k]
//   dL/dmean[k,d]     += g_l[k] e      with e = (z_d - mu_kd) / v_kd
//   dL/dvar[k,d]      += g_l[k] (e^2 - 1/v_kd) / 2
//   dL/dz[d]          -= sum_k g_l[k] e
template <typename T>
void point_log_densities_backward(const T* z, const T* means, const T* inv_var, const T* g_l,
                                  int64_t K, int64_t D, T* g_log_weights, T* g_means,
                                  T* g_vars, T* g_z) {
  for (int64_t k = 0; k < K; ++k) {
    const T gl = g_l[k];
    if (gl == T(0)) continue;
    const T* mu = means + k * D;
    const T* iv = inv_var + k * D;
    T* gm = g_means + k * D;
    T* gv = g_vars + k * D;
    g_log_weights[k] += gl;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T e = (z[d] - mu[d]) * iv[d];
      gm[d] += gl * e;
      gv[d] += T(0.5) * gl * (e * e - iv[d]);
      g_z[d] -= gl * e;
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

}  // namespace cpu
}  // namespace s2m
