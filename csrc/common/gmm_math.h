// Per-component rules of the EM update shared by every backend (CPU, CUDA) so that they
// make identical decisions. Plain C++ with no torch dependency: compiles with g++ and nvcc.
//
// The rules (DESIGN.md section 1, made exact here and mirrored in s2m_ext/reference.py):
//  * variance:   v = max(S2 / Nk + var_floor, kVarMin)    S2 centred at the new mean.
//                kVarMin = eps(T)^2 keeps log-densities and their gradients finite when a
//                component collapses onto identical points with var_floor = 0.
//  * dead:       a component with Nk <= W * eps(T) keeps its previous mean and variance.
//  * log weight: log(Nk) - log(W) if Nk > W * tiny(T), else kLogWeightMin = log(tiny(T)).
//  * W == 0:     a set with no weight keeps all its parameters (inputs are validated in
//                Python; this only keeps the kernels finite when validation is off).
//  * weight 0:   a point of weight 0 (padding rows included) adds exactly 0 to every sum,
//                also where its other factor overflowed to Inf: weighted(w, f), never 0*Inf.
//  * underflow:  a point whose log-densities are all -Inf (farther from every component
//                than the dtype can express) gets uniform responsibilities 1/K (the limit
//                of K equal log-densities) and log-density -Inf: shifted_log_density.
//                As a score, -Inf is saturated at the dtype's limit and passes no gradient
//                (the exact one overflows): scored_point_passes_gradient.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define S2M_HD __host__ __device__ __forceinline__
#else
#define S2M_HD inline
#endif

namespace s2m {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

template <typename T>
struct Limits;

template <>
struct Limits<float> {
  static constexpr float eps = FLT_EPSILON;
  static constexpr float tiny = FLT_MIN;
  static constexpr float var_min = FLT_EPSILON * FLT_EPSILON;
  static constexpr float log_weight_min = -87.33654475f;  // log(FLT_MIN)
};

template <>
struct Limits<double> {
  static constexpr double eps = DBL_EPSILON;
  static constexpr double tiny = DBL_MIN;
  static constexpr double var_min = DBL_EPSILON * DBL_EPSILON;
  static constexpr double log_weight_min = -708.39641853226408;  // log(DBL_MIN)
};

// w * f, exactly 0 where w == 0 whatever f is (0 * Inf would be NaN).
template <typename T>
S2M_HD T weighted(T w, T f) {
  return w == T(0) ? T(0) : w * f;
}

// l - lmax for the softmax over one point's log-densities l with maximum lmax; all 0 (uniform
// responsibilities) where every l is -Inf, instead of -Inf - (-Inf) = NaN.
template <typename T>
S2M_HD T shifted_log_density(T l, T lmax) {
  return lmax == -INFINITY ? T(0) : l - lmax;
}

// Does a scored point with log-density maximum lmax pass gradient to z and the mixture?
template <typename T>
S2M_HD bool scored_point_passes_gradient(T lmax) {
  return lmax != -INFINITY;
}

// Is component k still fitted from data? (Otherwise it keeps its previous mean/variance.)
template <typename T>
S2M_HD bool component_alive(T nk, T total_weight) {
  return total_weight > T(0) && nk > total_weight * Limits<T>::eps;
}

// Does the new log weight depend on Nk? (Otherwise it is clamped or kept.)
template <typename T>
S2M_HD bool log_weight_from_data(T nk, T total_weight) {
  return total_weight > T(0) && nk > total_weight * Limits<T>::tiny;
}

template <typename T>
S2M_HD T updated_log_weight(T nk, T total_weight, T previous) {
  if (!(total_weight > T(0))) return previous;
  return log_weight_from_data(nk, total_weight) ? T(std::log(nk) - std::log(total_weight))
                                                : Limits<T>::log_weight_min;
}

template <typename T>
S2M_HD T floored_variance(T centred_second_moment, T var_floor) {
  const T v = centred_second_moment + var_floor;
  return v > Limits<T>::var_min ? v : Limits<T>::var_min;
}

// True where floored_variance returned the clamp (its gradient is then zero).
template <typename T>
S2M_HD bool variance_clamped(T variance) {
  return variance <= Limits<T>::var_min;
}

// Normalising constant of a diagonal Gaussian component: log pi - 1/2 sum_d log(2 pi v_d).
// Accumulate sum_log_var over d first, then call this.
template <typename T>
S2M_HD T component_log_norm(T log_weight, T sum_log_var, int64_t dims) {
  return log_weight - T(0.5) * (T(kLog2Pi) * T(dims) + sum_log_var);
}

}  // namespace s2m
