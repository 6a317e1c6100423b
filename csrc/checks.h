// Argument checks shared by the CPU and CUDA glue. They raise ValueError (TORCH_CHECK_VALUE)
// or TypeError (TORCH_CHECK_TYPE) naming the op argument, like the Python API does for its
// own arguments, so that calling torch.ops.s2m.* directly is as safe as the public API.
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

namespace s2m {

// Sizes of a batched mixture problem, read off the inputs once they pass the checks.
struct MixtureSizes {
  int64_t batch;
  int64_t components;
  int64_t dims;
};

inline void check_dim(const at::Tensor& t, const char* name, int64_t ndim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", shape, ", got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, ".shape[", dim, "] must equal ", what, " (",
                    expected, "), got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// log_weights (B,K), means (B,K,D), variances (B,K,D), consistent with each other.
inline MixtureSizes check_mixture(const at::Tensor& log_weights, const at::Tensor& means,
                                  const at::Tensor& variances) {
  check_dim(log_weights, "log_weights", 2, "(B, K)");
  check_dim(means, "means", 3, "(B, K, D)");
  check_dim(variances, "variances", 3, "(B, K, D)");
  check_floating(means, "means");
  check_like(log_weights, "log_weights", means, "means");
  check_like(variances, "variances", means, "means");
  const MixtureSizes m{means.size(0), means.size(1), means.size(2)};
  TORCH_CHECK_VALUE(m.components >= 1, "means must have at least one component (K >= 1)");
  TORCH_CHECK_VALUE(m.dims >= 1, "means must have at least one dimension (D >= 1)");
  check_size(log_weights, "log_weights", 0, m.batch, "means.shape[0]");
  check_size(log_weights, "log_weights", 1, m.components, "means.shape[1]");
  TORCH_CHECK_VALUE(variances.sizes() == means.sizes(), "variances must have the shape of means ",
                    means.sizes(), ", got ", variances.sizes());
  return m;
}

// x (B,N,D) and weights (B,N) against a mixture of B sets in D dimensions.
inline void check_points(const at::Tensor& x, const at::Tensor& weights, const MixtureSizes& m,
                         const at::Tensor& means) {
  check_dim(x, "x", 3, "(B, N, D)");
  check_dim(weights, "weights", 2, "(B, N)");
  check_like(x, "x", means, "means");
  check_like(weights, "weights", x, "x");
  check_size(x, "x", 0, m.batch, "the batch size B of the mixture parameters");
  check_size(x, "x", 2, m.dims, "the dimension D of the mixture parameters");
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must hold at least one point per set (N >= 1)");
  check_size(weights, "weights", 0, x.size(0), "x.shape[0]");
  check_size(weights, "weights", 1, x.size(1), "x.shape[1]");
}

// A (steps, B, K[, D]) trajectory of mixture parameters.
inline int64_t check_trajectory(const at::Tensor& log_weights, const at::Tensor& means,
                                const at::Tensor& variances) {
  check_dim(log_weights, "log_weights_traj", 3, "(steps, B, K)");
  check_dim(means, "means_traj", 4, "(steps, B, K, D)");
  check_dim(variances, "variances_traj", 4, "(steps, B, K, D)");
  check_mixture(log_weights.select(0, 0), means.select(0, 0), variances.select(0, 0));
  TORCH_CHECK_VALUE(log_weights.size(0) == means.size(0) && means.size(0) == variances.size(0),
                    "the trajectories must have the same number of steps, got ",
                    log_weights.size(0), ", ", means.size(0), " and ", variances.size(0));
  return means.size(0);
}

inline void check_optional_like(const c10::optional<at::Tensor>& t, const char* name,
                                const at::Tensor& ref, const char* ref_name) {
  if (!t.has_value()) return;
  check_like(*t, name, ref, ref_name);
  TORCH_CHECK_VALUE(t->sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t->sizes());
}

inline void check_nonnegative(double value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0.0 && std::isfinite(value), name,
                    " must be a finite number >= 0, got ", value);
}

}  // namespace s2m
