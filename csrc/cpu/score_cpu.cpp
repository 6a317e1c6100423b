// CPU glue and kernels of paired scoring: z (B,Q,D) against its own set's mixture -> (B,Q).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "checks.h"
#include "cpu/diag_gauss.h"

namespace s2m {
namespace cpu {
namespace {

at::Tensor score_paired_cpu(const at::Tensor& z_in, const at::Tensor& lw_in, const at::Tensor& mu_in,
                            const at::Tensor& var_in) {
  const MixtureSizes m = check_paired_args(z_in, lw_in, mu_in, var_in, Backend::kCPU);
  const auto z = z_in.contiguous(), lw = lw_in.contiguous(), mu = mu_in.contiguous(),
             var = var_in.contiguous();
  const int64_t B = m.batch, K = m.components, D = m.dims, Q = z.size(1);
  auto out = at::empty({B, Q}, z.options());
  auto inv_var = at::empty({B, K, D}, z.options());
  auto log_norm = at::empty({B, K}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "s2m::score_paired (cpu)", [&] {
    using T = scalar_t;
    const T *zp = z.data_ptr<T>(), *lwp = lw.data_ptr<T>(), *mup = mu.data_ptr<T>(),
            *varp = var.data_ptr<T>();
    T *ivp = inv_var.data_ptr<T>(), *lnp = log_norm.data_ptr<T>(), *outp = out.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        precompute_components(lwp + b * K, varp + b * K * D, K, D, ivp + b * K * D, lnp + b * K);
    });
    // Tasks are (set, chunk of queries) so that few sets with many queries still spread.
    constexpr int64_t kRows = 64;
    const int64_t chunks = (Q + kRows - 1) / kRows;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> l(kBlock * K), pad(kBlock * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, q0 = (task % chunks) * kRows;
        const int64_t rows = std::min(kRows, Q - q0), base = b * Q + q0;
        for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
          const int64_t count = std::min(kBlock, rows - r0);
          const T* zb = padded_block(zp + (base + r0) * D, count, D, pad.data());
          T lse[kBlock];
          block_log_densities(zb, mup + b * K * D, ivp + b * K * D, lnp + b * K, K, D, l.data());
          block_posteriors(l.data(), K, static_cast<T*>(nullptr), lse);
          std::copy(lse, lse + count, outp + base + r0);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_paired_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in) {
  const MixtureSizes m = check_paired_args(z_in, lw_in, mu_in, var_in, Backend::kCPU);
  check_score_grad(grad_in, z_in, m.batch, z_in.size(1), "(B, Q)");
  const auto grad = grad_in.contiguous(), z = z_in.contiguous(), lw = lw_in.contiguous(),
             mu = mu_in.contiguous(), var = var_in.contiguous();
  const int64_t B = m.batch, K = m.components, D = m.dims, Q = z.size(1);
  auto g_z = at::zeros_like(z);
  auto g_lw = at::zeros_like(lw);
  auto g_mu = at::zeros_like(mu);
  auto g_var = at::zeros_like(var);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "s2m::score_paired_backward (cpu)", [&] {
    using T = scalar_t;
    const T *gp = grad.data_ptr<T>(), *zp = z.data_ptr<T>(), *lwp = lw.data_ptr<T>(),
            *mup = mu.data_ptr<T>(), *varp = var.data_ptr<T>();
    T *gzp = g_z.data_ptr<T>(), *glwp = g_lw.data_ptr<T>(), *gmup = g_mu.data_ptr<T>(),
      *gvarp = g_var.data_ptr<T>();
    // One set per task: its parameter gradients are sums over its own queries only.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> inv_var(K * D), log_norm(K), l(kBlock * K), g_l(kBlock * K);
      std::vector<T> pad(kBlock * D), g_pad(kBlock * D);
      for (int64_t b = begin; b < end; ++b) {
        const T* means = mup + b * K * D;
        precompute_components(lwp + b * K, varp + b * K * D, K, D, inv_var.data(), log_norm.data());
        for (int64_t q0 = 0; q0 < Q; q0 += kBlock) {
          const int64_t count = std::min(kBlock, Q - q0), i0 = b * Q + q0;
          const T* zb = padded_block(zp + i0 * D, count, D, pad.data());
          block_log_densities(zb, means, inv_var.data(), log_norm.data(), K, D, l.data());
          T lse[kBlock];
          block_posteriors(l.data(), K, g_l.data(), lse);
          for (int64_t j = 0; j < kBlock; ++j) {  // dL/dl = dL/dlog p times the posteriors
            const T g = j < count && scored_point_passes_gradient(lse[j]) ? gp[i0 + j] : T(0);
            for (int64_t k = 0; k < K; ++k) g_l[j * K + k] *= g;
          }
          // A partial block writes its z-gradient to scratch, then copies the real rows.
          T* gzb = count == kBlock ? gzp + i0 * D : g_pad.data();
          if (count < kBlock) std::fill(g_pad.begin(), g_pad.end(), T(0));
          block_log_densities_backward(zb, means, inv_var.data(), g_l.data(), K, D, glwp + b * K,
                                       gmup + b * K * D, gvarp + b * K * D, gzb);
          if (count < kBlock) std::copy(g_pad.begin(), g_pad.begin() + count * D, gzp + i0 * D);
        }
      }
    });
  });
  return {g_z, g_lw, g_mu, g_var};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) {
  m.impl("score_paired", &score_paired_cpu);
  m.impl("score_paired_backward", &score_paired_backward_cpu);
}

}  // namespace cpu
}  // namespace s2m
