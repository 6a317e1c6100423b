// CUDA glue of the scoring ops (paired and pool, forward and backward); kernels in
// score_kernels.cu. float16 / bfloat16 are computed in float32 and returned in their own dtype.
//
// score_pool is a fused kernel rather than the CPU path's ATen expansion
// (cpu/score_pool_cpu.cpp), which writes and re-reads the (M, B*K) log-densities (16 GB at M = 1e6, B*K = 4000) and
// its float32 matrix products switch to TF32 when torch.backends.cuda.matmul.allow_tf32 is
// set, silently costing accuracy; the fused kernel does neither (bench/NOTES.md, CUDA).
#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/score_kernels.cuh"

namespace s2m {
namespace cuda {
namespace {

using namespace s2m::cuda_glue;

struct Mixture {
  at::Tensor lw, mu, var;
  MixtureSizes m;
};

Mixture prepare_mixture(const at::Tensor& lw, const at::Tensor& mu, const at::Tensor& var,
                        at::ScalarType ct) {
  Mixture out{prepare(lw, ct), prepare(mu, ct), prepare(var, ct), check_mixture(lw, mu, var)};
  check_fits_int32(out.m.components * out.m.dims, "K * D");
  return out;
}

template <typename T>
MixtureArgs<T> mixture_args(const Mixture& mix) {
  return {mix.lw.data_ptr<T>(), mix.mu.data_ptr<T>(), mix.var.data_ptr<T>(), mix.m.batch,
          mix.m.components, mix.m.dims};
}

MixtureSizes check_paired(const at::Tensor& z, const at::Tensor& lw, const at::Tensor& mu,
                          const at::Tensor& var) {
  const MixtureSizes m = check_paired_args(z, lw, mu, var, Backend::kCUDA);
  check_fits_int32((z.size(1) + 255) / 256 * std::max<int64_t>(m.batch, 1), "B * Q / 256");
  return m;
}

MixtureSizes check_pool(const at::Tensor& z, const at::Tensor& lw, const at::Tensor& mu,
                        const at::Tensor& var) {
  const MixtureSizes m = check_pool_args(z, lw, mu, var);
  check_backend_dtype(z, "z", Backend::kCUDA);
  return m;
}

at::Tensor score_paired_cuda(const at::Tensor& z_in, const at::Tensor& lw_in,
                             const at::Tensor& mu_in, const at::Tensor& var_in) {
  const MixtureSizes m = check_paired(z_in, lw_in, mu_in, var_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::ScalarType ct = compute_type(z_in.scalar_type());
  const auto z = prepare(z_in, ct);
  const Mixture mix = prepare_mixture(lw_in, mu_in, var_in, ct);
  const int64_t Q = z.size(1);
  auto out = at::empty({m.batch, Q}, z.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::score_paired (cuda)", [&] {
    using T = scalar_t;
    const auto ws = workspace(score_paired_workspace_bytes<T>(m.batch, m.components, m.dims), z);
    check_launch(score_paired<T>(z.data_ptr<T>(), Q, mixture_args<T>(mix), out.data_ptr<T>(),
                                 ws.data_ptr(), current_stream(z)),
                 "s2m::score_paired");
  });
  return out.to(z_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_paired_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in) {
  const MixtureSizes m = check_paired(z_in, lw_in, mu_in, var_in);
  check_score_grad(grad_in, z_in, m.batch, z_in.size(1), "(B, Q)");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::ScalarType ct = compute_type(z_in.scalar_type());
  const auto z = prepare(z_in, ct), grad = prepare(grad_in, ct);
  const Mixture mix = prepare_mixture(lw_in, mu_in, var_in, ct);
  const int64_t Q = z.size(1);
  auto g_z = at::empty_like(z);
  auto g_lw = at::empty_like(mix.lw);
  auto g_mu = at::empty_like(mix.mu);
  auto g_var = at::empty_like(mix.var);
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::score_paired_backward (cuda)", [&] {
    using T = scalar_t;
    ScoreBackwardArgs<T> a{grad.data_ptr<T>(), z.data_ptr<T>(), Q * m.dims, Q,
                           mixture_args<T>(mix), g_z.data_ptr<T>(), g_lw.data_ptr<T>(),
                           g_mu.data_ptr<T>(), g_var.data_ptr<T>()};
    const auto ws =
        workspace(score_backward_workspace_bytes<T>(m.batch, Q, m.components, m.dims), z);
    check_launch(score_paired_backward<T>(a, ws.data_ptr(), current_stream(z)),
                 "s2m::score_paired_backward");
  });
  const auto out = z_in.scalar_type();
  return {g_z.to(out), g_lw.to(out), g_mu.to(out), g_var.to(out)};
}

at::Tensor score_pool_cuda(const at::Tensor& z_in, const at::Tensor& lw_in, const at::Tensor& mu_in,
                           const at::Tensor& var_in) {
  const MixtureSizes m = check_pool(z_in, lw_in, mu_in, var_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::ScalarType ct = compute_type(z_in.scalar_type());
  const auto z = prepare(z_in, ct);
  const Mixture mix = prepare_mixture(lw_in, mu_in, var_in, ct);
  const int64_t M = z.size(0);
  auto out = at::empty({m.batch, M}, z.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::score_pool (cuda)", [&] {
    using T = scalar_t;
    const auto ws = workspace(score_pool_workspace_bytes<T>(m.batch, m.components, m.dims), z);
    check_launch(score_pool<T>(z.data_ptr<T>(), M, mixture_args<T>(mix), out.data_ptr<T>(),
                               ws.data_ptr(), current_stream(z)),
                 "s2m::score_pool");
  });
  return out.to(z_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_pool_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in) {
  const MixtureSizes m = check_pool(z_in, lw_in, mu_in, var_in);
  check_score_grad(grad_in, z_in, m.batch, z_in.size(0), "(B, M)");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::ScalarType ct = compute_type(z_in.scalar_type());
  const auto z = prepare(z_in, ct), grad = prepare(grad_in, ct);
  const Mixture mix = prepare_mixture(lw_in, mu_in, var_in, ct);
  const int64_t M = z.size(0);
  auto g_z = m.batch == 0 ? at::zeros_like(z) : at::empty_like(z);
  auto g_lw = at::empty_like(mix.lw);
  auto g_mu = at::empty_like(mix.mu);
  auto g_var = at::empty_like(mix.var);
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::score_pool_backward (cuda)", [&] {
    using T = scalar_t;
    const auto ws = workspace(
        score_pool_backward_workspace_bytes<T>(m.batch, M, m.components, m.dims), z);
    check_launch(score_pool_backward<T>(grad.data_ptr<T>(), z.data_ptr<T>(), M,
                                        mixture_args<T>(mix), g_z.data_ptr<T>(),
                                        g_lw.data_ptr<T>(), g_mu.data_ptr<T>(),
                                        g_var.data_ptr<T>(), ws.data_ptr(), current_stream(z)),
                 "s2m::score_pool_backward");
  });
  const auto out = z_in.scalar_type();
  return {g_z.to(out), g_lw.to(out), g_mu.to(out), g_var.to(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CUDA, m) {
  m.impl("score_paired", &score_paired_cuda);
  m.impl("score_paired_backward", &score_paired_backward_cuda);
  m.impl("score_pool", &score_pool_cuda);
  m.impl("score_pool_backward", &score_pool_backward_cuda);
}

}  // namespace cuda
}  // namespace s2m
