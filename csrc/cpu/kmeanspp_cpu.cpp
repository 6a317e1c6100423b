// Batched k-means++ (D^2) seeding on the CPU. The randomness comes in as uniforms (B,K)
// drawn from the caller's torch.Generator, so the op itself is a pure function.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "common/gmm_math.h"

namespace s2m {
namespace cpu {
namespace {

// First index n with cumsum(p)[n] > u * sum(p) (p >= 0, sum(p) > 0): inverse-CDF sampling.
template <typename T>
int64_t sample_index(const T* p, int64_t n, double u) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += double(p[i]);
  const double target = u * total;
  double cum = 0;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += double(p[i]);
    if (p[i] > T(0)) last_positive = i;
    if (cum > target) return i;
  }
  return last_positive;  // only reached through rounding when u is within an ulp of 1
}

template <typename T>
void seed_set(const T* x, const T* w, const double* u, int64_t N, int64_t D, int64_t K,
              int64_t* idx, std::vector<T>& d2, std::vector<T>& p) {
  d2.assign(N, std::numeric_limits<T>::infinity());
  p.resize(N);
  idx[0] = sample_index(w, N, u[0]);
  for (int64_t j = 1; j < K; ++j) {
    const T* c = x + idx[j - 1] * D;
    double total = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* xn = x + n * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) {
        const T diff = xn[d] - c[d];
        acc += diff * diff;
      }
      d2[n] = std::min(d2[n], acc);
      p[n] = weighted(w[n], d2[n]);  // a far zero-weight point: 0, not 0 * Inf
      total += double(p[n]);
    }
    // Fewer distinct (weighted) points than components: fall back to sampling by weight.
    idx[j] = total > 0 ? sample_index(p.data(), N, u[j]) : sample_index(w, N, u[j]);
  }
}

at::Tensor kmeanspp_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in) {
  check_kmeanspp_args(x_in, w_in, u_in, Backend::kCPU);
  const auto x = x_in.contiguous(), w = w_in.contiguous(), u = u_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = u.size(1);
  auto idx = at::empty({B, K}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s2m::kmeanspp (cpu)", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
    const double* up = u.data_ptr<double>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> d2, p;
      for (int64_t b = begin; b < end; ++b)
        seed_set(xp + b * N * D, wp + b * N, up + b * K, N, D, K, ip + b * K, d2, p);
    });
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2m, CPU, m) { m.impl("kmeanspp", &kmeanspp_cpu); }

}  // namespace cpu
}  // namespace s2m
