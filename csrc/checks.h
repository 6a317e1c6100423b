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
struct TrajectorySizes {
  int64_t steps;
  MixtureSizes mixture;
};

inline TrajectorySizes check_trajectory(const at::Tensor& log_weights, const at::Tensor& means,
                                        const at::Tensor& variances) {
  check_dim(log_weights, "log_weights_traj", 3, "(steps, B, K)");
  check_dim(means, "means_traj", 4, "(steps, B, K, D)");
  check_dim(variances, "variances_traj", 4, "(steps, B, K, D)");
  TORCH_CHECK_VALUE(log_weights.size(0) == means.size(0) && means.size(0) == variances.size(0),
                    "the trajectories must have the same number of steps, got ",
                    log_weights.size(0), ", ", means.size(0), " and ", variances.size(0));
  TORCH_CHECK_VALUE(means.size(0) >= 1, "the trajectories must hold at least one step");
  return {means.size(0),
          check_mixture(log_weights.select(0, 0), means.select(0, 0), variances.select(0, 0))};
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

// ---------------------------------------------------------------------------------------
// Per-op argument checks, shared by the CPU and CUDA glue. The backends differ only in the
// dtypes their kernels take: float32/float64 on both, float16/bfloat16 too on CUDA (computed
// in float32, the compute_type).
enum class Backend { kCPU, kCUDA };

inline at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_backend_dtype(const at::Tensor& t, const char* name, Backend backend) {
  const auto s = t.scalar_type();
  if (backend == Backend::kCUDA) {
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                     name, " must be float32, float64, float16 or bfloat16 on CUDA, got ", s);
  } else {
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble, name,
                     " must be float32 or float64 on the CPU, got ", s);
  }
}

// s2m::em_fit
inline MixtureSizes check_em_fit_args(const at::Tensor& x, const at::Tensor& weights,
                                      const at::Tensor& log_weights, const at::Tensor& means,
                                      const at::Tensor& variances, int64_t n_iter,
                                      double var_floor, double tol, Backend backend) {
  const MixtureSizes m = check_mixture(log_weights, means, variances);
  check_points(x, weights, m, means);
  check_backend_dtype(x, "x", backend);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  check_nonnegative(var_floor, "var_floor");
  check_nonnegative(tol, "tol");
  return m;
}

// s2m::em_fit_backward. The trajectory is in the compute type of x (em_fit's output); the
// values of n_iter_used (< steps) are checked by each backend, where reading them is cheap.
inline TrajectorySizes check_em_fit_backward_args(
    const c10::optional<at::Tensor>& g_lw, const c10::optional<at::Tensor>& g_mu,
    const c10::optional<at::Tensor>& g_var, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& lw_traj, const at::Tensor& mu_traj, const at::Tensor& var_traj,
    const at::Tensor& n_iter_used, double var_floor, Backend backend) {
  const TrajectorySizes t = check_trajectory(lw_traj, mu_traj, var_traj);
  const MixtureSizes& m = t.mixture;
  check_dim(x, "x", 3, "(B, N, D)");
  check_dim(weights, "weights", 2, "(B, N)");
  check_backend_dtype(x, "x", backend);
  check_like(weights, "weights", x, "x");
  const at::ScalarType ct = compute_type(x.scalar_type());
  TORCH_CHECK_TYPE(mu_traj.scalar_type() == ct, "means_traj must be ", ct,
                   " (em_fit's trajectory dtype for x of dtype ", x.scalar_type(), "), got ",
                   mu_traj.scalar_type());
  TORCH_CHECK_VALUE(x.device() == mu_traj.device(), "x must be on the device of means_traj (",
                    mu_traj.device(), "), got ", x.device());
  check_size(x, "x", 0, m.batch, "the batch size B of the trajectory");
  check_size(x, "x", 2, m.dims, "the dimension D of the trajectory");
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must hold at least one point per set (N >= 1)");
  check_size(weights, "weights", 0, x.size(0), "x.shape[0]");
  check_size(weights, "weights", 1, x.size(1), "x.shape[1]");
  check_optional_like(g_lw, "grad_log_weights", lw_traj, "log_weights_traj");
  check_optional_like(g_mu, "grad_means", mu_traj, "means_traj");
  check_optional_like(g_var, "grad_variances", var_traj, "variances_traj");
  TORCH_CHECK_VALUE(n_iter_used.dim() == 1 && n_iter_used.size(0) == m.batch &&
                        n_iter_used.scalar_type() == at::kLong &&
                        n_iter_used.device() == x.device(),
                    "n_iter_used must be an int64 tensor of shape (B,) = (", m.batch,
                    ") on the device of x, got ", n_iter_used.scalar_type(), " of shape ",
                    n_iter_used.sizes(), " on ", n_iter_used.device());
  check_nonnegative(var_floor, "var_floor");
  return t;
}

// s2m::score_paired(_backward): z (B,Q,D)
inline MixtureSizes check_paired_args(const at::Tensor& z, const at::Tensor& log_weights,
                                      const at::Tensor& means, const at::Tensor& variances,
                                      Backend backend) {
  const MixtureSizes m = check_mixture(log_weights, means, variances);
  check_dim(z, "z", 3, "(B, Q, D)");
  check_like(z, "z", means, "means");
  check_size(z, "z", 0, m.batch, "the batch size B of the mixture");
  check_size(z, "z", 2, m.dims, "the dimension D of the mixture");
  check_backend_dtype(z, "z", backend);
  return m;
}

// s2m::score_pool(_backward): z (M,D)
inline MixtureSizes check_pool_args(const at::Tensor& z, const at::Tensor& log_weights,
                                    const at::Tensor& means, const at::Tensor& variances) {
  const MixtureSizes m = check_mixture(log_weights, means, variances);
  check_dim(z, "z", 2, "(M, D)");
  check_like(z, "z", means, "means");
  check_size(z, "z", 1, m.dims, "the dimension D of the mixtures");
  return m;
}

// s2m::score_pool_topk: the running top k of every mixture, values (B, n) like z and
// indices (B, n) int64 on z's device, n <= k.
inline void check_topk_state(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& z,
                             int64_t batch, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  check_dim(values, "values", 2, "(B, n)");
  check_like(values, "values", z, "z");
  check_size(values, "values", 0, batch, "the batch size B of the mixtures");
  TORCH_CHECK_VALUE(values.size(1) <= k, "values must hold at most k = ", k, " columns, got ", values.size(1));
  check_dim(indices, "indices", 2, "(B, n)");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == z.device(), "indices must be on the device of z (", z.device(),
                    "), got ", indices.device());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "indices must have the shape of values ",
                    values.sizes(), ", got ", indices.sizes());
}

// The upstream gradient of a scoring op: (rows, cols) like z.
inline void check_score_grad(const at::Tensor& grad, const at::Tensor& z, int64_t rows,
                             int64_t cols, const char* shape) {
  check_dim(grad, "grad", 2, shape);
  check_like(grad, "grad", z, "z");
  TORCH_CHECK_VALUE(grad.size(0) == rows && grad.size(1) == cols, "grad must have shape ", shape,
                    " = (", rows, ", ", cols, "), got ", grad.sizes());
}

// s2m::kmeanspp: x (B,N,D), weights (B,N), uniforms (B,K) float64. Returns K.
inline int64_t check_kmeanspp_args(const at::Tensor& x, const at::Tensor& weights,
                                   const at::Tensor& uniforms, Backend backend) {
  check_dim(x, "x", 3, "(B, N, D)");
  check_backend_dtype(x, "x", backend);
  check_dim(weights, "weights", 2, "(B, N)");
  check_like(weights, "weights", x, "x");
  check_size(weights, "weights", 0, x.size(0), "x.shape[0]");
  check_size(weights, "weights", 1, x.size(1), "x.shape[1]");
  check_dim(uniforms, "uniforms", 2, "(B, K)");
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kDouble, "uniforms must be float64, got ",
                   uniforms.scalar_type());
  TORCH_CHECK_VALUE(uniforms.device() == x.device(), "uniforms must be on the device of x (",
                    x.device(), "), got ", uniforms.device());
  check_size(uniforms, "uniforms", 0, x.size(0), "x.shape[0]");
  TORCH_CHECK_VALUE(uniforms.size(1) >= 1, "uniforms must have K >= 1 columns");
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must hold at least one point per set (N >= 1)");
  return uniforms.size(1);
}

// s2m::kmeanspp_init: the arguments of s2m::kmeanspp and var_floor >= 0. Returns K.
inline int64_t check_kmeanspp_init_args(const at::Tensor& x, const at::Tensor& weights,
                                        const at::Tensor& uniforms, double var_floor,
                                        Backend backend) {
  check_nonnegative(var_floor, "var_floor");
  return check_kmeanspp_args(x, weights, uniforms, backend);
}

}  // namespace s2m
