// The CPU kernels as the torch glue sees them: plain argument structs and one table of
// function pointers per dtype and instruction-set level. Torch-free.
//
// The kernels (kernels_impl.h, with diag_gauss.h and em_set.h) are compiled once per level
// (level_baseline.cpp, level_avx2.cpp, level_avx512.cpp) and the best level this CPU runs is
// chosen once, at the first call (dispatch.cpp; S2M_CPU_CAPABILITY forces a lower one). The
// glue files (em_cpu.cpp, score_cpu.cpp, kmeanspp_cpu.cpp) check, allocate, split the work
// over threads and call kernels<T>() for each range of sets.
#pragma once

#include <cstdint>

namespace s2m {
namespace cpu {

enum class CpuLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuLevels = 3;

// "baseline", "avx2" (AVX2 + FMA) or "avx512" (F, VL, BW, DQ).
const char* level_name(CpuLevel level);
// The highest level both compiled in and executable on this CPU (cpuid, OS state included).
CpuLevel best_level();
// The level every CPU kernel runs at: best_level(), or the one S2M_CPU_CAPABILITY names (an
// unknown name or a level above best_level() throws, naming the variable). Chosen once.
CpuLevel active_level();

struct SetShape {
  int64_t n;  // points
  int64_t d;  // dimensions
  int64_t k;  // components
};

// One mixture's parameters: log weights (K), means (K,D), variances (K,D).
template <typename T>
struct Params {
  T* log_weights;
  T* means;
  T* variances;
};

template <typename T>
struct ConstParams {
  const T* log_weights;
  const T* means;
  const T* variances;
  ConstParams(const T* lw, const T* mu, const T* var) : log_weights(lw), means(mu), variances(var) {}
  ConstParams(const Params<T>& p) : log_weights(p.log_weights), means(p.means), variances(p.variances) {}
  ConstParams(const Params<const T>& p) : log_weights(p.log_weights), means(p.means), variances(p.variances) {}
};

// A (steps, B, K[, D]) trajectory seen from one set: step t of this set's parameters.
template <typename P>
struct Trajectory {
  P* log_weights;  // set's entry at step 0
  P* means;
  P* variances;
  int64_t step_k;   // elements between steps of log_weights: B*K
  int64_t step_kd;  // elements between steps of means/variances: B*K*D
  int64_t steps;
  Params<P> at(int64_t t) const {
    return {log_weights + t * step_k, means + t * step_kd, variances + t * step_kd};
  }
};

struct FitSettings {
  int64_t n_iter;
  double var_floor;
  double tol;  // per-set stop when |mean loglik change| < tol (scikit-learn's rule); 0: never
};

struct FitReport {
  double loglik;  // mean weighted log-likelihood of the returned parameters
  int64_t n_iter;
  bool converged;
};

// A set's sums over its points run in fixed chunks of kChunkPoints (whole 4-point blocks):
// chunk 0 accumulates into the result, every later chunk from zero into a partial of its own,
// and the partials are then added in chunk order. The order of every sum so depends on N
// alone, which lets a set's chunks run on several threads (when there are fewer sets than
// threads) with the result of one thread, bit for bit.
constexpr int64_t kChunkPoints = 512;

// The glue's thread pool as the kernels see it: for_range runs body(ctx, begin, end) over a
// partition of [0, n), on any threads; null runs [0, n) inline, on the calling thread.
struct PointParallel {
  void (*for_range)(int64_t n, void* ctx, void (*body)(void* ctx, int64_t begin, int64_t end)) =
      nullptr;
};

// s2m::em_fit over B sets: x (B,N,D), w (B,N), initial parameters (B,K[,D]); trajectories
// (steps,B,K[,D]); per set loglik, n_iter_used, converged (B).
template <typename T>
struct EmForwardArgs {
  const T *x, *w, *lw0, *mu0, *var0;
  T *lw_traj, *mu_traj, *var_traj, *loglik;
  int64_t* n_iter_used;
  bool* converged;
  int64_t B, N, D, K, steps;
  FitSettings cfg;
  PointParallel points;  // where each set's point chunks run
};

// s2m::em_fit_backward: the trajectory and its gradients (steps,B,K[,D]) -> g_x (B,N,D),
// g_w (B,N) and the initial parameters' gradients (B,K[,D]).
template <typename T>
struct EmBackwardArgs {
  const T *x, *w, *lw_traj, *mu_traj, *var_traj, *g_lw_traj, *g_mu_traj, *g_var_traj;
  const int64_t* n_iter_used;
  bool has_grad;  // false: the gradient tensors were all None (zeros)
  T var_floor;
  T *g_x, *g_w, *g_lw0, *g_mu0, *g_var0;
  int64_t B, N, D, K, steps;
  PointParallel points;  // where each set's point chunks run
};

// s2m::score_paired and its backward: z (B,Q,D) against mixture b; inv_var (B,K,D) and
// log_norm (B,K) are scratch the forward fills first (paired_precompute).
template <typename T>
struct PairedArgs {
  const T *z, *lw, *mu, *var;
  const T* grad;  // (B,Q), backward only
  T *inv_var, *log_norm, *out;
  T *g_z, *g_lw, *g_mu, *g_var;  // backward only, zero-filled by the caller
  int64_t B, Q, D, K;
};
// Queries per task of paired_rows: few sets with many queries still spread over threads.
constexpr int64_t kPairedRows = 64;

// s2m::kmeanspp: x (B,N,D), w (B,N), uniforms u (B,K) -> indices (B,K).
// s2m::kmeanspp_init also fills the initial parameters: log weights (B,K) = -log K, means
// (B,K,D) = the drawn points, variances (B,K,D) = the set's weighted variance + var_floor.
template <typename T>
struct KmeansppArgs {
  const T *x, *w;
  const double* u;
  int64_t* idx;
  T *log_weights, *means, *variances;  // all null for s2m::kmeanspp
  T var_floor;
  int64_t B, N, D, K;
};

// Each entry handles sets (or tasks) [begin, end); the glue runs ranges in parallel.
template <typename T>
struct Kernels {
  void (*em_forward)(const EmForwardArgs<T>&, int64_t begin, int64_t end);
  void (*em_backward)(const EmBackwardArgs<T>&, int64_t begin, int64_t end);
  void (*paired_precompute)(const PairedArgs<T>&, int64_t begin, int64_t end);
  // Tasks are (set, chunk of kPairedRows queries): B * ceil(Q / kPairedRows) of them.
  void (*paired_rows)(const PairedArgs<T>&, int64_t begin, int64_t end);
  void (*paired_backward)(const PairedArgs<T>&, int64_t begin, int64_t end);
  void (*kmeanspp)(const KmeansppArgs<T>&, int64_t begin, int64_t end);
};

// The tables of one level, defined in that level's file.
#define S2M_DECLARE_LEVEL(level)                 \
  namespace level {                              \
  template <typename T>                          \
  const Kernels<T>& table();                     \
  extern template const Kernels<float>& table(); \
  extern template const Kernels<double>& table(); \
  }
S2M_DECLARE_LEVEL(baseline)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S2M_CPU_X86_LEVELS 1  // GCC on x86-64: the avx2 and avx512 files are compiled in
S2M_DECLARE_LEVEL(avx2)
S2M_DECLARE_LEVEL(avx512)
#endif
#undef S2M_DECLARE_LEVEL

// The table of a level (it must be compiled in) and of the active one.
template <typename T>
const Kernels<T>& kernels_at(CpuLevel level);
template <typename T>
const Kernels<T>& kernels() {
  return kernels_at<T>(active_level());
}

}  // namespace cpu
}  // namespace s2m
