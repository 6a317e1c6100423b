// CPU glue of batched k-means++ (D^2) seeding (the kernel: kernels_impl.h's seed_set). The
// randomness comes in as uniforms (B,K) drawn from the caller's torch.Generator, so the op
// itself is a pure function.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace s2m {
namespace cpu {
namespace {

at::Tensor kmeanspp_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in) {
  check_kmeanspp_args(x_in, w_in, u_in, Backend::kCPU);
  const auto x = x_in.contiguous(), w = w_in.contiguous(), u = u_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = u.size(1);
  auto idx = at::empty({B, K}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2m::kmeanspp (cpu)", [&] {
    using T = scalar_t;
    const KmeansppArgs<T> args{x.data_ptr<T>(), w.data_ptr<T>(), u.data_ptr<double>(),
                               idx.data_ptr<int64_t>(), B, N, D, K};
    const auto run = kernels<T>().kmeanspp;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) { m.impl("kmeanspp", &kmeanspp_cpu); }

}  // namespace cpu
}  // namespace s2m
