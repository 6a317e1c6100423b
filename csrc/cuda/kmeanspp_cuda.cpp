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
  check_kmeanspp_args(x_in, w_in, u_in, Backend::kCUDA);
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
