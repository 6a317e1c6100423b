// CPU glue of batched k-means++ (D^2) seeding and of the initial parameters of a k-means++ fit
// (the kernel: kernels_impl.h's seed_set and initial_parameters). The randomness comes in as
// uniforms (B,K) drawn from the caller's torch.Generator, so the ops are pure functions.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace s2m {
namespace cpu {
namespace {

// Runs the level's kmeanspp kernel over sets in parallel; the parameter outputs may be undefined
// (s2m::kmeanspp).
void run_kmeanspp(const at::Tensor& x, const at::Tensor& w, const at::Tensor& u, const at::Tensor& idx,
                  const at::Tensor& log_weights, const at::Tensor& means, const at::Tensor& variances,
                  double var_floor) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = u.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2m::kmeanspp (cpu)", [&] {
    using T = scalar_t;
    auto out = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const KmeansppArgs<T> args{x.data_ptr<T>(), w.data_ptr<T>(),       u.data_ptr<double>(),
                               idx.data_ptr<int64_t>(), out(log_weights), out(means),
                               out(variances),          T(var_floor),     B, N, D, K};
    const auto run = kernels<T>().kmeanspp;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

at::Tensor kmeanspp_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in) {
  check_kmeanspp_args(x_in, w_in, u_in, Backend::kCPU);
  const auto x = x_in.contiguous(), w = w_in.contiguous(), u = u_in.contiguous();
  auto idx = at::empty({x.size(0), u.size(1)}, x.options().dtype(at::kLong));
  run_kmeanspp(x, w, u, idx, {}, {}, {}, 0.0);
  return idx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeanspp_init_cpu(const at::Tensor& x_in,
                                                                 const at::Tensor& w_in,
                                                                 const at::Tensor& u_in,
                                                                 double var_floor) {
  const int64_t K = check_kmeanspp_init_args(x_in, w_in, u_in, var_floor, Backend::kCPU);
  const auto x = x_in.contiguous(), w = w_in.contiguous(), u = u_in.contiguous();
  const int64_t B = x.size(0), D = x.size(2);
  auto idx = at::empty({B, K}, x.options().dtype(at::kLong));
  auto log_weights = at::empty({B, K}, x.options());
  auto means = at::empty({B, K, D}, x.options()), variances = at::empty({B, K, D}, x.options());
  run_kmeanspp(x, w, u, idx, log_weights, means, variances, var_floor);
  return {log_weights, means, variances};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) {
  m.impl("kmeanspp", &kmeanspp_cpu);
  m.impl("kmeanspp_init", &kmeanspp_init_cpu);
}

}  // namespace cpu
}  // namespace s2m
