// CUDA glue of k-means++ seeding and of the initial parameters of a k-means++ fit; kernel in
// kmeanspp_kernels.cu. float16 / bfloat16 points are compared (and their moments taken) in
// float32.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/kmeanspp_kernels.cuh"

namespace s2m {
namespace cuda {
namespace {

using namespace s2m::cuda_glue;

// Runs the kmeanspp kernel on x and w in the compute type; the parameter outputs (in that type)
// may be undefined (s2m::kmeanspp).
at::Tensor run_kmeanspp(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in,
                        const at::Tensor& log_weights, const at::Tensor& means,
                        const at::Tensor& variances, double var_floor) {
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = u_in.size(1);
  check_fits_int32(N * std::max<int64_t>(D, 1), "N * D");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const auto x = prepare(x_in, ct), w = prepare(w_in, ct), u = u_in.contiguous();
  auto idx = at::empty({B, K}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::kmeanspp (cuda)", [&] {
    using T = scalar_t;
    KmeansppInit<T> init;
    if (means.defined())
      init = {log_weights.data_ptr<T>(), means.data_ptr<T>(), variances.data_ptr<T>(), T(var_floor)};
    const auto ws = workspace(kmeanspp_workspace_bytes<T>(B, N), x);
    check_launch(kmeanspp<T>(x.data_ptr<T>(), w.data_ptr<T>(), u.data_ptr<double>(), B, N, D, K,
                             idx.data_ptr<int64_t>(), init, ws.data_ptr(), current_stream(x)),
                 "s2m::kmeanspp");
  });
  return idx;
}

at::Tensor kmeanspp_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in) {
  check_kmeanspp_args(x_in, w_in, u_in, Backend::kCUDA);
  return run_kmeanspp(x_in, w_in, u_in, {}, {}, {}, 0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeanspp_init_cuda(const at::Tensor& x_in,
                                                                  const at::Tensor& w_in,
                                                                  const at::Tensor& u_in,
                                                                  double var_floor) {
  const int64_t K = check_kmeanspp_init_args(x_in, w_in, u_in, var_floor, Backend::kCUDA);
  const int64_t B = x_in.size(0), D = x_in.size(2);
  const auto opts = x_in.options().dtype(compute_type(x_in.scalar_type()));
  auto log_weights = at::empty({B, K}, opts);
  auto means = at::empty({B, K, D}, opts), variances = at::empty({B, K, D}, opts);
  run_kmeanspp(x_in, w_in, u_in, log_weights, means, variances, var_floor);
  if (x_in.scalar_type() == opts.dtype().toScalarType()) return {log_weights, means, variances};
  // float16 / bfloat16: computed in float32, then held in x's dtype, whose least variance
  // (eps**2 of that dtype) is larger than float32's.
  const double eps = x_in.scalar_type() == at::kHalf
                        ? double(std::numeric_limits<c10::Half>::epsilon())
                        : double(std::numeric_limits<c10::BFloat16>::epsilon());
  return {log_weights.to(x_in.scalar_type()), means.to(x_in.scalar_type()),
          variances.to(x_in.scalar_type()).clamp_min_(eps * eps)};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CUDA, m) {
  m.impl("kmeanspp", &kmeanspp_cuda);
  m.impl("kmeanspp_init", &kmeanspp_init_cuda);
}

}  // namespace cuda
}  // namespace s2m
