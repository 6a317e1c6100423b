// Batched weighted EM for diagonal GMMs on the CPU: one set at a time (the glue in
// em_cpu.cpp runs sets in parallel). Torch-free.
//
// Forward: T iterations of E-step (responsibilities under theta_{t-1}) then M-step
// (theta_t), optionally writing every theta_t to a trajectory. Backward: reverse-mode
// through the iterations from the saved trajectory, recomputing each E-step; memory per
// set O(N*K + K*D + N/kChunkPoints*K*D), never (T,N,K,D). Every pass over points runs in the
// fixed chunks of kernels.h (chunked_sum), on the threads of a PointParallel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/gmm_math.h"
#include "cpu/diag_gauss.h"
#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace s2m {
namespace cpu {
namespace S2M_CPU_LEVEL {

template <typename T>
void copy_params(ConstParams<T> src, Params<T> dst, SetShape s) {
  std::copy(src.log_weights, src.log_weights + s.k, dst.log_weights);
  std::copy(src.means, src.means + s.k * s.d, dst.means);
  std::copy(src.variances, src.variances + s.k * s.d, dst.variances);
}

template <typename T>
void add_params(ConstParams<T> src, Params<T> dst, SetShape s) {
  for (int64_t i = 0; i < s.k; ++i) dst.log_weights[i] += src.log_weights[i];
  for (int64_t i = 0; i < s.k * s.d; ++i) dst.means[i] += src.means[i];
  for (int64_t i = 0; i < s.k * s.d; ++i) dst.variances[i] += src.variances[i];
}

template <typename T>
void zero_params(Params<T> dst, SetShape s) {
  std::fill(dst.log_weights, dst.log_weights + s.k, T(0));
  std::fill(dst.means, dst.means + s.k * s.d, T(0));
  std::fill(dst.variances, dst.variances + s.k * s.d, T(0));
}

// Per-thread scratch of one set problem, reused across the sets a thread handles. The kernels
// read points in whole blocks (rows = N rounded up to kBlock): when N is not a multiple of
// kBlock, the points are copied into padded buffers whose padding rows have x = 0 and weight
// 0 (they add nothing to any sum); otherwise x, w and dL/dx are the op's own tensors.
template <typename T>
struct Workspace {
  std::vector<T> buf;
  std::vector<T> padded;  // x (rows,D), w (rows) and, in the backward, dL/dx (rows,D)
  int64_t rows;  // N rounded up to a whole number of blocks
  const T *x, *w;  // the set's points (rows,D) and weights (rows)
  T* g_x;          // dL/dx (rows,D), accumulated by the backward
  T *resp, *aux_nk, *inv_var, *log_norm, *nk, *s2;
  T* l;  // (kBlock, K) log-densities of a block of points (serial passes)
  T *theta_a, *theta_b, *grad_a, *grad_b;  // param-sized blocks (K + 2KD)
  int64_t chunks;             // point chunks of kChunkPoints rows
  std::vector<T> partials;    // (chunks - 1, K + 2KD) sums of chunks 1.. (chunked_sum)
  std::vector<T> chunk_l;     // (chunks, kBlock, K) each chunk's own block log-densities
  Workspace(SetShape s, bool backward)
      : rows(round_up_to_block(s.n)),
        x(nullptr),
        w(nullptr),
        g_x(nullptr),
        chunks(std::max<int64_t>(1, (rows + kChunkPoints - 1) / kChunkPoints)),
        partials((chunks - 1) * (s.k + 2 * s.k * s.d)),
        chunk_l(chunks * kBlock * s.k) {
    static_assert(kChunkPoints % kBlock == 0, "chunks are whole blocks");
    const int64_t per_point = rows * s.k, kd = s.k * s.d, p = s.k + 2 * kd;
    buf.assign(2 * per_point + kd + (2 + kBlock) * s.k + kd + 4 * p, T(0));
    T* it = buf.data();
    resp = it; it += per_point;
    aux_nk = it; it += per_point;
    inv_var = it; it += kd;
    log_norm = it; it += s.k;
    l = it; it += kBlock * s.k;
    nk = it; it += s.k;
    s2 = it; it += kd;
    theta_a = it; it += p;
    theta_b = it; it += p;
    grad_a = it; it += p;
    grad_b = it;
    if (rows != s.n) padded.assign((backward ? 2 : 1) * rows * s.d + rows, T(0));
  }
  // Points of one set: the inputs themselves, or copies into the padded buffers (whose
  // padding rows stay zero from construction).
  void load_points(const T* x_in, const T* w_in, SetShape s) {
    if (padded.empty()) {
      x = x_in;
      w = w_in;
      return;
    }
    T* xp = padded.data();
    T* wp = xp + rows * s.d;
    std::copy(x_in, x_in + s.n * s.d, xp);
    std::copy(w_in, w_in + s.n, wp);
    x = xp;
    w = wp;
  }
  // Where the backward accumulates dL/dx of one set: the output (N,D) itself, or a padded
  // buffer that the caller copies from.
  void bind_gradient(T* g_out, SetShape s) {
    g_x = padded.empty() ? g_out : padded.data() + rows * s.d + rows;
  }
  static Params<T> as_params(T* block, SetShape s) {
    return {block, block + s.k, block + s.k + s.k * s.d};
  }
};

// The calling thread's floating-point mode (x86 MXCSR: rounding, FTZ, DAZ), read on one thread
// and set on another for a scope: a set's point chunks run on pool threads in the mode of the
// thread that called the kernel, so that where they run does not change what they compute.
class FpMode {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FpMode() : mode_(_mm_getcsr()) {}
  // This mode with subnormal results and inputs flushed to zero (FTZ | DAZ).
  FpMode flushing_subnormals() const {
    FpMode m = *this;
    m.mode_ |= 0x8040u;
    return m;
  }
  class Scope {
   public:
    explicit Scope(const FpMode& m) : saved_(_mm_getcsr()) { _mm_setcsr(m.mode_); }
    ~Scope() { _mm_setcsr(saved_); }

   private:
    unsigned int saved_;
  };

 private:
  unsigned int mode_;
#else
  FpMode flushing_subnormals() const { return *this; }
  class Scope {
   public:
    explicit Scope(const FpMode&) {}
  };
#endif
};

// Runs f(begin, end) over chunks [0, chunks): inline, or on par's threads, each in the floating-
// point mode of the calling thread.
template <class F>
void for_chunks(const PointParallel& par, int64_t chunks, F& f) {
  if (par.for_range == nullptr || chunks <= 1) {
    f(int64_t(0), chunks);
    return;
  }
  struct Job {
    F* f;
    FpMode mode;
  } job{&f, FpMode()};
  par.for_range(chunks, &job, [](void* ctx, int64_t begin, int64_t end) {
    const Job& j = *static_cast<const Job*>(ctx);
    const FpMode::Scope scope(j.mode);
    (*j.f)(begin, end);
  });
}

// dst (size elements) += the sums over the set's padded points, chunk by chunk in the fixed
// order of kernels.h: body(c, p0, p1, acc) adds the sums over rows [p0, p1) of chunk c to
// acc (chunk 0: dst itself; chunk c > 0: a zeroed partial) and may write per-point outputs of
// those rows. Chunks run on par's threads.
template <typename T, class Body>
void chunked_sum(const PointParallel& par, Workspace<T>& ws, int64_t size, T* dst,
                 const Body& body) {
  T* parts = ws.partials.data();
  std::fill(parts, parts + (ws.chunks - 1) * size, T(0));
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = c * kChunkPoints, p1 = std::min(ws.rows, p0 + kChunkPoints);
      body(c, p0, p1, c == 0 ? dst : parts + (c - 1) * size);
    }
  };
  for_chunks(par, ws.chunks, run);
  for (int64_t c = 1; c < ws.chunks; ++c) {
    const T* part = parts + (c - 1) * size;
    for (int64_t i = 0; i < size; ++i) dst[i] += part[i];
  }
}

template <typename T>
T total_weight(const T* w, int64_t n) {
  T total = 0;
  for (int64_t i = 0; i < n; ++i) total += w[i];
  return total;
}

// E-step under theta over the padded points of ws: responsibilities into ws.resp (rows,K)
// if want_resp, and, if want_loglik, the weighted log-likelihood sum_n w_n log p(x_n) (else
// 0: the log per point is skipped where nobody reads it). Leaves inv_var and log_norm of
// theta in ws.
template <typename T>
T e_step(SetShape s, ConstParams<T> theta, Workspace<T>& ws, bool want_resp, bool want_loglik,
         const PointParallel& par) {
  const int64_t D = s.d, K = s.k;
  precompute_components(theta.log_weights, theta.variances, K, D, ws.inv_var, ws.log_norm);
  T loglik = 0;
  chunked_sum(par, ws, 1, &loglik, [&](int64_t c, int64_t p0, int64_t p1, T* acc) {
    T* l = ws.chunk_l.data() + c * kBlock * K;
    T lse[kBlock];
    for (int64_t n0 = p0; n0 < p1; n0 += kBlock) {
      block_log_densities(ws.x + n0 * D, theta.means, ws.inv_var, ws.log_norm, K, D, l);
      block_posteriors(l, K, want_resp ? ws.resp + n0 * K : nullptr, want_loglik ? lse : nullptr);
      if (!want_loglik) continue;
      for (int64_t j = 0; j < kBlock; ++j) {
        if (ws.w[n0 + j] != T(0)) *acc += ws.w[n0 + j] * lse[j];
      }
    }
  });
  return loglik;
}

// Nk = sum_n w_n r_nk. Forward and backward both call this so that they take the same
// alive/dead decisions bit for bit.
template <typename T>
void component_mass(SetShape s, Workspace<T>& ws, const PointParallel& par) {
  std::fill(ws.nk, ws.nk + s.k, T(0));
  chunked_sum(par, ws, s.k, ws.nk, [&](int64_t, int64_t p0, int64_t p1, T* nk) {
    for (int64_t n = p0; n < p1; ++n) {
      if (ws.w[n] == T(0)) continue;
      for (int64_t k = 0; k < s.k; ++k) nk[k] += ws.w[n] * ws.resp[n * s.k + k];
    }
  });
}

// q[j] = w r for the 4 points of a block and one component; false if all are zero.
template <typename T>
bool block_masses(const Workspace<T>& ws, int64_t n0, int64_t k, int64_t K, T* q) {
  bool any = false;
  for (int64_t j = 0; j < kBlock; ++j) {
    q[j] = weighted(ws.w[n0 + j], ws.resp[(n0 + j) * K + k]);
    any = any || q[j] != T(0);
  }
  return any;
}

// M-step from ws.resp: theta_next from the weighted moments, theta_prev for dead components.
template <typename T>
void m_step(T total_w, SetShape s, ConstParams<T> prev, Params<T> next, T var_floor,
            Workspace<T>& ws, const PointParallel& par) {
  const int64_t D = s.d, K = s.k;
  component_mass(s, ws, par);
  // Weighted first moment S1 (into next.means), then the means of alive components.
  std::fill(next.means, next.means + K * D, T(0));
  chunked_sum(par, ws, K * D, next.means, [&](int64_t, int64_t p0, int64_t p1, T* s1_all) {
    for (int64_t n0 = p0; n0 < p1; n0 += kBlock) {
      const T *x0 = ws.x + n0 * D, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D;
      for (int64_t k = 0; k < K; ++k) {
        T q[kBlock];
        if (!block_masses(ws, n0, k, K, q)) continue;
        T* s1 = s1_all + k * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) s1[d] += (q[0] * x0[d] + q[1] * x1[d]) + (q[2] * x2[d] + q[3] * x3[d]);
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    T* mu = next.means + k * D;
    if (component_alive(ws.nk[k], total_w)) {
      for (int64_t d = 0; d < D; ++d) mu[d] /= ws.nk[k];
    } else {
      std::copy(prev.means + k * D, prev.means + (k + 1) * D, mu);
    }
  }
  // Centred second moment at the new means (never E[x^2] - mu^2).
  std::fill(ws.s2, ws.s2 + K * D, T(0));
  chunked_sum(par, ws, K * D, ws.s2, [&](int64_t, int64_t p0, int64_t p1, T* s2_all) {
    for (int64_t n0 = p0; n0 < p1; n0 += kBlock) {
      const T *x0 = ws.x + n0 * D, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D;
      for (int64_t k = 0; k < K; ++k) {
        T q[kBlock];
        if (!component_alive(ws.nk[k], total_w) || !block_masses(ws, n0, k, K, q)) continue;
        const T* mu = next.means + k * D;
        T* s2 = s2_all + k * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const T m = mu[d];
          const T e0 = x0[d] - m, e1 = x1[d] - m, e2 = x2[d] - m, e3 = x3[d] - m;
          s2[d] += (weighted(q[0], e0 * e0) + weighted(q[1], e1 * e1)) + (weighted(q[2], e2 * e2) + weighted(q[3], e3 * e3));
        }
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    T* var = next.variances + k * D;
    if (component_alive(ws.nk[k], total_w)) {
      for (int64_t d = 0; d < D; ++d) var[d] = floored_variance(ws.s2[k * D + d] / ws.nk[k], var_floor);
    } else {
      std::copy(prev.variances + k * D, prev.variances + (k + 1) * D, var);
    }
    next.log_weights[k] = updated_log_weight(ws.nk[k], total_w, prev.log_weights[k]);
  }
}

// T iterations of EM for one set. traj.steps is n_iter + 1 (every theta_t kept) or 1 (only
// the final parameters, written to step 0).
template <typename T>
FitReport em_forward_set(const T* x, const T* w, SetShape s, ConstParams<T> init,
                         FitSettings cfg, Trajectory<T> traj, Workspace<T>& ws,
                         const PointParallel& par) {
  const bool keep = traj.steps > 1;
  const T var_floor = T(cfg.var_floor);
  const T total_w = total_weight(w, s.n);
  ws.load_points(x, w, s);
  // Mean log-likelihood; a set without weight reports 0 (only reachable with validation off).
  auto mean_ll = [&](T sum) { return total_w > T(0) ? double(sum / total_w) : 0.0; };

  Params<T> cur = Workspace<T>::as_params(ws.theta_a, s);
  Params<T> next = Workspace<T>::as_params(ws.theta_b, s);
  copy_params(init, cur, s);
  if (keep) copy_params(init, traj.at(0), s);

  FitReport report{0.0, 0, false};
  double ll_prev = -std::numeric_limits<double>::infinity();
  double ll_theta1 = 0.0;  // K = 1: every iterate from theta_1 on is theta_1
  for (int64_t t = 1; t <= cfg.n_iter; ++t) {
    double ll;
    if (s.k == 1 && t >= 2) {
      // One component: r = 1, so the M-step gives theta_1 again whatever theta_{t-1} is.
      if (t == 2) ll_theta1 = mean_ll(e_step(s, ConstParams<T>(cur), ws, false, true, par));
      ll = ll_theta1;
    } else {
      // The log-likelihood of an iteration only feeds the tol test.
      ll = mean_ll(e_step(s, ConstParams<T>(cur), ws, true, cfg.tol > 0, par));
      m_step(total_w, s, ConstParams<T>(cur), next, var_floor, ws, par);
      std::swap(cur, next);
    }
    report.n_iter = t;
    if (keep) copy_params(ConstParams<T>(cur), traj.at(t), s);
    if (cfg.tol > 0 && std::abs(ll - ll_prev) < cfg.tol) {
      report.converged = true;
      break;
    }
    ll_prev = ll;
  }
  if (keep) {
    for (int64_t t = report.n_iter + 1; t < traj.steps; ++t) copy_params(ConstParams<T>(cur), traj.at(t), s);
  } else {
    copy_params(ConstParams<T>(cur), traj.at(0), s);
  }
  report.loglik = (s.k == 1 && report.n_iter >= 2)
                      ? ll_theta1
                      : mean_ll(e_step(s, ConstParams<T>(cur), ws, false, true, par));
  return report;
}

// Reverse of one M-step theta_t = M(x, w, r(theta_{t-1})) given g = dL/dtheta_t and the
// responsibilities in ws.resp (ws.nk must hold their component_mass). Adds the direct
// contributions to ws.g_x (rows,D) and g_w (N) and writes dL/dl (rows,K) into ws.aux_nk.
template <typename T>
void m_step_backward(T total_w, SetShape s, ConstParams<T> theta_t, ConstParams<T> g,
                     Workspace<T>& ws, T* g_w, const PointParallel& par) {
  const int64_t D = s.d, K = s.k;
  // Effective upstream gradients: dead components pass theirs back unchanged (handled by
  // the caller), a clamped variance has no gradient.
  Params<T> geff = Workspace<T>::as_params(ws.grad_b, s);  // scratch: caller refills grad_b
  for (int64_t k = 0; k < K; ++k) {
    const bool alive = component_alive(ws.nk[k], total_w);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t i = k * D + d;
      geff.means[i] = alive ? g.means[i] : T(0);
      geff.variances[i] = (alive && !variance_clamped(theta_t.variances[i])) ? g.variances[i] : T(0);
    }
  }
  // Pass over points: pa[n,k] = sum_d (gmu + gv*delta)*delta with delta = x - mu_t, the
  // centred second moment S2 (recomputed exactly), and the direct gradient of x.
  T* pa = ws.aux_nk;
  std::fill(ws.s2, ws.s2 + K * D, T(0));
  chunked_sum(par, ws, K * D, ws.s2, [&](int64_t, int64_t p0, int64_t p1, T* s2_all) {
    for (int64_t n0 = p0; n0 < p1; n0 += kBlock) {
      const T *x0 = ws.x + n0 * D, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D;
      T *gx0 = ws.g_x + n0 * D, *gx1 = gx0 + D, *gx2 = gx1 + D, *gx3 = gx2 + D;
      for (int64_t k = 0; k < K; ++k) {
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        if (component_alive(ws.nk[k], total_w)) {
          T q[kBlock];
          block_masses(ws, n0, k, K, q);
          const T inv_nk = T(1) / ws.nk[k];
          const T c0 = q[0] * inv_nk, c1 = q[1] * inv_nk, c2 = q[2] * inv_nk, c3 = q[3] * inv_nk;
          const T* mu = theta_t.means + k * D;
          const T* gm = geff.means + k * D;
          const T* gv = geff.variances + k * D;
          T* s2 = s2_all + k * D;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t d = 0; d < D; ++d) {
            const T m = mu[d], ga = gm[d], gb = gv[d];
            const T e0 = x0[d] - m, e1 = x1[d] - m, e2 = x2[d] - m, e3 = x3[d] - m;
            a0 += (ga + gb * e0) * e0;
            a1 += (ga + gb * e1) * e1;
            a2 += (ga + gb * e2) * e2;
            a3 += (ga + gb * e3) * e3;
            s2[d] += (weighted(q[0], e0 * e0) + weighted(q[1], e1 * e1)) + (weighted(q[2], e2 * e2) + weighted(q[3], e3 * e3));
            gx0[d] += weighted(c0, ga + T(2) * gb * e0);
            gx1[d] += weighted(c1, ga + T(2) * gb * e1);
            gx2[d] += weighted(c2, ga + T(2) * gb * e2);
            gx3[d] += weighted(c3, ga + T(2) * gb * e3);
          }
        }
        pa[n0 * K + k] = a0;
        pa[(n0 + 1) * K + k] = a1;
        pa[(n0 + 2) * K + k] = a2;
        pa[(n0 + 3) * K + k] = a3;
      }
    }
  });
  // dL/dq[n,k] = (a_k + pa[n,k] - sum_d gv_kd S2_kd / Nk) / Nk with a_k the log weight's gradient.
  T w_term = 0;  // d(-log W)/dw_n, the same for every n
  for (int64_t k = 0; k < K; ++k) {
    const T nk = ws.nk[k];
    const bool alive = component_alive(nk, total_w);
    const bool lw_live = log_weight_from_data(nk, total_w);
    T c = 0;
    if (alive) {
      const T* gv = geff.variances + k * D;
      const T* s2 = ws.s2 + k * D;
      for (int64_t d = 0; d < D; ++d) c += gv[d] * s2[d];
      c /= nk;
    }
    const T a = lw_live ? g.log_weights[k] : T(0);
    if (lw_live) w_term += a / total_w;
    for (int64_t n = 0; n < ws.rows; ++n) {
      T gq = 0;
      if (alive) gq += pa[n * K + k] - c;
      if (lw_live) gq += a;
      pa[n * K + k] = (alive || lw_live) ? gq / nk : T(0);
    }
  }
  // Through q = w r: dL/dw_n += sum_k r g_q; dL/dr = w g_q; then the softmax.
  T* g_resp = ws.l;  // K scratch
  for (int64_t n = 0; n < ws.rows; ++n) {
    T* gq = pa + n * K;
    const T* r = ws.resp + n * K;
    T gw = -w_term;
    for (int64_t k = 0; k < K; ++k) {
      gw += weighted(r[k], gq[k]);
      g_resp[k] = weighted(ws.w[n], gq[k]);
    }
    if (n < s.n) g_w[n] += gw;
    softmax_backward(r, g_resp, K, gq);  // in place: pa becomes dL/dl
  }
}

// Gradients of L = <g_traj, trajectory> with respect to x, w and the initial parameters.
// n_used: iterations this set ran (its trajectory is constant after it).
template <typename T>
void em_backward_set(const T* x, const T* w, SetShape s, int64_t n_used, T var_floor,
                     Trajectory<const T> traj, Trajectory<const T> g_traj, bool has_g_traj,
                     T* g_x, T* g_w, Params<T> g_init, Workspace<T>& ws,
                     const PointParallel& par) {
  (void)var_floor;  // the floor enters only through S2 + floor; its derivative is not needed
  const T total_w = total_weight(w, s.n);
  ws.load_points(x, w, s);
  ws.bind_gradient(g_x, s);
  std::fill(ws.g_x, ws.g_x + ws.rows * s.d, T(0));
  std::fill(g_w, g_w + s.n, T(0));
  Params<T> g = Workspace<T>::as_params(ws.grad_a, s);
  zero_params(g, s);
  auto add_step_grad = [&](int64_t t, Params<T> dst) {
    if (has_g_traj) add_params(ConstParams<T>(g_traj.at(t)), dst, s);
  };
  // The trajectory is constant after n_used: gradients on those copies all reach theta_{n_used}.
  for (int64_t t = n_used; t < traj.steps; ++t) add_step_grad(t, g);
  if (n_used == 0) {
    copy_params(ConstParams<T>(g), g_init, s);
    std::fill(g_x, g_x + s.n * s.d, T(0));
    return;
  }

  const bool single = s.k == 1;
  // K = 1: every step is the same map of (x, w), independent of theta_{t-1} (r = 1 and
  // softmax has zero Jacobian), so one M-step backward with the summed gradient is exact.
  if (single) {
    for (int64_t t = 1; t < n_used; ++t) add_step_grad(t, g);
  }
  const int64_t t_last = single ? 1 : n_used;
  for (int64_t t = t_last; t >= 1; --t) {
    ConstParams<T> prev(traj.at(t - 1));
    ConstParams<T> theta_t(traj.at(t));
    e_step(s, prev, ws, true, false, par);  // also leaves inv_var of theta_{t-1} in ws
    component_mass(s, ws, par);
    m_step_backward(total_w, s, theta_t, ConstParams<T>(g), ws, g_w, par);

    Params<T> g_prev = Workspace<T>::as_params(ws.grad_b, s);
    zero_params(g_prev, s);
    for (int64_t k = 0; k < s.k; ++k) {
      if (!(total_w > T(0))) g_prev.log_weights[k] += g.log_weights[k];
      if (!component_alive(ws.nk[k], total_w)) {
        for (int64_t d = 0; d < s.d; ++d) {
          g_prev.means[k * s.d + d] += g.means[k * s.d + d];
          g_prev.variances[k * s.d + d] += g.variances[k * s.d + d];
        }
      }
    }
    if (!single) {
      // g_prev is one contiguous (K + 2KD) block, summed over chunks like any other moment.
      chunked_sum(par, ws, s.k + 2 * s.k * s.d, g_prev.log_weights,
                  [&](int64_t, int64_t p0, int64_t p1, T* acc) {
                    const Params<T> ga = Workspace<T>::as_params(acc, s);
                    for (int64_t n0 = p0; n0 < p1; n0 += kBlock) {
                      block_log_densities_backward(ws.x + n0 * s.d, prev.means, ws.inv_var,
                                                   ws.aux_nk + n0 * s.k, s.k, s.d, ga.log_weights,
                                                   ga.means, ga.variances, ws.g_x + n0 * s.d);
                    }
                  });
    }
    add_step_grad(t - 1, g_prev);
    copy_params(ConstParams<T>(g_prev), g, s);
  }
  copy_params(ConstParams<T>(g), g_init, s);
  if (ws.g_x != g_x) std::copy(ws.g_x, ws.g_x + s.n * s.d, g_x);
}

}  // namespace S2M_CPU_LEVEL
}  // namespace cpu
}  // namespace s2m
