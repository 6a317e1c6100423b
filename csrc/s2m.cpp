// Every op schema of the s2m namespace, and the Python module s2m_ext._C.
//
// Kernels register per dispatch key in their own folders: cpu/ (CPU) and cuda/ (CUDA).
// Autograd, fake (meta) implementations and the composite kernels of em_fit_implicit (built
// from the other ops) are registered in Python (s2m_ext/_ops.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"

#ifdef S2M_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(s2m, m) {
  // T EM iterations for B weighted sets. Returns (log_weights, means, variances) for every
  // step 0..T if keep_trajectory (leading dim T+1, needed for the backward) else only the
  // final ones (leading dim 1); the mean weighted log-likelihood of the returned parameters
  // (B); the iterations each set ran (B, int64) and whether it met tol (B, bool).
  m.def(
      "em_fit(Tensor x, Tensor weights, Tensor log_weights, Tensor means, Tensor variances, "
      "int n_iter, float var_floor, float tol, bool keep_trajectory) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Reverse-mode of em_fit from its trajectory: gradients for x, weights and the initial
  // (log_weights, means, variances), given gradients on the whole trajectory.
  m.def(
      "em_fit_backward(Tensor? grad_log_weights, Tensor? grad_means, Tensor? grad_variances, "
      "Tensor x, Tensor weights, Tensor log_weights_traj, Tensor means_traj, "
      "Tensor variances_traj, Tensor n_iter_used, float var_floor) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // log p(z[b,q]) under mixture b: (B,Q,D) -> (B,Q).
  m.def("score_paired(Tensor z, Tensor log_weights, Tensor means, Tensor variances) -> Tensor");
  m.def(
      "score_paired_backward(Tensor grad, Tensor z, Tensor log_weights, Tensor means, "
      "Tensor variances) -> (Tensor, Tensor, Tensor, Tensor)");
  // log p(z[m]) under every mixture b: (M,D) -> (B,M).
  m.def("score_pool(Tensor z, Tensor log_weights, Tensor means, Tensor variances) -> Tensor");
  m.def(
      "score_pool_backward(Tensor grad, Tensor z, Tensor log_weights, Tensor means, "
      "Tensor variances) -> (Tensor, Tensor, Tensor, Tensor)");
  // The pool rows z (M,D), items offset..offset+M-1, merged into the running top k of every
  // mixture, values/indices (B,n) with n <= k: the best min(k, n+M) of each row by score
  // descending, ties by the lower index. No gradient (a search).
  m.def(
      "score_pool_topk(Tensor z, Tensor log_weights, Tensor means, Tensor variances, Tensor values, "
      "Tensor indices, int offset, int k) -> (Tensor, Tensor)");
  // k-means++ seeding: indices (B,K) of the chosen points, from uniforms (B,K) in [0,1).
  m.def("kmeanspp(Tensor x, Tensor weights, Tensor uniforms) -> Tensor");
  // The initial parameters of a k-means++ fit: (log_weights (B,K) = -log K, means (B,K,D) = the
  // points kmeanspp draws, variances (B,K,D) = the set's weighted variance + var_floor, at least
  // eps**2). Constants: no gradient.
  m.def("kmeanspp_init(Tensor x, Tensor weights, Tensor uniforms, float var_floor) -> (Tensor, Tensor, Tensor)");
  // em_fit without a trajectory, differentiated implicitly at the fixed point it reached: the
  // final (log_weights, means, variances, loglik, n_iter_used, converged). The solve settings
  // (tolerance, most products, "fixed_point" or "gmres", GMRES restart) matter only for the
  // backward, em_fit_implicit_backward, which returns the gradients of em_fit_backward.
  m.def(
      "em_fit_implicit(Tensor x, Tensor weights, Tensor log_weights, Tensor means, Tensor variances, "
      "int n_iter, float var_floor, float tol, float solve_tol, int solve_max_iter, str solver, "
      "int restart) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "em_fit_implicit_backward(Tensor grad_log_weights, Tensor grad_means, Tensor grad_variances, "
      "Tensor x, Tensor weights, Tensor log_weights, Tensor means, Tensor variances, "
      "float var_floor, float solve_tol, int solve_max_iter, str solver, int restart) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
#ifdef S2M_WITH_CUDA
  // Test hook: the EM layout a set of this size gets on CUDA with max_smem bytes of shared
  // memory per block (0 all in shared memory, 1 x in global memory, 2 all in global memory).
  m.def("_cuda_em_placement(int N, int D, int K, bool double_precision, bool backward, int max_smem) -> int");
#endif
}

namespace {

py::dict build_info() {
  py::dict info;
#ifdef S2M_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  // The CPU kernels' instruction-set level in use, and every level this CPU can be forced to.
  const s2m::cpu::CpuLevel active = s2m::cpu::active_level();
  info["cpu_capability"] = s2m::cpu::level_name(active);
  py::list levels;
  for (int i = 0; i <= static_cast<int>(s2m::cpu::best_level()); ++i)
    levels.append(s2m::cpu::level_name(static_cast<s2m::cpu::CpuLevel>(i)));
  info["cpu_capabilities"] = levels;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "s2m_ext kernels; the ops live in torch.ops.s2m";
  m.def("build_info", &build_info, "How this extension was built (CUDA, OpenMP, torch version) and its CPU level.");
}
