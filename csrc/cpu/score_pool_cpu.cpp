// Pool scoring on the CPU: every item of a shared pool z (M,D) against every one of B
// mixtures -> (B,M). (CUDA has its own fused kernel, cuda/score_kernels.cu.)
//
// Written with ATen ops (CPU BLAS): the quadratic form is expanded so that the work is two
// matrix products over the pool,
//   l[m,(b,k)] = c_bk + z_m . (mu_bk / v_bk) - 1/2 z_m^2 . (1 / v_bk),
//   c_bk       = log pi_bk - 1/2 sum_d (log(2 pi v_bkd) + mu_bkd^2 / v_bkd).
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

#include <algorithm>
#include <cmath>

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
  return t;
}

int64_t chunk_rows(const MixtureSizes& m, at::ScalarType dtype) {
  const int64_t elements = kChunkBytes / int64_t(c10::elementSize(dtype));
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, m.batch * m.components));
}

// l for rows [row0, row0 + rows) of the pool: (rows, B*K). Where a term of the expansion
// overflowed (|z - centre| and 1/v both huge: Inf - Inf or -Inf), the entry is recomputed
// directly, whose only non-finite value is -Inf (a squared distance beyond the dtype).
at::Tensor chunk_log_densities(const at::Tensor& zc, const PoolTerms& t) {
  auto l = at::addmm(t.c, zc, t.a.t());
  l.addmm_(zc.square(), t.inv_var.t(), /*beta=*/1.0, /*alpha=*/-0.5);
  // One pass for the common case: a finite sum means every entry is finite (an overflowing
  // sum of finite entries only sends it to the exact check).
  if (std::isfinite(l.sum().item<double>())) return l;
  const auto overflowed = l.isfinite().logical_not_().nonzero();  // (n, 2): row, component
  if (overflowed.size(0) > 0) {
    const auto row = overflowed.select(1, 0), comp = overflowed.select(1, 1);
    const auto diff = zc.index_select(0, row) - t.mc.index_select(0, comp);
    const auto maha = (diff.square() * t.inv_var.index_select(0, comp)).sum(1);
    l.index_put_({row, comp}, t.log_norm.index_select(0, comp) - 0.5 * maha);
  }
  return l;
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
    const auto zc = z.narrow(0, r0, r) - t.center;
    const auto l = chunk_log_densities(zc, t);
    // One component: its log-density is the score (a log-sum-exp of one term costs an exp
    // and a log per score, as much as the matrix products at small D).
    out.narrow(1, r0, r).copy_(K == 1 ? l.t() : l.view({r, B, K}).logsumexp(2).t());
  }
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
}

}  // namespace s2m
