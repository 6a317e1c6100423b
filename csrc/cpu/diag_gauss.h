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

#ifndef S2M_CPU_LEVEL
#error "the CPU kernels compile through a level file (csrc/cpu/level_*.cpp), which names S2M_CPU_LEVEL"
#endif

// Each level's copy of these inline functions lives in its own namespace: one shared name
// would let the linker keep a single copy, perhaps one built for an instruction set this
// CPU lacks.
namespace s2m {
namespace cpu {
namespace S2M_CPU_LEVEL {

constexpr int64_t kBlock = 4;

inline int64_t round_up_to_block(int64_t rows) { return (rows + kBlock - 1) / kBlock * kBlock; }

// v = m 2^e with m in [0.5, 1) for a positive v: the exponent field for normal numbers (libm's
// frexp, an out-of-line call, cost 4% of the forward), libm for the rest.
inline float mantissa_exponent(float v, int* e) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  const uint32_t field = (bits >> 23) & 0xffu;
  if (field == 0u || field == 0xffu) return std::frexp(v, e);
  *e = int(field) - 126;
  return __builtin_bit_cast(float, (bits & 0x807fffffu) | 0x3f000000u);
}

inline double mantissa_exponent(double v, int* e) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, v);
  const uint64_t field = (bits >> 52) & 0x7ffu;
  if (field == 0u || field == 0x7ffu) return std::frexp(v, e);
  *e = int(field) - 1022;
  return __builtin_bit_cast(double, (bits & 0x800fffffffffffffull) | 0x3fe0000000000000ull);
}

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
      prod *= mantissa_exponent(v[d], &e);
      exponents += e;
    }
    total += std::log(prod);
  }
  return total + T(exponents) * T(0.69314718055994530941723212145818);
}

// exp(x) for x <= 0 that vectorises (libm's exp is a scalar call; with its underflow path it
// was 17% of the forward). Cephes' range reduction x = n ln2 + r, |r| <= ln2/2, a polynomial
// (float) or Pade form (double) for e^r, and 2^n built in the exponent bits; within 1 ulp
// (float) / 2 ulp (double) of libm. Clamped at -88 / -709, where n = -127 / -1023 makes the
// exponent field 0: results below about -87.7 / -709.1 are exactly 0, without a branch.
// Needs -fno-trapping-math to vectorise the clamp (setup.py).
inline float exp_nonpositive(float x0) {
  const float x = x0 > -88.0f ? x0 : -88.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float y = ((((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r +
                      4.1665795894E-2f) * r + 1.6666665459E-1f) * r + 5.0000001201E-1f) * (r * r)) +
                  r + 1.0f;
  return y * __builtin_bit_cast(float, (int32_t(n) + 127) << 23);
}

inline double exp_nonpositive(double x0) {
  const double x = x0 > -709.0 ? x0 : -709.0;
  const double n = (x * 1.4426950408889634073599 + 6755399441055744.0) - 6755399441055744.0;
  double r = x - n * 6.93145751953125E-1;
  r = r - n * 1.42860682030941723212E-6;
  const double rr = r * r;
  const double p = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr +
                        9.99999999999999999910E-1);
  const double q = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr +
                    2.27265548208155028766E-1) * rr + 2.00000000000000000009E0;
  return (1.0 + 2.0 * p / (q - p)) * __builtin_bit_cast(double, int64_t(int32_t(n) + 1023) << 52);
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

// For a block of 4 points with log-densities l (4,K): the posteriors exp(l - lse) into resp
// (4,K) if given, and lse[j] = logsumexp_k l[j,k] if lse is given. l is overwritten.
template <typename T>
void block_posteriors(T* l, int64_t K, T* resp, T* lse) {
  T lmax[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) {
    T* lj = l + j * K;
    T m = lj[0];
    for (int64_t k = 1; k < K; ++k) m = lj[k] > m ? lj[k] : m;
    lmax[j] = m;
    for (int64_t k = 0; k < K; ++k) lj[k] = shifted_log_density(lj[k], m);
  }
  T* e = resp != nullptr ? resp : l;
#pragma omp simd
  for (int64_t i = 0; i < kBlock * K; ++i) e[i] = exp_nonpositive(l[i]);
  for (int64_t j = 0; j < kBlock; ++j) {
    T* ej = e + j * K;
    T sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += ej[k];
    if (resp != nullptr) {
      const T inv = T(1) / sum;
      for (int64_t k = 0; k < K; ++k) ej[k] *= inv;
    }
    if (lse != nullptr) lse[j] = lmax[j] + std::log(sum);
  }
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

}  // namespace S2M_CPU_LEVEL
}  // namespace cpu
}  // namespace s2m
