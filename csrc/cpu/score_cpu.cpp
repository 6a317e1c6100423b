// CPU glue of paired scoring, z (B,Q,D) against its own set's mixture -> (B,Q): the kernels
// are kernels_impl.h's paired_* of the active instruction-set level.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace s2m {
namespace cpu {
namespace {

// The inputs and sizes both directions share; the caller adds its outputs.
template <typename T>
PairedArgs<T> paired_args(const at::Tensor& z, const at::Tensor& lw, const at::Tensor& mu,
                          const at::Tensor& var) {
  PairedArgs<T> a{};
  a.z = z.data_ptr<T>();
  a.lw = lw.data_ptr<T>();
  a.mu = mu.data_ptr<T>();
  a.var = var.data_ptr<T>();
  a.B = z.size(0);
  a.Q = z.size(1);
  a.D = z.size(2);
  a.K = lw.size(1);
  return a;
}

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
    auto args = paired_args<T>(z, lw, mu, var);
    args.inv_var = inv_var.data_ptr<T>();
    args.log_norm = log_norm.data_ptr<T>();
    args.out = out.data_ptr<T>();
    const Kernels<T>& kern = kernels<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { kern.paired_precompute(args, begin, end); });
    const int64_t tasks = B * ((Q + kPairedRows - 1) / kPairedRows);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { kern.paired_rows(args, begin, end); });
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
  const int64_t B = m.batch;
  auto g_z = at::zeros_like(z);
  auto g_lw = at::zeros_like(lw);
  auto g_mu = at::zeros_like(mu);
  auto g_var = at::zeros_like(var);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "s2m::score_paired_backward (cpu)", [&] {
    using T = scalar_t;
    auto args = paired_args<T>(z, lw, mu, var);
    args.grad = grad.data_ptr<T>();
    args.g_z = g_z.data_ptr<T>();
    args.g_lw = g_lw.data_ptr<T>();
    args.g_mu = g_mu.data_ptr<T>();
    args.g_var = g_var.data_ptr<T>();
    const auto run = kernels<T>().paired_backward;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { run(args, begin, end); });
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
