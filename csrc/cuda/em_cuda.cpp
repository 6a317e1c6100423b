// CUDA glue of the fused EM ops: checks, dtype handling, allocation, current stream and device
// guard; the kernels are in em_kernels.cu.
//
// dtypes: float32 / float64 run as they are. float16 / bfloat16 inputs are computed in float32,
// and em_fit returns its trajectory and log-likelihood in float32 (the backward then recomputes
// exactly what the forward used); the public API casts the final parameters back to x.dtype.
// em_fit_backward returns gradients in the dtypes of the inputs they belong to.
#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/em_kernels.cuh"

namespace s2m {
namespace cuda {
namespace {

using namespace s2m::cuda_glue;

void check_set_sizes(int64_t N, int64_t D, int64_t K) {
  check_fits_int32(N * D, "N * D");
  check_fits_int32(K * D, "K * D");
  check_fits_int32(N * (K + kEmKC) * 8, "N * K");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_fit_cuda(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in, int64_t n_iter, double var_floor,
    double tol, bool keep_trajectory) {
  const MixtureSizes m = check_em_fit_args(x_in, w_in, lw_in, mu_in, var_in, n_iter, var_floor,
                                           tol, Backend::kCUDA);
  const int64_t B = m.batch, K = m.components, D = m.dims, N = x_in.size(1);
  check_set_sizes(N, D, K);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const auto x = prepare(x_in, ct), w = prepare(w_in, ct);
  const auto lw0 = prepare(lw_in, ct), mu0 = prepare(mu_in, ct), var0 = prepare(var_in, ct);
  const int64_t steps = keep_trajectory ? n_iter + 1 : 1;
  const auto opts = x.options();
  auto lw_traj = at::empty({steps, B, K}, opts);
  auto mu_traj = at::empty({steps, B, K, D}, opts);
  auto var_traj = at::empty({steps, B, K, D}, opts);
  auto loglik = at::empty({B}, opts);
  auto used = at::empty({B}, opts.dtype(at::kLong));
  auto converged = at::empty({B}, opts.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::em_fit (cuda)", [&] {
    using T = scalar_t;
    EmForwardArgs<T> a{};
    a.x = x.data_ptr<T>();
    a.w = w.data_ptr<T>();
    a.lw0 = lw0.data_ptr<T>();
    a.mu0 = mu0.data_ptr<T>();
    a.var0 = var0.data_ptr<T>();
    a.lw_traj = lw_traj.data_ptr<T>();
    a.mu_traj = mu_traj.data_ptr<T>();
    a.var_traj = var_traj.data_ptr<T>();
    a.loglik = loglik.data_ptr<T>();
    a.n_iter_used = used.data_ptr<int64_t>();
    a.converged = converged.data_ptr<bool>();
    a.B = B;
    a.N = N;
    a.D = D;
    a.K = K;
    a.n_iter = n_iter;
    a.steps = steps;
    a.var_floor = var_floor;
    a.tol = tol;
    const auto ws = workspace(em_forward_workspace_bytes<T>(B, N, D, K), x);
    check_launch(em_forward<T>(a, ws.data_ptr(), current_stream(x)), "s2m::em_fit");
  });
  return {lw_traj, mu_traj, var_traj, loglik, used, converged};
}

// n_iter_used[b] < steps. Reading the values costs a device sync, so this is checked only
// where a bad value is plausible: a one-step trajectory (em_fit called with
// keep_trajectory=False, or T = 0) outside CUDA graph capture. Otherwise the values come from
// em_fit with a full trajectory, and the kernel clamps them to [0, steps - 1] regardless.
void check_iterations_fit(const at::Tensor& n_iter_used, int64_t steps, cudaStream_t stream) {
  if (steps > 1 || n_iter_used.numel() == 0) return;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check_launch(cudaStreamIsCapturing(stream, &capturing), "s2m::em_fit_backward");
  if (capturing != cudaStreamCaptureStatusNone) return;
  const int64_t most = n_iter_used.max().item<int64_t>();
  TORCH_CHECK_VALUE(most < steps, "n_iter_used holds ", most, ", which needs a trajectory of more than ",
                    most, " steps, got ", steps, " (was em_fit called with keep_trajectory=False?)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_fit_backward_cuda(
    const c10::optional<at::Tensor>& g_lw_in, const c10::optional<at::Tensor>& g_mu_in,
    const c10::optional<at::Tensor>& g_var_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& lw_traj_in, const at::Tensor& mu_traj_in, const at::Tensor& var_traj_in,
    const at::Tensor& n_iter_used, double var_floor) {
  const TrajectorySizes sizes =
      check_em_fit_backward_args(g_lw_in, g_mu_in, g_var_in, x_in, w_in, lw_traj_in, mu_traj_in,
                                 var_traj_in, n_iter_used, var_floor, Backend::kCUDA);
  const int64_t steps = sizes.steps;
  const MixtureSizes& m = sizes.mixture;
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const int64_t B = m.batch, K = m.components, D = m.dims, N = x_in.size(1);
  check_set_sizes(N, D, K);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_iterations_fit(n_iter_used, steps, current_stream(x_in));
  const auto x = prepare(x_in, ct), w = prepare(w_in, ct);
  const auto lwt = lw_traj_in.contiguous(), mut = mu_traj_in.contiguous(),
             vart = var_traj_in.contiguous(), used = n_iter_used.contiguous();
  const bool has_grad = g_lw_in.has_value() || g_mu_in.has_value() || g_var_in.has_value();
  auto materialise = [&](const c10::optional<at::Tensor>& g, const at::Tensor& like) {
    return g.has_value() ? g->contiguous() : at::zeros_like(like);
  };
  at::Tensor g_lw, g_mu, g_var;
  if (has_grad) {
    g_lw = materialise(g_lw_in, lwt);
    g_mu = materialise(g_mu_in, mut);
    g_var = materialise(g_var_in, vart);
  }
  const auto opts = x.options();
  auto g_x = at::empty({B, N, D}, opts);
  auto g_w = at::empty({B, N}, opts);
  auto g_lw0 = at::empty({B, K}, opts);
  auto g_mu0 = at::empty({B, K, D}, opts);
  auto g_var0 = at::empty({B, K, D}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::em_fit_backward (cuda)", [&] {
    using T = scalar_t;
    EmBackwardArgs<T> a{};
    a.g_lw = has_grad ? g_lw.data_ptr<T>() : nullptr;
    a.g_mu = has_grad ? g_mu.data_ptr<T>() : nullptr;
    a.g_var = has_grad ? g_var.data_ptr<T>() : nullptr;
    a.x = x.data_ptr<T>();
    a.w = w.data_ptr<T>();
    a.lw_traj = lwt.data_ptr<T>();
    a.mu_traj = mut.data_ptr<T>();
    a.var_traj = vart.data_ptr<T>();
    a.n_iter_used = used.data_ptr<int64_t>();
    a.g_x = g_x.data_ptr<T>();
    a.g_w = g_w.data_ptr<T>();
    a.g_lw0 = g_lw0.data_ptr<T>();
    a.g_mu0 = g_mu0.data_ptr<T>();
    a.g_var0 = g_var0.data_ptr<T>();
    a.B = B;
    a.N = N;
    a.D = D;
    a.K = K;
    a.steps = steps;
    a.var_floor = var_floor;
    const auto ws = workspace(em_backward_workspace_bytes<T>(B, N, D, K), x);
    check_launch(em_backward<T>(a, ws.data_ptr(), current_stream(x)), "s2m::em_fit_backward");
  });
  const auto out = x_in.scalar_type();
  return {g_x.to(out), g_w.to(out), g_lw0.to(out), g_mu0.to(out), g_var0.to(out)};
}

// The EM layout a set of this size gets with max_smem bytes of shared memory per block:
// 0 all in shared memory, 1 x in global memory, 2 all in global memory (em_kernels.cuh). For
// tests and compute-sanitizer runs, which force each placement with S2M_CUDA_MAX_SMEM.
int64_t em_placement(int64_t N, int64_t D, int64_t K, bool double_precision, bool backward,
                     int64_t max_smem) {
  return double_precision ? em_placement_for_limit<double>(N, D, K, backward, max_smem)
                          : em_placement_for_limit<float>(N, D, K, backward, max_smem);
}

}  // namespace

// No tensor arguments, so no dispatch key: a catch-all kernel for the schema in s2m.cpp.
TORCH_LIBRARY_FRAGMENT(s2m, m) { m.impl("_cuda_em_placement", &em_placement); }

TORCH_LIBRARY_IMPL(s2m, CUDA, m) {
  m.impl("em_fit", &em_fit_cuda);
  m.impl("em_fit_backward", &em_fit_backward_cuda);
}

}  // namespace cuda
}  // namespace s2m
