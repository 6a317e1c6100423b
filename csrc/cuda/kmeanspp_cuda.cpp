// CUDA glue of k-means++ seeding; kernel in kmeanspp_kernels.cu. float16 / bfloat16 points are
// compared in float32.
#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_glue.h"
#include "cuda/kmeanspp_kernels.cuh"

namespace s2m {
namespace cuda {
namespace {

using namespace s2m::cuda_glue;

at::Tensor kmeanspp_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in) {
  check_dim(x_in, "x", 3, "(B, N, D)");
  check_cuda_dtype(x_in, "x");
  check_dim(w_in, "weights", 2, "(B, N)");
  check_like(w_in, "weights", x_in, "x");
  check_size(w_in, "weights", 0, x_in.size(0), "x.shape[0]");
  check_size(w_in, "weights", 1, x_in.size(1), "x.shape[1]");
  check_dim(u_in, "uniforms", 2, "(B, K)");
  TORCH_CHECK_TYPE(u_in.scalar_type() == at::kDouble, "uniforms must be float64, got ",
                   u_in.scalar_type());
  TORCH_CHECK_VALUE(u_in.device() == x_in.device(), "uniforms must be on the device of x (",
                    x_in.device(), "), got ", u_in.device());
  check_size(u_in, "uniforms", 0, x_in.size(0), "x.shape[0]");
  TORCH_CHECK_VALUE(u_in.size(1) >= 1, "uniforms must have K >= 1 columns");
  TORCH_CHECK_VALUE(x_in.size(1) >= 1, "x must hold at least one point per set (N >= 1)");
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = u_in.size(1);
  check_fits_int32(N * std::max<int64_t>(D, 1), "N * D");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType ct = compute_type(x_in.scalar_type());
  const auto x = prepare(x_in, ct), w = prepare(w_in, ct), u = u_in.contiguous();
  auto idx = at::empty({B, K}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(ct, "s2m::kmeanspp (cuda)", [&] {
    using T = scalar_t;
    const auto ws = workspace(kmeanspp_workspace_bytes<T>(B, N), x);
    check_launch(kmeanspp<T>(x.data_ptr<T>(), w.data_ptr<T>(), u.data_ptr<double>(), B, N, D, K,
                             idx.data_ptr<int64_t>(), ws.data_ptr(), current_stream(x)),
                 "s2m::kmeanspp");
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CUDA, m) { m.impl("kmeanspp", &kmeanspp_cuda); }

}  // namespace cuda
}  // namespace s2m
