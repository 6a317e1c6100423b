// Pool scoring on the CPU: every item of a shared pool z (M,D) against every one of B
// mixtures -> (B,M). (CUDA has its own fused kernel, cuda/score_kernels.cu.)
//
// Written with ATen ops (CPU BLAS): the quadratic form is expanded so that the work is one
// matrix product over the pool, of rows [z_m^2, z_m] and [-1/(2 v_bk), mu_bk / v_bk], plus c_bk,
//   l[m,(b,k)] = c_bk + z_m . (mu_bk / v_bk) - 1/2 z_m^2 . (1 / v_bk),
//   c_bk       = log pi_bk - 1/2 sum_d (log(2 pi v_bkd) + mu_bkd^2 / v_bkd).
// With one component the product is taken the other way round, (B, rows) = params x pool^T,
// straight into the (B, M) result: no transposed copy. c is added after the product's sum
// (its beta term, or one addition per score), never as a column of it: with exactly
// representable terms the sum is exact in any order, so repeated items tie bit for bit
// whatever the chunking (BLAS orders a sum by its shape).
// The expansion cancels when z is close to mu and both are far from the origin, so z and mu
// are first shifted by a common centre (the mean of all component means): the result is
// invariant to the shift, and the cancellation is then relative to the spread of the data
// around that centre rather than to its distance from the origin. The pool is processed in
// chunks so the (chunk, B*K) intermediates stay bounded.
//
// The backward cancels more: dL/dz = (g_l . mu/v) - z (g_l . 1/v) loses |mu - centre| /
// |z - mu| digits, about 30x for variances 1e-3 of the means' spread, which took float32
// past 1e-4 relative. So reduced-precision inputs are backpropagated in float64.
#include <torch/library.h>
#include <torch/types.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "common/gmm_math.h"

namespace s2m {
namespace {

constexpr int64_t kChunkBytes = int64_t(1) << 26;  // per (rows x B*K) intermediate

struct PoolTerms {
  at::Tensor center;   // (D)
  at::Tensor mc;       // (BK, D) centred means
  at::Tensor inv_var;  // (BK, D)
  at::Tensor a;        // (BK, D) mc / v
  at::Tensor log_norm; // (BK) log pi - 1/2 sum_d log(2 pi v)
  at::Tensor c;        // (BK) log_norm - 1/2 mc . a
  at::Tensor aug;      // (BK, 2D) [-1/2 inv_var, a]: l = c + [zc^2, zc] . aug
};

PoolTerms pool_terms(const at::Tensor& lw, const at::Tensor& mu, const at::Tensor& var,
                     const MixtureSizes& m) {
  const int64_t BK = m.batch * m.components, D = m.dims;
  PoolTerms t;
  const auto mu2 = mu.reshape({BK, D});
  const auto var2 = var.reshape({BK, D});
  t.center = BK > 0 ? mu2.mean(0) : at::zeros({D}, mu.options());
  t.mc = mu2 - t.center;
  t.inv_var = var2.reciprocal();
  t.a = t.mc * t.inv_var;
  t.log_norm = lw.reshape({BK}) - 0.5 * (double(D) * kLog2Pi + var2.log().sum(1));
  t.c = t.log_norm - 0.5 * (t.mc * t.a).sum(1);
  t.aug = at::cat({-0.5 * t.inv_var, t.a}, 1);
  return t;
}

// [zc^2, zc] (rows, 2D): the pool rows of the single matrix product.
at::Tensor augmented_rows(const at::Tensor& zc) { return at::cat({zc.square(), zc}, 1); }

int64_t chunk_rows(const MixtureSizes& m, at::ScalarType dtype) {
  const int64_t elements = kChunkBytes / int64_t(c10::elementSize(dtype));
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, m.batch * m.components));
}

// Where a term of the expansion overflowed (|z - centre| and 1/v both huge: Inf - Inf or
// -Inf), the entry of l is recomputed directly, whose only non-finite value is -Inf (a
// squared distance beyond the dtype). l is (rows, BK), or (BK, rows) if component_major.
void recompute_overflowed(at::Tensor& l, const at::Tensor& zc, const PoolTerms& t, bool component_major) {
  // One pass for the common case: a finite sum means every entry is finite (an overflowing
  // sum of finite entries only sends it to the exact check).
  if (std::isfinite(l.sum().item<double>())) return;
  const auto overflowed = l.isfinite().logical_not_().nonzero();  // (n, 2)
  if (overflowed.size(0) == 0) return;
  const auto row = overflowed.select(1, component_major ? 1 : 0);
  const auto comp = overflowed.select(1, component_major ? 0 : 1);
  const auto diff = zc.index_select(0, row) - t.mc.index_select(0, comp);
  const auto maha = (diff.square() * t.inv_var.index_select(0, comp)).sum(1);
  const auto direct = t.log_norm.index_select(0, comp) - 0.5 * maha;
  if (component_major) {
    l.index_put_({comp, row}, direct);
  } else {
    l.index_put_({row, comp}, direct);
  }
}

// l for centred pool rows zc: (rows, B*K).
at::Tensor chunk_log_densities(const at::Tensor& zc, const PoolTerms& t) {
  auto l = at::addmm(t.c, augmented_rows(zc), t.aug.t());
  recompute_overflowed(l, zc, t, false);
  return l;
}

// Whether no entry of l can overflow for the centred rows zc: |l| <= max|c| + D (1/2 max zc^2
// max 1/v + max|zc| max|a|), with a margin for rounding. Finite data passes by a wide margin
// except near the dtype's range, where the entries are checked one by one instead.
bool cannot_overflow(const at::Tensor& zc, const PoolTerms& t) {
  if (zc.numel() == 0 || t.c.numel() == 0) return true;
  const double zmax = zc.abs().max().item<double>();
  const double bound = t.c.abs().max().item<double>() +
                       double(zc.size(1)) * (0.5 * zmax * zmax * t.inv_var.max().item<double>() +
                                             zmax * t.a.abs().max().item<double>());
  const double limit = zc.scalar_type() == at::kFloat ? double(std::numeric_limits<float>::max())
                                                      : std::numeric_limits<double>::max();
  return std::isfinite(bound) && bound < 0.25 * limit;
}

// One component, component-major: the products [zc^2, zc] . aug (B, r) into dst; the
// caller adds c (score_pool with add_, the top k while it reads the block: the same
// rounding, one addition after the product's sum).
void component_products(const at::Tensor& rows, const PoolTerms& t, at::Tensor& dst) {
  at::mm_out(dst, t.aug, rows.t());
}

// Scores of centred pool rows zc (r, D) under every mixture, into dst (B, r).
void score_rows(const at::Tensor& zc, const PoolTerms& t, int64_t B, int64_t K, at::Tensor& dst) {
  if (K == 1) {
    // One component: its log-density is the score (a log-sum-exp of one term costs an
    // exp and a log per score, as much as the matrix product at small D).
    component_products(augmented_rows(zc), t, dst);
    dst.add_(t.c.unsqueeze(1));
    if (!cannot_overflow(zc, t)) recompute_overflowed(dst, zc, t, true);
  } else {
    dst.copy_(chunk_log_densities(zc, t).view({zc.size(0), B, K}).logsumexp(2).t());
  }
}

at::Tensor score_pool(const at::Tensor& z, const at::Tensor& lw, const at::Tensor& mu,
                      const at::Tensor& var) {
  const MixtureSizes m = check_pool_args(z, lw, mu, var);
  const int64_t M = z.size(0), B = m.batch, K = m.components;
  auto out = at::empty({B, M}, z.options());
  if (M == 0 || B == 0) return out;
  const PoolTerms t = pool_terms(lw, mu, var, m);
  const int64_t rows = chunk_rows(m, z.scalar_type());
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t r = std::min(rows, M - r0);
    auto dst = out.narrow(1, r0, r);  // (B, r), row stride M: a valid BLAS output
    score_rows(z.narrow(0, r0, r) - t.center, t, B, K, dst);
  }
  return out;
}

// ----------------------------------------------------------------------------- top k
// An entry of a row's running top k. a ranks before b: a higher score, or the same score
// and a lower index (the order of a stable descending sort).
template <typename T>
struct Ranked {
  T value;
  int64_t index;
};

template <typename T>
inline bool ranks_before(const Ranked<T>& a, const Ranked<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// max of v[0..n), n >= 1 (vectorised).
template <typename T>
inline T block_max(const T* v, int64_t n) {
  T best = v[0];
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < n; ++j) best = v[j] > best ? v[j] : best;
  return best;
}

// Rows scored per block: (B, rows) scores of about 2^19 elements stay in cache while every
// row's heap reads them.
constexpr int64_t kTopkBlockElements = int64_t(1) << 19;
// Scores tested together against a row's k-th before any is looked at one by one.
constexpr int64_t kTopkScan = 64;
// Up to this many candidates enter a full heap one by one; more are merged by a selection.
constexpr int64_t kTopkFewCandidates = 16;

// The pool rows z (M, D), items offset .. offset + M - 1, merged into the running top k of
// every mixture: values/indices (B, n), n <= k. Each row keeps a heap of its k best with the
// worst on top: a score below the row's current k-th costs one (vectorised) comparison, and
// a block's candidates are merged by one selection (linear in their number).
template <typename T>
std::tuple<at::Tensor, at::Tensor> pool_topk_impl(const at::Tensor& z, const PoolTerms& t, int64_t B,
                                                   int64_t K, const at::Tensor& values,
                                                   const at::Tensor& indices, int64_t offset, int64_t k) {
  const int64_t M = z.size(0), n_in = values.size(1);
  const int64_t kk = std::min(k, n_in + M);
  std::vector<Ranked<T>> heaps(size_t(B * kk));
  std::vector<int64_t> count(size_t(B), n_in);
  // Ranking order; as a heap comparator it puts the worst entry on top.
  const auto before = [](const Ranked<T>& a, const Ranked<T>& b) { return ranks_before(a, b); };
  const auto v_in = values.contiguous(), i_in = indices.contiguous();
  const T* vp = v_in.data_ptr<T>();
  const int64_t* ip = i_in.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    Ranked<T>* h = heaps.data() + b * kk;
    for (int64_t j = 0; j < n_in; ++j) h[j] = {vp[b * n_in + j], ip[b * n_in + j]};
    std::make_heap(h, h + n_in, before);
  }
  // Each row's k-th score once its heap is full (-inf before): what a score must reach.
  std::vector<T> kth_of(size_t(B), -std::numeric_limits<T>::infinity());
  for (int64_t b = 0; b < B; ++b) {
    if (n_in == kk && kk > 0) kth_of[b] = heaps[b * kk].value;
  }
  const int64_t block = std::max<int64_t>(1, kTopkBlockElements / std::max<int64_t>(1, B * K));
  auto scores = at::empty({B, std::min(block, std::max<int64_t>(M, 1))}, z.options());
  const auto zc = z - t.center;
  // One component without overflow: c is added to each product as the block is read.
  const bool fused = K == 1 && cannot_overflow(zc, t);
  const auto rows = fused ? augmented_rows(zc) : at::Tensor();
  const auto c_col = t.c.contiguous();
  const T* cp = c_col.data_ptr<T>();
  for (int64_t r0 = 0; r0 < M; r0 += block) {
    const int64_t r = std::min(block, M - r0);
    auto dst = scores.narrow(1, 0, r);
    if (fused) {
      component_products(rows.narrow(0, r0, r), t, dst);
    } else {
      score_rows(zc.narrow(0, r0, r), t, B, K, dst);
    }
    const T* sp = scores.data_ptr<T>();
    const int64_t stride = scores.size(1);
    // Rows are independent: the result does not depend on the thread count.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<Ranked<T>> cand, pool;  // this block's candidates of a row; heap + candidates
      for (int64_t b = b0; b < b1; ++b) {
        const T* row = sp + b * stride;
        const T cb = fused ? cp[b] : T(0);  // fused: the score is row[j] + cb (else + 0, exact)
        // Candidates: every score while the heap is not full, then those not below the k-th
        // (a tie with the k-th is kept and decided by the (score, index) order). Rounding is
        // monotonic, so max_j (row[j] + cb) is (max_j row[j]) + cb exactly: most rows, then
        // most groups of a row, are rejected by one vectorised maximum, without touching the
        // heap (the k-th lives in kth_of).
        const T kth = kth_of[b];
        if (block_max(row, r) + cb < kth) continue;
        Ranked<T>* h = heaps.data() + b * kk;
        int64_t n = count[b];
        cand.clear();
        for (int64_t j0 = 0; j0 < r; j0 += kTopkScan) {
          const int64_t j1 = std::min(r, j0 + kTopkScan);
          if (block_max(row + j0, j1 - j0) + cb < kth) continue;
          for (int64_t j = j0; j < j1; ++j) {
            const T v = row[j] + cb;
            if (v >= kth) cand.push_back({v, offset + r0 + j});
          }
        }
        if (cand.empty()) continue;
        if (n == kk && int64_t(cand.size()) <= kTopkFewCandidates) {
          for (const Ranked<T>& e : cand) {  // replace the worst, one sift each
            if (!ranks_before(e, h[0])) continue;
            std::pop_heap(h, h + n, before);
            h[n - 1] = e;
            std::push_heap(h, h + n, before);
          }
          kth_of[b] = h[0].value;
          continue;
        }
        // Many: the best kk of heap + candidates by one selection, then the heap again.
        pool.assign(h, h + n);
        pool.insert(pool.end(), cand.begin(), cand.end());
        if (int64_t(pool.size()) > kk) {
          std::nth_element(pool.begin(), pool.begin() + (kk - 1), pool.end(), before);
          pool.resize(size_t(kk));
        }
        n = int64_t(pool.size());
        std::copy(pool.begin(), pool.end(), h);
        std::make_heap(h, h + n, before);
        count[b] = n;
        if (n == kk) kth_of[b] = h[0].value;
      }
    });
  }
  auto out_v = at::empty({B, kk}, values.options());
  auto out_i = at::empty({B, kk}, indices.options());
  T* ov = out_v.data_ptr<T>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Ranked<T>* h = heaps.data() + b * kk;
      std::sort(h, h + kk, before);
      for (int64_t j = 0; j < kk; ++j) {
        ov[b * kk + j] = h[j].value;
        oi[b * kk + j] = h[j].index;
      }
    }
  });
  return {out_v, out_i};
}

std::tuple<at::Tensor, at::Tensor> score_pool_topk(const at::Tensor& z, const at::Tensor& lw,
                                                   const at::Tensor& mu, const at::Tensor& var,
                                                   const at::Tensor& values, const at::Tensor& indices,
                                                   int64_t offset, int64_t k) {
  const MixtureSizes m = check_pool_args(z, lw, mu, var);
  check_topk_state(values, indices, z, m.batch, k);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  const PoolTerms t = pool_terms(lw, mu, var, m);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "score_pool_topk", [&] {
    out = pool_topk_impl<scalar_t>(z.contiguous(), t, m.batch, m.components, values, indices, offset, k);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_pool_backward(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in) {
  const MixtureSizes m = check_pool_args(z_in, lw_in, mu_in, var_in);
  const int64_t M = z_in.size(0), B = m.batch, K = m.components, D = m.dims, BK = B * K;
  check_score_grad(grad_in, z_in, B, M, "(B, M)");
  const auto work = at::kDouble;  // reduced precisions are backpropagated in float64 (see above)
  const auto grad = grad_in.to(work), z = z_in.to(work), lw = lw_in.to(work), mu = mu_in.to(work),
             var = var_in.to(work);
  auto g_z = at::zeros_like(z);
  auto colsum = at::zeros({BK}, z.options());     // sum_m g_l
  auto zsum = at::zeros({BK, D}, z.options());    // sum_m g_l zc
  auto z2sum = at::zeros({BK, D}, z.options());   // sum_m g_l zc^2
  auto g_mu = at::zeros({BK, D}, z.options());
  auto g_var = at::zeros({BK, D}, z.options());
  if (M > 0 && B > 0) {
    const PoolTerms t = pool_terms(lw, mu, var, m);
    const int64_t rows = chunk_rows(m, work);
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
      const int64_t r = std::min(rows, M - r0);
      const auto zc = z.narrow(0, r0, r) - t.center;
      const auto l = chunk_log_densities(zc, t).view({r, B, K});
      // A point scored -Inf passes no gradient (gmm_math.h); its softmax would be NaN.
      const auto resp = l.softmax(2).masked_fill_(l.amax(2, true) == -INFINITY, 0.0);
      const auto g_l = (resp * grad.narrow(1, r0, r).t().unsqueeze(2)).reshape({r, BK});
      // dL/dz = sum_bk g_l (mu - z) / v
      g_z.narrow(0, r0, r).copy_(at::mm(g_l, t.a) - zc * at::mm(g_l, t.inv_var));
      colsum.add_(g_l.sum(0));
      zsum.addmm_(g_l.t(), zc);
      z2sum.addmm_(g_l.t(), zc.square());
    }
    const auto cs = colsum.unsqueeze(1);
    // sum_m g_l (z - mu) / v and sum_m g_l ((z - mu)^2 / v^2 - 1 / v) / 2, expanded around mc.
    g_mu = (zsum - t.mc * cs) * t.inv_var;
    const auto sq = z2sum - 2.0 * t.mc * zsum + t.mc.square() * cs;
    g_var = 0.5 * t.inv_var.square() * sq - 0.5 * cs * t.inv_var;
  }
  const auto out = z_in.scalar_type();
  return {g_z.to(out), colsum.view({B, K}).to(out), g_mu.view({B, K, D}).to(out),
          g_var.view({B, K, D}).to(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) {
  m.impl("score_pool", &score_pool);
  m.impl("score_pool_backward", &score_pool_backward);
  m.impl("score_pool_topk", &score_pool_topk);
}

}  // namespace s2m
