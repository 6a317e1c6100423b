// Fused batched EM for diagonal GMMs on the GPU: forward (T iterations in one launch) and the
// analytic backward (T iterations in reverse in one launch). Torch-free.
//
// Map of this file (the math and rules of csrc/cpu/em_set.h and csrc/common/gmm_math.h):
//   e_step()              responsibilities and log-likelihood under theta   (cpu: e_step)
//     MahalanobisTerm, posteriors()                     its per-(n,k) sums and the softmax
//   m_step()              theta_next from the responsibilities              (cpu: m_step)
//     component_mass(), WeightedMeanTerm, VarianceTerm  Nk, the means, the centred variances
//   em_forward_kernel     the iteration loop, tol stop, K = 1 shortcut       (cpu: em_forward_set)
//   m_step_backward()     reverse of one M-step, through q = w r and the softmax
//                                                                            (cpu: m_step_backward)
//   accumulate_grad_x(), LogDensityGradTerm
//                         reverse of the E-step into x and theta_{t-1}       (cpu: em_backward_set)
//   em_backward_kernel    the reverse loop over the trajectory               (cpu: em_backward_set)
//
// Work split inside a block (one block = one set): the reductions of EM go over d for each
// (point, component) pair, or over points for each (component, dim) pair.
//   reduce_over_d   items (n, chunk of kEmKC components, d-slice); partial sums per d-slice
//                   are added in slice order by the consumer.
//   reduce_over_n   items (chunk of kEmKC components, VEC dims, n-group); each n-group sums
//                   its points in order, then the groups are added in order.
// Both orders depend on (N, D, K) only, so results are the same run to run, and the forward and
// backward kernels compute bit-identical responsibilities (and hence alive/dead decisions).
#include "cuda/em_kernels.cuh"

#include <algorithm>

#include "common/gmm_math.h"
#include "cuda/device_common.cuh"

namespace s2m {
namespace cuda {
namespace {

constexpr int kKC = kEmKC;
constexpr int kMaxSlices = 8;  // d-slices of reduce_over_d
constexpr int kEmNP = 2;       // points per register tile of reduce_over_d
constexpr int kMaxGroups = 8;  // n-groups of reduce_over_n
constexpr int kScalarBytes = 64;
// Float EM kernels run two blocks of kEmThreads per SM (at most 128 registers a thread); double
// keeps one (its register tiles are twice the size), and so does the all-global fallback (with
// 64-bit addresses for every array it would spill under 128 registers).
template <typename T, int kPlacement>
constexpr int kEmMinBlocks = sizeof(T) == 4 && kPlacement != int(Placement::kAllGlobal) ? 2 : 1;

// Block-wide scalars at the start of dynamic shared memory.
template <typename T>
struct Scalars {
  T total_weight;
  T loglik;  // sum_n w_n log p(x_n) of the last E-step
  T w_term;  // backward: d(-log W)/dw_n
};

// Element offsets (in T) of one set's arrays, from the base of its array region.
struct EmLayout {
  int placement;   // Placement
  int vec;         // dims per vector access (max_vec<T>() if D allows, else 1)
  int kp;          // K rounded up to kKC: row stride of the (N, K) arrays
  int ds;          // d-slices of reduce_over_d
  int groups;      // n-groups of reduce_over_n
  int dp;          // row stride of x in shared memory (bank-conflict padding)
  int64_t smem_bytes;
  int64_t ws_per_set;  // elements per set in the global workspace (kAllGlobal)
  int64_t w, resp, lpart, pn, gl, gw;                 // per point
  int64_t theta_a, theta_b, tt, g_a, g_b, geff, s2;  // per component (param blocks: lw, mu, var)
  int64_t iv, lognorm, nk, c, partial;
  int64_t x;       // only with kAllShared
  int64_t mu_off, var_off;  // offsets of mu and var inside a param block
};

template <typename T>
EmLayout make_layout(int64_t N, int64_t D, int64_t K, bool backward, int64_t max_smem) {
  EmLayout L{};
  const int64_t align = 16 / int64_t(sizeof(T));
  L.vec = D % max_vec<T>() == 0 ? max_vec<T>() : 1;
  L.kp = int(round_up(size_t(K), kKC));
  const int64_t nkc = L.kp / kKC, ndv = D / L.vec;
  const int64_t point_tiles = (N + kEmNP - 1) / kEmNP;
  const int64_t tiles = std::max<int64_t>(1, point_tiles * nkc);
  L.ds = int(std::max<int64_t>(1, std::min<int64_t>({kEmThreads / tiles, ndv, kMaxSlices})));
  const int64_t items = nkc * ndv;
  L.groups = items >= kEmThreads ? 1 : int(std::min<int64_t>(kEmThreads / items, kMaxGroups));
  // Lanes read rows n, n+1, ... at one column: a row stride of dp elements with
  // dp = vec (mod one bank period) puts them in distinct banks.
  const int64_t period = 128 / int64_t(sizeof(T));
  int64_t dp = D;
  while (dp % period != L.vec % period) dp += L.vec;
  L.dp = int(dp);

  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t at = off;
    off += int64_t(round_up(size_t(std::max<int64_t>(n, 1)), size_t(align)));
    return at;
  };
  const int64_t KD = K * D;
  L.mu_off = int64_t(round_up(size_t(K), size_t(align)));
  L.var_off = L.mu_off + int64_t(round_up(size_t(KD), size_t(align)));
  const int64_t param_block = L.var_off + KD;
  L.w = take(N);
  L.resp = take(N * L.kp);
  L.lpart = take(int64_t(L.ds) * N * L.kp);
  L.pn = take(N);
  L.theta_a = take(param_block);
  if (backward) {
    L.gl = take(N * L.kp);
    L.gw = take(N);
    L.tt = take(param_block);
    L.g_a = take(param_block);
    L.g_b = take(param_block);
    L.geff = take(param_block);
    L.s2 = take(KD);
    L.c = take(K);
  } else {
    L.theta_b = take(param_block);
  }
  L.iv = take(KD);
  L.lognorm = take(K);
  L.nk = take(K);
  L.partial = take((backward ? 2 : 1) * int64_t(L.groups) * KD);
  const int64_t arrays = off;
  const int64_t x_elems = N * L.dp;
  if (kScalarBytes + (arrays + x_elems) * int64_t(sizeof(T)) <= max_smem) {
    L.placement = int(Placement::kAllShared);
    L.x = arrays;
    L.smem_bytes = kScalarBytes + (arrays + x_elems) * int64_t(sizeof(T));
  } else if (kScalarBytes + arrays * int64_t(sizeof(T)) <= max_smem) {
    L.placement = int(Placement::kXGlobal);
    L.smem_bytes = kScalarBytes + arrays * int64_t(sizeof(T));
  } else {
    L.placement = int(Placement::kAllGlobal);
    L.smem_bytes = kScalarBytes;
    L.ws_per_set = arrays;
  }
  return L;
}

// ----------------------------------------------------------------------------- set context
template <typename T>
struct Params {
  T* lw;   // (K)
  T* mu;   // (K, D)
  T* var;  // (K, D)
};

template <typename T>
S2M_DEV Params<T> params_at(T* block, const EmLayout& L) {
  return {block, block + L.mu_off, block + L.var_off};
}

// One set's sizes, inputs and scratch, wherever they live.
template <typename T>
struct SetCtx {
  int N, D, K, kp, ds, groups;
  const T* x;  // row n at x + n * ldx (shared or global memory)
  int ldx;
  const T* w;  // (N)
  T* resp;     // (N, kp) posteriors (or log-densities after a loglik-only E-step)
  T* lpart;    // (ds, N, kp) partial sums over d-slices
  T* pn;       // (N) w_n * lse_n
  T* iv;       // (K, D) 1 / v of the current E-step's parameters
  T* lognorm;  // (K)
  T* nk;       // (K) component masses
  T* partial;  // (outputs, groups, K * D)
  Scalars<T>* scal;
};

S2M_DEV int tid() { return int(threadIdx.x); }
S2M_DEV int nthreads() { return int(blockDim.x); }
S2M_DEV int warp_id() { return int(threadIdx.x) / kWarpSize; }
S2M_DEV int lane_id() { return int(threadIdx.x) % kWarpSize; }
S2M_DEV int nwarps() { return int(blockDim.x) / kWarpSize; }

template <typename T>
S2M_DEV void copy_elems(const T* src, T* dst, int n) {
  for (int i = tid(); i < n; i += nthreads()) dst[i] = src[i];
}

// Parameters of set b at step t of a (steps, B, K[, D]) trajectory.
template <typename T>
struct TrajRef {
  T* lw;
  T* mu;
  T* var;
  int64_t B, K, D, b;
  S2M_DEV int64_t at_k(int64_t t) const { return traj_offset(t, B, b, K); }
  S2M_DEV int64_t at_kd(int64_t t) const { return traj_offset(t, B, b, K * D); }
};

template <typename T, typename P>
S2M_DEV void store_params(const Params<T>& src, const TrajRef<P>& traj, int64_t t) {
  const int K = int(traj.K), KD = int(traj.K * traj.D);
  copy_elems<T>(src.lw, traj.lw + traj.at_k(t), K);
  copy_elems<T>(src.mu, traj.mu + traj.at_kd(t), KD);
  copy_elems<T>(src.var, traj.var + traj.at_kd(t), KD);
}

template <typename T>
S2M_DEV void load_params(const TrajRef<const T>& traj, int64_t t, const Params<T>& dst) {
  const int K = int(traj.K), KD = int(traj.K * traj.D);
  copy_elems<T>(traj.lw + traj.at_k(t), dst.lw, K);
  copy_elems<T>(traj.mu + traj.at_kd(t), dst.mu, KD);
  copy_elems<T>(traj.var + traj.at_kd(t), dst.var, KD);
}

// ----------------------------------------------------------------------------- reductions
// out[(slice * N + n) * kp + k] = sum over d in the slice of term(x[n, d], k, d).
// A thread's item is a register tile of kEmNP points (n and n + ceil(N / kEmNP), ...) x kKC
// components over one d-slice: each x vector is used kKC times and each parameter vector
// kEmNP times. Components past K (the tile's padding) read row K - 1, so that the inner loop
// has no per-component test; their sums land in the padding columns, which nothing reads.
template <typename T, int VEC, class Term>
S2M_DEV void reduce_over_d(const SetCtx<T>& s, const Term& term, T* out) {
  const int nkc = s.kp / kKC, ndv = s.D / VEC;
  const int nh = (s.N + kEmNP - 1) / kEmNP;
  const int items = nh * nkc * s.ds;
  for (int it = tid(); it < items; it += nthreads()) {
    const int n0 = it % nh, rest = it / nh, kc = rest % nkc, slice = rest / nkc;
    const int dv0 = slice * ndv / s.ds, dv1 = (slice + 1) * ndv / s.ds;
    const int k0 = kc * kKC;
    int kr[kKC];
#pragma unroll
    for (int j = 0; j < kKC; ++j) kr[j] = k0 + j < s.K ? k0 + j : s.K - 1;
    const T* xr[kEmNP];
#pragma unroll
    for (int p = 0; p < kEmNP; ++p) {
      const int n = n0 + p * nh;
      xr[p] = s.x + (n < s.N ? n : n0) * s.ldx;
    }
    T acc[kEmNP][kKC];
#pragma unroll
    for (int p = 0; p < kEmNP; ++p)
#pragma unroll
      for (int j = 0; j < kKC; ++j) acc[p][j] = T(0);
#pragma unroll 1
    for (int dv = dv0; dv < dv1; ++dv) {
      Vec<T, VEC> xv[kEmNP];
#pragma unroll
      for (int p = 0; p < kEmNP; ++p) xv[p] = load_vec<T, VEC>(xr[p] + dv * VEC);
#pragma unroll
      for (int j = 0; j < kKC; ++j) term.template tile<kEmNP>(acc, j, xv, kr[j], dv * VEC);
    }
#pragma unroll
    for (int p = 0; p < kEmNP; ++p) {
      const int n = n0 + p * nh;
      if (n >= s.N) continue;
      T* o = out + (int64_t(slice) * s.N + n) * s.kp + k0;
#pragma unroll
      for (int j = 0; j < kKC; ++j) o[j] = acc[p][j];
    }
  }
}

// For every (k, d): sums[o] = sum_n term_o(row_n, x[n, d], k, d), then term.finish(k, d, sums).
// Ends with a barrier.
template <typename T, int VEC, int NOUT, class Term>
S2M_DEV void reduce_over_n(const SetCtx<T>& s, const Term& term) {
  const int nkc = s.kp / kKC, ndv = s.D / VEC, items = nkc * ndv, G = s.groups;
  const int KD = s.K * s.D;
  for (int slot = tid(); slot < items * G; slot += nthreads()) {
    const int item = slot % items, g = slot / items;
    const int d0 = (item % ndv) * VEC, k0 = (item / ndv) * kKC;
    const typename Term::Item st = term.begin(k0, d0);
    T acc[NOUT][kKC][VEC];
#pragma unroll
    for (int o = 0; o < NOUT; ++o)
#pragma unroll
      for (int j = 0; j < kKC; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[o][j][v] = T(0);
    for (int n = g; n < s.N; n += G) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(s.x + int64_t(n) * s.ldx + d0);
      T row[kKC];
      term.row(n, k0, row);
      term.accumulate(st, row, xv, acc);
    }
#pragma unroll
    for (int o = 0; o < NOUT; ++o)
#pragma unroll
      for (int j = 0; j < kKC; ++j)
        if (k0 + j < s.K) {
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            s.partial[(int64_t(o) * G + g) * KD + (k0 + j) * s.D + d0 + v] = acc[o][j][v];
        }
  }
  __syncthreads();
  for (int i = tid(); i < KD; i += nthreads()) {
    T sums[NOUT];
#pragma unroll
    for (int o = 0; o < NOUT; ++o) {
      T total = T(0);
      for (int g = 0; g < G; ++g) total += s.partial[(int64_t(o) * G + g) * KD + i];
      sums[o] = total;
    }
    term.finish(i / s.D, i % s.D, sums);
  }
  __syncthreads();
}

// q[n, k] = w_n r_nk for the KC components from k0 (0 where w_n = 0, as the CPU skips them).
template <typename T>
S2M_DEV void weighted_resp_row(const SetCtx<T>& s, int n, int k0, T (&q)[kKC]) {
  load_row<T, kKC>(s.resp + int64_t(n) * s.kp + k0, q);
  const T wn = s.w[n];
#pragma unroll
  for (int j = 0; j < kKC; ++j) q[j] = wn != T(0) ? wn * q[j] : T(0);
}

// ----------------------------------------------------------------------------- E-step
// Per-component constants of theta: iv = 1 / v, lognorm = log pi - 1/2 sum_d log(2 pi v).
template <typename T>
S2M_DEV void precompute_components(const SetCtx<T>& s, const Params<T>& theta) {
  for (int i = tid(); i < s.K * s.D; i += nthreads()) s.iv[i] = T(1) / theta.var[i];
  for (int k = warp_id(); k < s.K; k += nwarps()) {
    const T* v = theta.var + int64_t(k) * s.D;
    const T sum_log = warp_ordered_sum<T>(s.D, [&](int d) { return std::log(v[d]); });
    if (lane_id() == 0) s.lognorm[k] = component_log_norm(theta.lw[k], sum_log, int64_t(s.D));
  }
}

// (x - mu)^2 / v for one component over VEC dims, accumulated in order of d.
template <typename T, int VEC>
struct MahalanobisTerm {
  const T* mu;
  const T* iv;
  int D;
  // acc[p][j] += sum over the VEC dims from d of (x_p - mu_k)^2 / v_k, for every point p.
  template <int NP>
  S2M_DEV void tile(T (&acc)[NP][kKC], int j, const Vec<T, VEC> (&xv)[NP], int k, int d) const {
    const Vec<T, VEC> m = load_vec<T, VEC>(mu + k * D + d);
    const Vec<T, VEC> s = load_vec<T, VEC>(iv + k * D + d);
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T diff = xv[p].v[v] - m.v[v];
        acc[p][j] = std::fma(diff * diff, s.v[v], acc[p][j]);  // sass-loop: estep
      }
  }
};

// l[n,k] = lognorm[k] - 1/2 maha[n,k]; posteriors exp(l - lse) into resp (if want_resp, else
// resp keeps l) and w_n * lse_n into pn (0 where w_n = 0). One thread per point.
template <typename T>
S2M_DEV void posteriors(const SetCtx<T>& s, bool want_resp) {
  for (int n = tid(); n < s.N; n += nthreads()) {
    T* r = s.resp + int64_t(n) * s.kp;
    T lmax = neg_inf<T>();
    for (int k = 0; k < s.K; ++k) {
      T maha = T(0);
      for (int sl = 0; sl < s.ds; ++sl) maha += s.lpart[(int64_t(sl) * s.N + n) * s.kp + k];
      const T l = s.lognorm[k] - T(0.5) * maha;
      r[k] = l;
      lmax = l > lmax ? l : lmax;
    }
    // Posteriors as exp(l - lmax) / sum, not exp(l - lse): lse carries a rounding error of
    // eps |lse|, which exp would turn into a relative error of the posteriors.
    T sum = T(0);
    for (int k = 0; k < s.K; ++k) {
      const T e = std::exp(shifted_log_density(r[k], lmax));  // all -inf: uniform
      if (want_resp) r[k] = e;
      sum += e;
    }
    const T lse = lmax + std::log(sum);
    if (want_resp) {
      const T inv = T(1) / sum;
      for (int k = 0; k < s.K; ++k) r[k] *= inv;
      for (int k = s.K; k < s.kp; ++k) r[k] = T(0);
    }
    s.pn[n] = s.w[n] != T(0) ? s.w[n] * lse : T(0);
  }
}

// E-step under theta: posteriors into s.resp (if want_resp), the component constants of theta
// into s.iv / s.lognorm; returns sum_n w_n log p(x_n) (the same value in every thread).
template <typename T, int VEC>
S2M_DEV T e_step(const SetCtx<T>& s, const Params<T>& theta, bool want_resp) {
  precompute_components(s, theta);
  __syncthreads();
  reduce_over_d<T, VEC>(s, MahalanobisTerm<T, VEC>{theta.mu, s.iv, s.D}, s.lpart);
  __syncthreads();
  posteriors(s, want_resp);
  __syncthreads();
  if (warp_id() == 0) {
    const T total = warp_ordered_sum<T>(s.N, [&](int n) { return s.pn[n]; });
    if (lane_id() == 0) s.scal->loglik = total;
  }
  __syncthreads();
  return s.scal->loglik;
}

// ----------------------------------------------------------------------------- M-step
// Nk = sum_n w_n r_nk (cpu: component_mass). Forward and backward call this with bit-identical
// posteriors, so they take the same alive/dead decisions.
template <typename T>
S2M_DEV void component_mass(const SetCtx<T>& s) {
  for (int k = warp_id(); k < s.K; k += nwarps()) {
    const T mass = warp_ordered_sum<T>(s.N, [&](int n) {
      const T wn = s.w[n];
      return wn != T(0) ? wn * s.resp[int64_t(n) * s.kp + k] : T(0);
    });
    if (lane_id() == 0) s.nk[k] = mass;
  }
}

// mu_next = sum_n q x / Nk (alive) or the previous mean (dead).
template <typename T, int VEC>
struct WeightedMeanTerm {
  struct Item {};
  const SetCtx<T>* s;
  Params<T> prev, next;
  T total_w;
  S2M_DEV Item begin(int, int) const { return {}; }
  S2M_DEV void row(int n, int k0, T (&q)[kKC]) const { weighted_resp_row(*s, n, k0, q); }
  S2M_DEV void accumulate(const Item&, const T (&q)[kKC], const Vec<T, VEC>& xv,
                          T (&acc)[1][kKC][VEC]) const {
#pragma unroll
    for (int j = 0; j < kKC; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        acc[0][j][v] = std::fma(q[j], xv.v[v], acc[0][j][v]);  // sass-loop: mstep-mean
  }
  S2M_DEV void finish(int k, int d, const T (&sums)[1]) const {
    const int i = k * s->D + d;
    const T nk = s->nk[k];
    next.mu[i] = component_alive(nk, total_w) ? sums[0] / nk : prev.mu[i];
  }
};

// sum_n q (x - mu)^2 for the KC components from k0 at the given means (centred second moment).
template <typename T, int VEC>
struct CentredMomentTerm {
  struct Item {
    T mu[kKC][VEC];
  };
  const SetCtx<T>* s;
  const T* mu;  // (K, D) the centre
  S2M_DEV Item begin(int k0, int d0) const {
    Item it;
#pragma unroll
    for (int j = 0; j < kKC; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        it.mu[j][v] = k0 + j < s->K ? mu[(k0 + j) * s->D + d0 + v] : T(0);
    return it;
  }
  S2M_DEV void row(int n, int k0, T (&q)[kKC]) const { weighted_resp_row(*s, n, k0, q); }
  S2M_DEV void accumulate(const Item& it, const T (&q)[kKC], const Vec<T, VEC>& xv,
                          T (&acc)[1][kKC][VEC]) const {
#pragma unroll
    for (int j = 0; j < kKC; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T diff = xv.v[v] - it.mu[j][v];
        acc[0][j][v] = std::fma(q[j] * diff, diff, acc[0][j][v]);  // sass-loop: mstep-var
      }
  }
};

// v_next = max(S2 / Nk + floor, var_min) (alive) or the previous variance (dead).
template <typename T, int VEC>
struct VarianceTerm : CentredMomentTerm<T, VEC> {
  Params<T> prev, next;
  T total_w, var_floor;
  S2M_DEV void finish(int k, int d, const T (&sums)[1]) const {
    const int i = k * this->s->D + d;
    const T nk = this->s->nk[k];
    next.var[i] = component_alive(nk, total_w) ? floored_variance(sums[0] / nk, var_floor)
                                                : prev.var[i];
  }
};

// theta_next from the posteriors in s.resp (cpu: m_step). Ends with a barrier.
template <typename T, int VEC>
S2M_DEV void m_step(const SetCtx<T>& s, const Params<T>& prev, const Params<T>& next,
                    T total_w, T var_floor) {
  component_mass(s);
  __syncthreads();
  reduce_over_n<T, VEC, 1>(s, WeightedMeanTerm<T, VEC>{&s, prev, next, total_w});
  VarianceTerm<T, VEC> var_term;
  var_term.s = &s;
  var_term.mu = next.mu;
  var_term.prev = prev;
  var_term.next = next;
  var_term.total_w = total_w;
  var_term.var_floor = var_floor;
  reduce_over_n<T, VEC, 1>(s, var_term);
  for (int k = tid(); k < s.K; k += nthreads())
    next.lw[k] = updated_log_weight(s.nk[k], total_w, prev.lw[k]);
  __syncthreads();
}

// ----------------------------------------------------------------------------- kernel setup
// The placement is a template argument, so that with the arrays in shared memory every access
// to them compiles to a shared-memory instruction (LDS/STS, 32-bit addresses), not a generic one.
template <typename T, int kPlacement>
S2M_DEV T* set_arrays(unsigned char* smem, const EmLayout& L, T* workspace, int64_t b) {
  if (kPlacement == int(Placement::kAllGlobal)) return workspace + b * L.ws_per_set;
  return reinterpret_cast<T*>(smem + kScalarBytes);
}

// Copies x (into shared memory with kAllShared) and w of set b into place; fills s.
template <typename T, int VEC, int kPlacement>
S2M_DEV SetCtx<T> setup_set(const T* x, const T* w, int64_t b, int N, int D, int K,
                            const EmLayout& L, T* arrays, unsigned char* smem) {
  SetCtx<T> s;
  s.N = N;
  s.D = D;
  s.K = K;
  s.kp = L.kp;
  s.ds = L.ds;
  s.groups = L.groups;
  const T* xg = x + traj_offset(0, 0, b, int64_t(N) * D);
  if (kPlacement == int(Placement::kAllShared)) {
    T* xs = arrays + L.x;
    const int ndv = D / VEC;
    for (int i = tid(); i < N * ndv; i += nthreads()) {
      const int n = i / ndv, dv = i % ndv;
      store_vec<T, VEC>(xs + int64_t(n) * L.dp + dv * VEC,
                        load_vec<T, VEC>(xg + int64_t(n) * D + dv * VEC));
    }
    s.x = xs;
    s.ldx = L.dp;
  } else {
    s.x = xg;
    s.ldx = D;
  }
  T* ws = arrays + L.w;
  copy_elems<T>(w + b * N, ws, N);
  s.w = ws;
  s.resp = arrays + L.resp;
  s.lpart = arrays + L.lpart;
  s.pn = arrays + L.pn;
  s.iv = arrays + L.iv;
  s.lognorm = arrays + L.lognorm;
  s.nk = arrays + L.nk;
  s.partial = arrays + L.partial;
  s.scal = reinterpret_cast<Scalars<T>*>(smem);
  return s;
}

// Sets s.scal->total_weight = sum_n w_n; returns it (call after w is in place and a barrier).
template <typename T>
S2M_DEV T total_weight(const SetCtx<T>& s) {
  if (warp_id() == 0) {
    const T total = warp_ordered_sum<T>(s.N, [&](int n) { return s.w[n]; });
    if (lane_id() == 0) s.scal->total_weight = total;
  }
  __syncthreads();
  return s.scal->total_weight;
}

template <typename T>
S2M_DEV double mean_loglik(T sum, T total_w) {
  return total_w > T(0) ? double(sum / total_w) : 0.0;
}

// ----------------------------------------------------------------------------- forward
template <typename T, int VEC, int kPlacement>
__global__ void __launch_bounds__(kEmThreads, kEmMinBlocks<T, kPlacement>)
    em_forward_kernel(EmForwardArgs<T> a, EmLayout L, T* workspace) {
  S2M_DYNAMIC_SHARED(smem);
  const int64_t b = blockIdx.x;
  const int N = int(a.N), D = int(a.D), K = int(a.K);
  T* arrays = set_arrays<T, kPlacement>(smem, L, workspace, b);
  const SetCtx<T> s = setup_set<T, VEC, kPlacement>(a.x, a.w, b, N, D, K, L, arrays, smem);
  Params<T> cur = params_at(arrays + L.theta_a, L);
  Params<T> next = params_at(arrays + L.theta_b, L);
  copy_elems<T>(a.lw0 + b * K, cur.lw, K);
  copy_elems<T>(a.mu0 + b * K * D, cur.mu, K * D);
  copy_elems<T>(a.var0 + b * K * D, cur.var, K * D);
  const TrajRef<T> traj{a.lw_traj, a.mu_traj, a.var_traj, a.B, a.K, a.D, b};
  const bool keep = a.steps > 1;
  __syncthreads();
  if (keep) store_params(Params<T>(cur), traj, 0);
  const T total_w = total_weight(s);
  const T var_floor = T(a.var_floor);

  double ll_prev = -INFINITY;
  double ll_theta1 = 0.0;  // K = 1: every iterate from theta_1 on is theta_1
  int64_t used = 0;
  bool converged = false;
  for (int64_t t = 1; t <= a.n_iter; ++t) {
    double ll;
    if (K == 1 && t >= 2) {
      // One component: r = 1, so the M-step gives theta_1 again whatever theta_{t-1} is.
      if (t == 2) ll_theta1 = mean_loglik(e_step<T, VEC>(s, cur, false), total_w);
      ll = ll_theta1;
    } else {
      ll = mean_loglik(e_step<T, VEC>(s, cur, true), total_w);
      m_step<T, VEC>(s, cur, next, total_w, var_floor);
      const Params<T> swap = cur;
      cur = next;
      next = swap;
    }
    used = t;
    if (keep) store_params(cur, traj, t);
    // Every thread holds the same ll (read from shared memory), so the exit is uniform.
    if (a.tol > 0 && std::fabs(ll - ll_prev) < a.tol) {
      converged = true;
      break;
    }
    ll_prev = ll;
  }
  if (keep) {
    for (int64_t t = used + 1; t < a.steps; ++t) store_params(cur, traj, t);
  } else {
    store_params(cur, traj, 0);
  }
  const double loglik = (K == 1 && used >= 2)
                            ? ll_theta1
                            : mean_loglik(e_step<T, VEC>(s, cur, false), total_w);
  if (tid() == 0) {
    a.loglik[b] = T(loglik);
    a.n_iter_used[b] = used;
    a.converged[b] = converged;
  }
}

// ----------------------------------------------------------------------------- backward
// Backward scratch of one set (pointers into its array region).
template <typename T>
struct BackwardState {
  Params<T> prev;   // theta_{t-1}
  Params<T> cur;    // theta_t (log weights unused)
  Params<T> g;      // dL/dtheta_t
  Params<T> g_prev; // dL/dtheta_{t-1}, being built
  T* gm_eff;        // (K, D) dL/dmu_t where the mean was fitted, else 0
  T* gv_eff;        // (K, D) dL/dv_t where the variance was fitted and not clamped, else 0
  T* s2;            // (K, D) centred second moments at mu_t
  T* c;             // (K) sum_d gv_eff S2 / Nk
  T* gl;            // (N, kp) dL/dq, then dL/dl
  T* gw;            // (N) dL/dw accumulated over the iterations
};

// (gm + gv delta) delta with delta = x - mu_t, summed over d (cpu: the pa[n,k] sums).
template <typename T, int VEC>
struct MomentGradTerm {
  const T* mu;
  const T* gm;
  const T* gv;
  int D;
  template <int NP>
  S2M_DEV void tile(T (&acc)[NP][kKC], int j, const Vec<T, VEC> (&xv)[NP], int k, int d) const {
    const int i = k * D + d;
    const Vec<T, VEC> m = load_vec<T, VEC>(mu + i);
    const Vec<T, VEC> a = load_vec<T, VEC>(gm + i);
    const Vec<T, VEC> c = load_vec<T, VEC>(gv + i);
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T delta = xv[p].v[v] - m.v[v];
        acc[p][j] = std::fma(a.v[v] + c.v[v] * delta, delta, acc[p][j]);  // sass-loop: bwd-moment
      }
  }
};

// S2 at mu_t (the backward recomputes it exactly, like the CPU).
template <typename T, int VEC>
struct SecondMomentTerm : CentredMomentTerm<T, VEC> {
  T* out;
  S2M_DEV void finish(int k, int d, const T (&sums)[1]) const { out[k * this->s->D + d] = sums[0]; }
};

// Reverse of the E-step's log-densities into theta_{t-1}: sum_n g_l e and
// sum_n g_l (e^2 - 1/v) / 2 with e = (x - mu_{t-1}) / v_{t-1}, plus the pass-through of dead
// components and the trajectory's own gradient at t-1.
template <typename T, int VEC>
struct LogDensityGradTerm {
  struct Item {
    T mu[kKC][VEC];
    T iv[kKC][VEC];
  };
  const SetCtx<T>* s;
  const BackwardState<T>* st;
  const T* gtraj_mu;   // (K, D) at t-1, or null
  const T* gtraj_var;  // (K, D) at t-1, or null
  T total_w;
  S2M_DEV Item begin(int k0, int d0) const {
    Item it;
#pragma unroll
    for (int j = 0; j < kKC; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const bool in = k0 + j < s->K;
        const int i = (k0 + j) * s->D + d0 + v;
        it.mu[j][v] = in ? st->prev.mu[i] : T(0);
        it.iv[j][v] = in ? s->iv[i] : T(0);
      }
    return it;
  }
  S2M_DEV void row(int n, int k0, T (&gl)[kKC]) const {
    load_row<T, kKC>(st->gl + int64_t(n) * s->kp + k0, gl);
  }
  S2M_DEV void accumulate(const Item& it, const T (&gl)[kKC], const Vec<T, VEC>& xv,
                          T (&acc)[2][kKC][VEC]) const {
#pragma unroll
    for (int j = 0; j < kKC; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T e = (xv.v[v] - it.mu[j][v]) * it.iv[j][v];
        acc[0][j][v] = std::fma(gl[j], e, acc[0][j][v]);  // sass-loop: bwd-logdens
        acc[1][j][v] += T(0.5) * gl[j] * (e * e - it.iv[j][v]);
      }
  }
  S2M_DEV void finish(int k, int d, const T (&sums)[2]) const {
    const int i = k * s->D + d;
    const bool alive = component_alive(s->nk[k], total_w);
    T gm = alive ? T(0) : st->g.mu[i];
    T gv = alive ? T(0) : st->g.var[i];
    gm += sums[0];
    gv += sums[1];
    if (gtraj_mu != nullptr) {
      gm += gtraj_mu[i];
      gv += gtraj_var[i];
    }
    st->g_prev.mu[i] = gm;
    st->g_prev.var[i] = gv;
  }
};

// Reverse of theta_t = M(x, w, r(theta_{t-1})) given st.g = dL/dtheta_t, with s.resp and s.nk
// of the recomputed E-step (cpu: m_step_backward). Adds the direct gradients to g_x and st.gw,
// leaves dL/dl (N, K) in st.gl. Ends with a barrier. (g_x: see accumulate_grad_x.)
template <typename T, int VEC>
S2M_DEV void m_step_backward(const SetCtx<T>& s, const BackwardState<T>& st, T total_w) {
  const int K = s.K, D = s.D, KD = K * D;
  // Effective upstream gradients: dead components pass theirs back unchanged (handled by the
  // caller), a clamped variance has no gradient.
  for (int i = tid(); i < KD; i += nthreads()) {
    const bool alive = component_alive(s.nk[i / D], total_w);
    st.gm_eff[i] = alive ? st.g.mu[i] : T(0);
    st.gv_eff[i] = (alive && !variance_clamped(st.cur.var[i])) ? st.g.var[i] : T(0);
  }
  __syncthreads();
  SecondMomentTerm<T, VEC> s2_term;
  s2_term.s = &s;
  s2_term.mu = st.cur.mu;
  s2_term.out = st.s2;
  reduce_over_n<T, VEC, 1>(s, s2_term);
  // c_k = sum_d gv S2 / Nk; w_term = sum_k a_k / W over components whose weight is fitted.
  for (int k = warp_id(); k < K; k += nwarps()) {
    const T nk = s.nk[k];
    const bool alive = component_alive(nk, total_w);
    const T sum = warp_ordered_sum<T>(D, [&](int d) {
      return st.gv_eff[k * D + d] * st.s2[k * D + d];
    });
    if (lane_id() == 0) st.c[k] = alive ? sum / nk : T(0);
  }
  if (tid() == 0) {
    T w_term = T(0);
    for (int k = 0; k < K; ++k)
      if (log_weight_from_data(s.nk[k], total_w)) w_term += st.g.lw[k] / total_w;
    s.scal->w_term = w_term;
  }
  // pa[n,k] = sum_d (gm + gv delta) delta, per d-slice.
  reduce_over_d<T, VEC>(s, MomentGradTerm<T, VEC>{st.cur.mu, st.gm_eff, st.gv_eff, D}, s.lpart);
  __syncthreads();
  // dL/dq[n,k] = (a_k + pa[n,k] - c_k) / Nk; through q = w r into dL/dw and dL/dr; softmax.
  const T w_term = s.scal->w_term;
  for (int n = tid(); n < s.N; n += nthreads()) {
    const T* r = s.resp + int64_t(n) * s.kp;
    T* gq = st.gl + int64_t(n) * s.kp;
    for (int k = 0; k < K; ++k) {
      const T nk = s.nk[k];
      const bool alive = component_alive(nk, total_w);
      const bool lw_live = log_weight_from_data(nk, total_w);
      T v = T(0);
      if (alive) {
        T pa = T(0);
        for (int sl = 0; sl < s.ds; ++sl) pa += s.lpart[(int64_t(sl) * s.N + n) * s.kp + k];
        v += pa - st.c[k];
      }
      if (lw_live) v += st.g.lw[k];
      gq[k] = (alive || lw_live) ? v / nk : T(0);
    }
    const T wn = s.w[n];
    T gw = -w_term;
    T dot = T(0);
    for (int k = 0; k < K; ++k) {
      gw += r[k] * gq[k];
      dot += r[k] * (wn * gq[k]);
    }
    st.gw[n] += gw;
    for (int k = 0; k < K; ++k) gq[k] = r[k] * (wn * gq[k] - dot);  // softmax backward
    for (int k = K; k < s.kp; ++k) gq[k] = T(0);
  }
  __syncthreads();
}

// g_x[n, d] += sum_k [alive: q/Nk (gm + 2 gv (x - mu_t))] - [K > 1: g_l (x - mu_{t-1}) / v_{t-1}]
// (the M-step's direct term and the E-step's, cpu: m_step_backward and
// point_log_densities_backward). One thread per (n, VEC dims); g_x in global memory.
template <typename T, int VEC>
S2M_DEV void accumulate_grad_x(const SetCtx<T>& s, const BackwardState<T>& st, T total_w,
                               bool with_e_step, T* g_x) {
  const int K = s.K, D = s.D, ndv = D / VEC;
  for (int it = tid(); it < s.N * ndv; it += nthreads()) {
    const int n = it / ndv, d0 = (it % ndv) * VEC;
    const Vec<T, VEC> xv = load_vec<T, VEC>(s.x + int64_t(n) * s.ldx + d0);
    const T wn = s.w[n];
    T acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = T(0);
    for (int k = 0; k < K; ++k) {
      const int i = k * D + d0;
      const T nk = s.nk[k];
      if (component_alive(nk, total_w)) {
        const T qn = wn * s.resp[int64_t(n) * s.kp + k] / nk;
        const Vec<T, VEC> m = load_vec<T, VEC>(st.cur.mu + i);
        const Vec<T, VEC> gm = load_vec<T, VEC>(st.gm_eff + i);
        const Vec<T, VEC> gv = load_vec<T, VEC>(st.gv_eff + i);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const T delta = xv.v[v] - m.v[v];
          acc[v] += qn * (gm.v[v] + T(2) * gv.v[v] * delta);
        }
      }
      if (with_e_step) {
        const T gl = st.gl[int64_t(n) * s.kp + k];
        const Vec<T, VEC> m = load_vec<T, VEC>(st.prev.mu + i);
        const Vec<T, VEC> iv = load_vec<T, VEC>(s.iv + i);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] -= gl * ((xv.v[v] - m.v[v]) * iv.v[v]);
      }
    }
    T* gx = g_x + int64_t(n) * D + d0;
    Vec<T, VEC> out = load_vec<T, VEC>(gx);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out.v[v] += acc[v];
    store_vec<T, VEC>(gx, out);
  }
}

template <typename T, int VEC, int kPlacement>
__global__ void __launch_bounds__(kEmThreads, kEmMinBlocks<T, kPlacement>)
    em_backward_kernel(EmBackwardArgs<T> a, EmLayout L, T* workspace) {
  S2M_DYNAMIC_SHARED(smem);
  const int64_t b = blockIdx.x;
  const int N = int(a.N), D = int(a.D), K = int(a.K), KD = K * D;
  T* arrays = set_arrays<T, kPlacement>(smem, L, workspace, b);
  const SetCtx<T> s = setup_set<T, VEC, kPlacement>(a.x, a.w, b, N, D, K, L, arrays, smem);
  BackwardState<T> st;
  st.prev = params_at(arrays + L.theta_a, L);
  st.cur = params_at(arrays + L.tt, L);
  st.g = params_at(arrays + L.g_a, L);
  st.g_prev = params_at(arrays + L.g_b, L);
  const Params<T> geff = params_at(arrays + L.geff, L);
  st.gm_eff = geff.mu;
  st.gv_eff = geff.var;
  st.s2 = arrays + L.s2;
  st.c = arrays + L.c;
  st.gl = arrays + L.gl;
  st.gw = arrays + L.gw;
  const TrajRef<const T> traj{a.lw_traj, a.mu_traj, a.var_traj, a.B, a.K, a.D, b};
  const TrajRef<const T> gtraj{a.g_lw, a.g_mu, a.g_var, a.B, a.K, a.D, b};
  const bool has_g = a.g_mu != nullptr;
  T* g_x = a.g_x + b * int64_t(N) * D;
  const int64_t steps = a.steps;
  int64_t n_used = a.n_iter_used[b];
  n_used = n_used < 0 ? 0 : (n_used > steps - 1 ? steps - 1 : n_used);
  const bool single = K == 1;

  // g = sum of the trajectory's gradients on theta_{n_used} and its constant copies after it
  // (and, for K = 1, on every theta_t, t >= 1: they are all the same map of x and w).
  auto gather = [&](const T* src_k, const T* src_kd, T* dst, int count, bool per_kd) {
    for (int i = tid(); i < count; i += nthreads()) {
      T acc = T(0);
      if (has_g) {
        const int64_t stride = per_kd ? a.B * int64_t(KD) : a.B * int64_t(K);
        const T* p = (per_kd ? src_kd : src_k) + b * (per_kd ? int64_t(KD) : int64_t(K)) + i;
        for (int64_t t = n_used; t < steps; ++t) acc += p[t * stride];
        if (single)
          for (int64_t t = 1; t < n_used; ++t) acc += p[t * stride];
      }
      dst[i] = acc;
    }
  };
  gather(a.g_lw, nullptr, st.g.lw, K, false);
  gather(nullptr, a.g_mu, st.g.mu, KD, true);
  gather(nullptr, a.g_var, st.g.var, KD, true);
  for (int n = tid(); n < N; n += nthreads()) st.gw[n] = T(0);
  for (int i = tid(); i < N * D; i += nthreads()) g_x[i] = T(0);
  __syncthreads();
  const T total_w = total_weight(s);

  const int64_t t_last = n_used == 0 ? 0 : (single ? 1 : n_used);
  for (int64_t t = t_last; t >= 1; --t) {
    load_params(traj, t - 1, st.prev);
    load_params(traj, t, st.cur);
    __syncthreads();
    e_step<T, VEC>(s, st.prev, true);  // also leaves iv of theta_{t-1} in s.iv
    component_mass(s);
    __syncthreads();
    m_step_backward<T, VEC>(s, st, total_w);
    accumulate_grad_x<T, VEC>(s, st, total_w, !single, g_x);
    // dL/dtheta_{t-1}.
    const T* gt_lw = has_g ? gtraj.lw + gtraj.at_k(t - 1) : nullptr;
    for (int k = warp_id(); k < K; k += nwarps()) {
      const T sum = single ? T(0) : warp_ordered_sum<T>(N, [&](int n) {
        return st.gl[int64_t(n) * s.kp + k];
      });
      if (lane_id() == 0) {
        T g = total_w > T(0) ? T(0) : st.g.lw[k];
        g += sum;
        if (gt_lw != nullptr) g += gt_lw[k];
        st.g_prev.lw[k] = g;
      }
    }
    LogDensityGradTerm<T, VEC> term;
    term.s = &s;
    term.st = &st;
    term.gtraj_mu = has_g ? gtraj.mu + gtraj.at_kd(t - 1) : nullptr;
    term.gtraj_var = has_g ? gtraj.var + gtraj.at_kd(t - 1) : nullptr;
    term.total_w = total_w;
    if (!single) {
      reduce_over_n<T, VEC, 2>(s, term);
    } else {
      for (int i = tid(); i < KD; i += nthreads()) {
        const T zero[2] = {T(0), T(0)};
        term.finish(i / D, i % D, zero);
      }
      __syncthreads();
    }
    const Params<T> swap = st.g;
    st.g = st.g_prev;
    st.g_prev = swap;
  }
  copy_elems<T>(st.g.lw, a.g_lw0 + b * K, K);
  copy_elems<T>(st.g.mu, a.g_mu0 + b * int64_t(KD), KD);
  copy_elems<T>(st.g.var, a.g_var0 + b * int64_t(KD), KD);
  copy_elems<T>(st.gw, a.g_w + b * N, N);
}

// ----------------------------------------------------------------------------- launchers
template <typename T>
cudaError_t layout_for(int64_t N, int64_t D, int64_t K, bool backward, EmLayout* L) {
  DeviceLimits dev;
  const cudaError_t e = query_device_limits(&dev);
  if (e != cudaSuccess) return e;
  *L = make_layout<T>(N, D, K, backward, dev.max_smem_optin);
  return cudaSuccess;
}

template <typename T, int VEC>
cudaError_t launch_forward(const EmForwardArgs<T>& a, const EmLayout& L, T* ws,
                           cudaStream_t stream) {
  constexpr int kS = int(Placement::kAllShared), kX = int(Placement::kXGlobal),
                kG = int(Placement::kAllGlobal);
  auto kernel = L.placement == kS   ? em_forward_kernel<T, VEC, kS>
                : L.placement == kX ? em_forward_kernel<T, VEC, kX>
                                    : em_forward_kernel<T, VEC, kG>;
  cudaError_t e = allow_dynamic_smem(kernel, size_t(L.smem_bytes));
  if (e != cudaSuccess) return e;
  S2M_LAUNCH(kernel, dim3(unsigned(a.B)), dim3(kEmThreads), size_t(L.smem_bytes), stream, a, L,
             ws);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_backward(const EmBackwardArgs<T>& a, const EmLayout& L, T* ws,
                            cudaStream_t stream) {
  constexpr int kS = int(Placement::kAllShared), kX = int(Placement::kXGlobal),
                kG = int(Placement::kAllGlobal);
  auto kernel = L.placement == kS   ? em_backward_kernel<T, VEC, kS>
                : L.placement == kX ? em_backward_kernel<T, VEC, kX>
                                    : em_backward_kernel<T, VEC, kG>;
  cudaError_t e = allow_dynamic_smem(kernel, size_t(L.smem_bytes));
  if (e != cudaSuccess) return e;
  S2M_LAUNCH(kernel, dim3(unsigned(a.B)), dim3(kEmThreads), size_t(L.smem_bytes), stream, a, L,
             ws);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
size_t em_forward_workspace_bytes(int64_t B, int64_t N, int64_t D, int64_t K) {
  EmLayout L;
  if (layout_for<T>(N, D, K, false, &L) != cudaSuccess) return 0;
  return size_t(B * L.ws_per_set) * sizeof(T);
}

template <typename T>
size_t em_backward_workspace_bytes(int64_t B, int64_t N, int64_t D, int64_t K) {
  EmLayout L;
  if (layout_for<T>(N, D, K, true, &L) != cudaSuccess) return 0;
  return size_t(B * L.ws_per_set) * sizeof(T);
}

template <typename T>
int em_forward_placement(int64_t N, int64_t D, int64_t K) {
  EmLayout L;
  return layout_for<T>(N, D, K, false, &L) == cudaSuccess ? L.placement : -1;
}

template <typename T>
int em_backward_placement(int64_t N, int64_t D, int64_t K) {
  EmLayout L;
  return layout_for<T>(N, D, K, true, &L) == cudaSuccess ? L.placement : -1;
}

template <typename T>
int em_placement_for_limit(int64_t N, int64_t D, int64_t K, bool backward, int64_t max_smem) {
  return make_layout<T>(N, D, K, backward, max_smem).placement;
}

template <typename T>
int64_t em_smem_bytes_for_limit(int64_t N, int64_t D, int64_t K, bool backward, int64_t max_smem) {
  return make_layout<T>(N, D, K, backward, max_smem).smem_bytes;
}

template <typename T>
cudaError_t em_forward(const EmForwardArgs<T>& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  EmLayout L;
  const cudaError_t e = layout_for<T>(a.N, a.D, a.K, false, &L);
  if (e != cudaSuccess) return e;
  T* ws = static_cast<T*>(workspace);
  if (L.vec == max_vec<T>()) return launch_forward<T, max_vec<T>()>(a, L, ws, stream);
  return launch_forward<T, 1>(a, L, ws, stream);
}

template <typename T>
cudaError_t em_backward(const EmBackwardArgs<T>& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  EmLayout L;
  const cudaError_t e = layout_for<T>(a.N, a.D, a.K, true, &L);
  if (e != cudaSuccess) return e;
  T* ws = static_cast<T*>(workspace);
  if (L.vec == max_vec<T>()) return launch_backward<T, max_vec<T>()>(a, L, ws, stream);
  return launch_backward<T, 1>(a, L, ws, stream);
}

#define S2M_INSTANTIATE_EM(T)                                                              \
  template size_t em_forward_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t);      \
  template size_t em_backward_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t);     \
  template int em_forward_placement<T>(int64_t, int64_t, int64_t);                         \
  template int em_backward_placement<T>(int64_t, int64_t, int64_t);                        \
  template int em_placement_for_limit<T>(int64_t, int64_t, int64_t, bool, int64_t);         \
  template int64_t em_smem_bytes_for_limit<T>(int64_t, int64_t, int64_t, bool, int64_t);   \
  template cudaError_t em_forward<T>(const EmForwardArgs<T>&, void*, cudaStream_t);        \
  template cudaError_t em_backward<T>(const EmBackwardArgs<T>&, void*, cudaStream_t);
S2M_INSTANTIATE_EM(float)
S2M_INSTANTIATE_EM(double)
#undef S2M_INSTANTIATE_EM

}  // namespace cuda
}  // namespace s2m
