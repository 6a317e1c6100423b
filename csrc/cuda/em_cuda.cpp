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
  const MixtureSizes m = check_mixture(lw_in, mu_in, var_in);
  check_points(x_in, w_in, m, mu_in);
  check_cuda_dtype(x_in, "x");
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  check_nonnegative(var_floor, "var_floor");
  check_nonnegative(tol, "tol");
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
  const int64_t steps = check_trajectory(lw_traj_in, mu_traj_in, var_traj_in);
  const MixtureSizes m =
      check_mixture(lw_traj_in.select(0, 0), mu_traj_in.select(0, 0), var_traj_in.select(0, 0));
  check_dim(x_in, "x", 3, "(B, N, D)");
  check_dim(w_in, "weights", 2, "(B, N)");
  check_cuda_dtype(x_in, "x");
  check_like(w_in, "weights", x_in, "x");
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  TORCH_CHECK_TYPE(mu_traj_in.scalar_type() == ct, "means_traj must be ", ct,
                   " (em_fit's trajectory dtype for x of dtype ", x_in.scalar_type(), "), got ",
                   mu_traj_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device() == mu_traj_in.device(), "x must be on the device of means_traj (",
                    mu_traj_in.device(), "), got ", x_in.device());
  check_size(x_in, "x", 0, m.batch, "the batch size B of the trajectory");
  check_size(x_in, "x", 2, m.dims, "the dimension D of the trajectory");
  TORCH_CHECK_VALUE(x_in.size(1) >= 1, "x must hold at least one point per set (N >= 1)");
  check_size(w_in, "weights", 0, x_in.size(0), "x.shape[0]");
  check_size(w_in, "weights", 1, x_in.size(1), "x.shape[1]");
  check_optional_like(g_lw_in, "grad_log_weights", lw_traj_in, "log_weights_traj");
  check_optional_like(g_mu_in, "grad_means", mu_traj_in, "means_traj");
  check_optional_like(g_var_in, "grad_variances", var_traj_in, "variances_traj");
  TORCH_CHECK_VALUE(n_iter_used.dim() == 1 && n_iter_used.size(0) == m.batch &&
                        n_iter_used.scalar_type() == at::kLong &&
                        n_iter_used.device() == x_in.device(),
                    "n_iter_used must be an int64 tensor of shape (B,) = (", m.batch,
                    ") on the device of x, got ", n_iter_used.scalar_type(), " of shape ",
                    n_iter_used.sizes(), " on ", n_iter_used.device());
  check_nonnegative(var_floor, "var_floor");
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

TORCH_LIBRARY_FRAGMENT(s2m, m) {
  m.def("_cuda_em_placement(int N, int D, int K, bool double_precision, bool backward, int max_smem) -> int",
        &em_placement);
}

TORCH_LIBRARY_IMPL(s2m, CUDA, m) {
  m.impl("em_fit", &em_fit_cuda);
  m.impl("em_fit_backward", &em_fit_backward_cuda);
}

}  // namespace cuda
}  // namespace s2m
