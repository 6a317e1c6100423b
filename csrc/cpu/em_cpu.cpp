// CPU glue of the fused EM ops: checks, allocation, and a parallel loop over sets (or over one
// set's point chunks) that runs the torch-free per-set kernels (em_set.h) of the active level.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace s2m {
namespace cpu {
namespace {

void intra_op_range(int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

// Runs a kernel over all B sets: sets in parallel, or, with fewer sets than threads and sets of
// more than one point chunk, one set after another with each set's chunks in parallel. Both
// give the same result bit for bit (kernels.h, kChunkPoints).
template <class Args>
void run_sets(Args args, void (*kernel)(const Args&, int64_t, int64_t)) {
  if (args.B < at::get_num_threads() && args.N > kChunkPoints && !at::in_parallel_region()) {
    args.points.for_range = &intra_op_range;
    kernel(args, 0, args.B);
  } else {
    at::parallel_for(0, args.B, 1, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_fit_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& lw_in,
    const at::Tensor& mu_in, const at::Tensor& var_in, int64_t n_iter, double var_floor,
    double tol, bool keep_trajectory) {
  const MixtureSizes m = check_em_fit_args(x_in, w_in, lw_in, mu_in, var_in, n_iter, var_floor,
                                           tol, Backend::kCPU);

  const auto x = x_in.contiguous(), w = w_in.contiguous();
  const auto lw0 = lw_in.contiguous(), mu0 = mu_in.contiguous(), var0 = var_in.contiguous();
  const int64_t B = m.batch, K = m.components, D = m.dims, N = x.size(1);
  const int64_t steps = keep_trajectory ? n_iter + 1 : 1;
  auto lw_traj = at::empty({steps, B, K}, x.options());
  auto mu_traj = at::empty({steps, B, K, D}, x.options());
  auto var_traj = at::empty({steps, B, K, D}, x.options());
  auto loglik = at::empty({B}, x.options());
  auto used = at::empty({B}, x.options().dtype(at::kLong));
  auto converged = at::empty({B}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2m::em_fit (cpu)", [&] {
    using T = scalar_t;
    const EmForwardArgs<T> args{x.data_ptr<T>(),        w.data_ptr<T>(),        lw0.data_ptr<T>(),
                                mu0.data_ptr<T>(),      var0.data_ptr<T>(),     lw_traj.data_ptr<T>(),
                                mu_traj.data_ptr<T>(),  var_traj.data_ptr<T>(), loglik.data_ptr<T>(),
                                used.data_ptr<int64_t>(), converged.data_ptr<bool>(),
                                B, N, D, K, steps, FitSettings{n_iter, var_floor, tol}};
    run_sets(args, kernels<T>().em_forward);
  });
  return {lw_traj, mu_traj, var_traj, loglik, used, converged};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_fit_backward_cpu(
    const c10::optional<at::Tensor>& g_lw_in, const c10::optional<at::Tensor>& g_mu_in,
    const c10::optional<at::Tensor>& g_var_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& lw_traj_in, const at::Tensor& mu_traj_in, const at::Tensor& var_traj_in,
    const at::Tensor& n_iter_used, double var_floor) {
  const TrajectorySizes sizes =
      check_em_fit_backward_args(g_lw_in, g_mu_in, g_var_in, x_in, w_in, lw_traj_in, mu_traj_in,
                                 var_traj_in, n_iter_used, var_floor, Backend::kCPU);
  const int64_t steps = sizes.steps;
  const MixtureSizes& m = sizes.mixture;
  const auto used = n_iter_used.contiguous();
  const int64_t* usedp = used.data_ptr<int64_t>();
  for (int64_t b = 0; b < m.batch; ++b) {
    TORCH_CHECK_VALUE(usedp[b] >= 0 && usedp[b] < steps, "n_iter_used[", b, "] = ", usedp[b],
                      " needs a trajectory of more than ", usedp[b], " steps, got ", steps,
                      " (was em_fit called with keep_trajectory=False?)");
  }

  const int64_t B = m.batch, K = m.components, D = m.dims, N = x_in.size(1);
  const auto x = x_in.contiguous(), w = w_in.contiguous();
  const auto lwt = lw_traj_in.contiguous(), mut = mu_traj_in.contiguous(), vart = var_traj_in.contiguous();
  const bool has_grad = g_lw_in.has_value() || g_mu_in.has_value() || g_var_in.has_value();
  auto materialise = [&](const c10::optional<at::Tensor>& g, const at::Tensor& like) {
    return g.has_value() ? g->contiguous() : at::zeros_like(like);
  };
  const auto g_lw = materialise(g_lw_in, lwt), g_mu = materialise(g_mu_in, mut),
             g_var = materialise(g_var_in, vart);

  auto g_x = at::empty_like(x);
  auto g_w = at::empty_like(w);
  auto g_lw0 = at::empty({B, K}, x.options());
  auto g_mu0 = at::empty({B, K, D}, x.options());
  auto g_var0 = at::empty({B, K, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2m::em_fit_backward (cpu)", [&] {
    using T = scalar_t;
    const EmBackwardArgs<T> args{x.data_ptr<T>(),     w.data_ptr<T>(),     lwt.data_ptr<T>(),
                                 mut.data_ptr<T>(),   vart.data_ptr<T>(),  g_lw.data_ptr<T>(),
                                 g_mu.data_ptr<T>(),  g_var.data_ptr<T>(), usedp,
                                 has_grad,            T(var_floor),        g_x.data_ptr<T>(),
                                 g_w.data_ptr<T>(),   g_lw0.data_ptr<T>(), g_mu0.data_ptr<T>(),
                                 g_var0.data_ptr<T>(), B, N, D, K, steps};
    run_sets(args, kernels<T>().em_backward);
  });
  return {g_x, g_w, g_lw0, g_mu0, g_var0};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) {
  m.impl("em_fit", &em_fit_cpu);
  m.impl("em_fit_backward", &em_fit_backward_cpu);
}

}  // namespace cpu
}  // namespace s2m
