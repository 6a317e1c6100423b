// Runs the CUDA kernels of csrc/cuda under the CPU emulator (cuda_emu.h) and compares them with
// the CPU kernels (csrc/cpu/*.h) on random problems. Build and run: csrc/cuda/emu/run_emu_tests.sh
//
// What each check asserts:
//   * every output element written (outputs are poisoned with NaN before each launch);
//   * forward / backward / scoring / seeding equal the CPU kernels to the dtype's tolerance
//     (float64 1e-10, float32 1e-4 relative to the largest magnitude of the array);
//   * the same launch under forward and reverse thread schedules gives identical bits (a
//     missing barrier or an order-dependent reduction would not);
//   * all three EM placements (shared / x global / all global, forced with a smaller emulated
//     shared-memory limit) give the same results.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#define S2M_CPU_LEVEL baseline  // the CPU kernels of the baseline level are the oracle
#include "cpu/em_set.h"
#include "cuda/em_kernels.cuh"
#include "cuda/kmeanspp_kernels.cuh"
#include "cuda/score_kernels.cuh"

namespace {

int g_failures = 0;
int g_checks = 0;

template <typename T>
double tolerance() {
  return sizeof(T) == 8 ? 1e-10 : 1e-4;
}

template <typename T>
const char* type_name() {
  return sizeof(T) == 8 ? "float64" : "float32";
}

// max |a - b| / max(max |b|, floor); NaN anywhere (unwritten output) fails.
template <typename A, typename B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b, double floor = 1e-300) {
  if (a.size() != b.size()) return INFINITY;
  double scale = floor, err = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(double(a[i])) || !std::isfinite(double(b[i]))) return INFINITY;
    scale = std::max(scale, std::fabs(double(b[i])));
    err = std::max(err, std::fabs(double(a[i]) - double(b[i])));
  }
  return err / scale;
}

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL  %s\n", what.c_str());
  }
}

template <typename T>
void check_close(const std::vector<T>& got, const std::vector<T>& want, double tol,
                 const std::string& what) {
  const double e = rel_error(got, want);
  ++g_checks;
  if (!(e <= tol)) {
    ++g_failures;
    std::printf("FAIL  %s: relative error %.3g > %.1g\n", what.c_str(), e, tol);
  }
}

template <typename T>
void check_same_bits(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  check(a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0,
        what + ": different bits under another thread schedule");
}

void cuda_ok(cudaError_t e, const std::string& what) {
  check(e == cudaSuccess, what + ": launch returned an error");
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

// ----------------------------------------------------------------------------- problems
struct Shape {
  int64_t B, N, D, K;
};

std::string str(const Shape& s) {
  return "B=" + std::to_string(s.B) + " N=" + std::to_string(s.N) + " D=" + std::to_string(s.D) +
         " K=" + std::to_string(s.K);
}

// Points around K well-separated centres, weights in (0.5, 2) with some padding zeros, and
// initial parameters like k-means++ gives (means at data points, the set's variance, uniform).
template <typename T>
struct EmProblem {
  Shape s;
  std::vector<T> x, w, lw0, mu0, var0;
  EmProblem(Shape shape, unsigned seed, bool padding = true, double scale = 1.0) : s(shape) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    std::uniform_real_distribution<double> unif(0.5, 2.0);
    const int64_t B = s.B, N = s.N, D = s.D, K = s.K;
    x.resize(B * N * D);
    w.resize(B * N);
    lw0.resize(B * K);
    mu0.resize(B * K * D);
    var0.resize(B * K * D);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> centres(K * D);
      for (auto& c : centres) c = 3.0 * normal(rng) + 1.0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = n % K;
        for (int64_t d = 0; d < D; ++d)
          x[(b * N + n) * D + d] = T(scale * (centres[k * D + d] + (0.5 + 0.1 * k) * normal(rng)));
        w[b * N + n] = T(padding && N > 3 && n % 7 == 5 ? 0.0 : unif(rng));
      }
      std::vector<double> mean(D, 0.0), var(D, 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) mean[d] += double(x[(b * N + n) * D + d]) / N;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) {
          const double diff = double(x[(b * N + n) * D + d]) - mean[d];
          var[d] += diff * diff / N;
        }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = (k * 7 + 3 * b) % N;
        lw0[b * K + k] = T(-std::log(double(K)));
        for (int64_t d = 0; d < D; ++d) {
          mu0[(b * K + k) * D + d] = x[(b * N + n) * D + d];
          var0[(b * K + k) * D + d] = T(var[d] + 1e-3 * scale * scale);
        }
      }
    }
  }
};

template <typename T>
struct EmResult {
  std::vector<T> lw, mu, var, loglik;
  std::vector<int64_t> used;
  std::vector<unsigned char> converged;
};

template <typename T>
EmResult<T> cpu_forward(const EmProblem<T>& p, int64_t n_iter, double var_floor, double tol,
                        bool keep) {
  const Shape& s = p.s;
  const int64_t steps = keep ? n_iter + 1 : 1;
  EmResult<T> r;
  r.lw.resize(steps * s.B * s.K);
  r.mu.resize(steps * s.B * s.K * s.D);
  r.var.resize(steps * s.B * s.K * s.D);
  r.loglik.resize(s.B);
  r.used.resize(s.B);
  r.converged.resize(s.B);
  const s2m::cpu::SetShape shape{s.N, s.D, s.K};
  s2m::cpu::baseline::Workspace<T> ws(shape, false);
  for (int64_t b = 0; b < s.B; ++b) {
    s2m::cpu::ConstParams<T> init(p.lw0.data() + b * s.K, p.mu0.data() + b * s.K * s.D,
                                  p.var0.data() + b * s.K * s.D);
    s2m::cpu::Trajectory<T> traj{r.lw.data() + b * s.K, r.mu.data() + b * s.K * s.D,
                                 r.var.data() + b * s.K * s.D, s.B * s.K, s.B * s.K * s.D, steps};
    const auto rep = s2m::cpu::baseline::em_forward_set(p.x.data() + b * s.N * s.D, p.w.data() + b * s.N,
                                              shape, init, {n_iter, var_floor, tol}, traj, ws,
                                              s2m::cpu::PointParallel());
    r.loglik[b] = T(rep.loglik);
    r.used[b] = rep.n_iter;
    r.converged[b] = rep.converged;
  }
  return r;
}

template <typename T>
EmResult<T> gpu_forward(const EmProblem<T>& p, int64_t n_iter, double var_floor, double tol,
                        bool keep) {
  const Shape& s = p.s;
  const int64_t steps = keep ? n_iter + 1 : 1;
  EmResult<T> r;
  r.lw = poisoned<T>(steps * s.B * s.K);
  r.mu = poisoned<T>(steps * s.B * s.K * s.D);
  r.var = poisoned<T>(steps * s.B * s.K * s.D);
  r.loglik = poisoned<T>(s.B);
  r.used.assign(s.B, -7);
  std::vector<char> conv(s.B, 2);
  s2m::cuda::EmForwardArgs<T> a{};
  a.x = p.x.data();
  a.w = p.w.data();
  a.lw0 = p.lw0.data();
  a.mu0 = p.mu0.data();
  a.var0 = p.var0.data();
  a.lw_traj = r.lw.data();
  a.mu_traj = r.mu.data();
  a.var_traj = r.var.data();
  a.loglik = r.loglik.data();
  a.n_iter_used = r.used.data();
  a.converged = reinterpret_cast<bool*>(conv.data());
  a.B = s.B;
  a.N = s.N;
  a.D = s.D;
  a.K = s.K;
  a.n_iter = n_iter;
  a.steps = steps;
  a.var_floor = var_floor;
  a.tol = tol;
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::em_forward_workspace_bytes<T>(s.B, s.N, s.D, s.K) + 16);
  cuda_ok(s2m::cuda::em_forward<T>(a, ws.data(), nullptr), "em_forward");
  r.converged.assign(conv.begin(), conv.end());
  return r;
}

template <typename T>
struct GradResult {
  std::vector<T> gx, gw, glw, gmu, gvar;
};

template <typename T>
GradResult<T> cpu_backward(const EmProblem<T>& p, const EmResult<T>& fwd, int64_t steps,
                           const std::vector<T>* g_lw, const std::vector<T>* g_mu,
                           const std::vector<T>* g_var, double var_floor) {
  const Shape& s = p.s;
  GradResult<T> r;
  r.gx.resize(s.B * s.N * s.D);
  r.gw.resize(s.B * s.N);
  r.glw.resize(s.B * s.K);
  r.gmu.resize(s.B * s.K * s.D);
  r.gvar.resize(s.B * s.K * s.D);
  const s2m::cpu::SetShape shape{s.N, s.D, s.K};
  s2m::cpu::baseline::Workspace<T> ws(shape, true);
  std::vector<T> zeros_k(steps * s.B * s.K, T(0)), zeros_kd(steps * s.B * s.K * s.D, T(0));
  const bool has_g = g_lw != nullptr;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t K = s.K, KD = s.K * s.D;
    s2m::cpu::Trajectory<const T> traj{fwd.lw.data() + b * K, fwd.mu.data() + b * KD,
                                       fwd.var.data() + b * KD, s.B * K, s.B * KD, steps};
    s2m::cpu::Trajectory<const T> gtraj{(has_g ? g_lw->data() : zeros_k.data()) + b * K,
                                        (has_g ? g_mu->data() : zeros_kd.data()) + b * KD,
                                        (has_g ? g_var->data() : zeros_kd.data()) + b * KD,
                                        s.B * K, s.B * KD, steps};
    s2m::cpu::Params<T> g_init{r.glw.data() + b * K, r.gmu.data() + b * KD,
                               r.gvar.data() + b * KD};
    s2m::cpu::baseline::em_backward_set(p.x.data() + b * s.N * s.D, p.w.data() + b * s.N, shape,
                              fwd.used[b], T(var_floor), traj, gtraj, has_g,
                              r.gx.data() + b * s.N * s.D, r.gw.data() + b * s.N, g_init, ws,
                              s2m::cpu::PointParallel());
  }
  return r;
}

template <typename T>
GradResult<T> gpu_backward(const EmProblem<T>& p, const EmResult<T>& fwd, int64_t steps,
                           const std::vector<T>* g_lw, const std::vector<T>* g_mu,
                           const std::vector<T>* g_var, double var_floor) {
  const Shape& s = p.s;
  GradResult<T> r;
  r.gx = poisoned<T>(s.B * s.N * s.D);
  r.gw = poisoned<T>(s.B * s.N);
  r.glw = poisoned<T>(s.B * s.K);
  r.gmu = poisoned<T>(s.B * s.K * s.D);
  r.gvar = poisoned<T>(s.B * s.K * s.D);
  s2m::cuda::EmBackwardArgs<T> a{};
  a.g_lw = g_lw ? g_lw->data() : nullptr;
  a.g_mu = g_mu ? g_mu->data() : nullptr;
  a.g_var = g_var ? g_var->data() : nullptr;
  a.x = p.x.data();
  a.w = p.w.data();
  a.lw_traj = fwd.lw.data();
  a.mu_traj = fwd.mu.data();
  a.var_traj = fwd.var.data();
  a.n_iter_used = fwd.used.data();
  a.g_x = r.gx.data();
  a.g_w = r.gw.data();
  a.g_lw0 = r.glw.data();
  a.g_mu0 = r.gmu.data();
  a.g_var0 = r.gvar.data();
  a.B = s.B;
  a.N = s.N;
  a.D = s.D;
  a.K = s.K;
  a.steps = steps;
  a.var_floor = var_floor;
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::em_backward_workspace_bytes<T>(s.B, s.N, s.D, s.K) + 16);
  cuda_ok(s2m::cuda::em_backward<T>(a, ws.data(), nullptr), "em_backward");
  return r;
}

template <typename T>
std::vector<T> random_vector(size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& e : v) e = T(normal(rng));
  return v;
}

struct EmCase {
  Shape shape;
  int64_t n_iter;
  double var_floor;
  double tol;
  bool padding;
  double scale = 1.0;  // of x (var_floor is given already scaled)
};

template <typename T>
void compare_forward(const EmResult<T>& got, const EmResult<T>& want, const std::string& tag,
                     bool with_loglik = true) {
  const double tol = tolerance<T>();
  check_close(got.lw, want.lw, tol, tag + " log_weights");
  check_close(got.mu, want.mu, tol, tag + " means");
  check_close(got.var, want.var, tol, tag + " variances");
  if (with_loglik) {
    check_close(got.loglik, want.loglik, tol, tag + " loglik");
  } else {
    bool finite = true;
    for (T v : got.loglik) finite = finite && std::isfinite(double(v));
    check(finite, tag + " loglik finite");
  }
  check(got.used == want.used, tag + " n_iter_used");
  check(got.converged == want.converged, tag + " converged");
}

template <typename T>
double max_abs(const GradResult<T>& g) {
  double m = 0;
  for (const auto* v : {&g.gx, &g.gw, &g.glw, &g.gmu, &g.gvar})
    for (T e : *v) m = std::max(m, std::fabs(double(e)));
  return m;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// The GPU backward against the CPU backward, gradients relative to the largest gradient of the
// problem (a single one can vanish by symmetry: the weight of a one-point set). float64: within
// 1e-10 of the CPU. float32: within max(1e-4, 2 x the float32 CPU's own error) of the CPU in
// float64 on the same inputs, the bar of tests/test_core_em.py (some gradients are
// ill-conditioned: differences of large terms at scale 1e4).
template <typename T>
void check_backward(const EmProblem<T>& p, const EmResult<T>& cpu_fwd, const EmResult<T>& gpu_fwd,
                    int64_t n_iter, double var_floor, double tol, const std::vector<T>* g_lw,
                    const std::vector<T>* g_mu, const std::vector<T>* g_var, const std::string& tag) {
  const int64_t steps = n_iter + 1;
  const GradResult<T> got = gpu_backward(p, gpu_fwd, steps, g_lw, g_mu, g_var, var_floor);
  const GradResult<T> cpu = cpu_backward(p, cpu_fwd, steps, g_lw, g_mu, g_var, var_floor);
  const char* names[] = {" grad x", " grad w", " grad log_weights0", " grad means0", " grad variances0"};
  if (sizeof(T) == 8) {
    const double scale = std::max(max_abs(cpu), 1e-300);
    const std::vector<T>* a[] = {&got.gx, &got.gw, &got.glw, &got.gmu, &got.gvar};
    const std::vector<T>* b[] = {&cpu.gx, &cpu.gw, &cpu.glw, &cpu.gmu, &cpu.gvar};
    for (int i = 0; i < 5; ++i) {
      const double e = rel_error(*a[i], *b[i], scale);
      check(e <= 1e-10, tag + names[i] + ": relative error " + std::to_string(e) + " > 1e-10");
    }
    return;
  }
  EmProblem<double> pd({p.s.B, p.s.N, p.s.D, p.s.K}, 0);
  pd.x = widen(p.x);
  pd.w = widen(p.w);
  pd.lw0 = widen(p.lw0);
  pd.mu0 = widen(p.mu0);
  pd.var0 = widen(p.var0);
  const EmResult<double> fwd64 = cpu_forward(pd, n_iter, var_floor, tol, true);
  if (std::getenv("EMU_VERBOSE"))  // EMU_VERBOSE=1: print the float32 errors against float64
    std::printf("%s forward vs float64: gpu mu %.2e var %.2e lw %.2e | cpu mu %.2e var %.2e lw %.2e\n",
                tag.c_str(), rel_error(gpu_fwd.mu, fwd64.mu), rel_error(gpu_fwd.var, fwd64.var),
                rel_error(gpu_fwd.lw, fwd64.lw), rel_error(cpu_fwd.mu, fwd64.mu),
                rel_error(cpu_fwd.var, fwd64.var), rel_error(cpu_fwd.lw, fwd64.lw));
  if (fwd64.used != cpu_fwd.used) {  // tol stopped some set at another iteration in float64
    const double scale = max_abs(cpu);
    check(rel_error(got.gx, cpu.gx, scale) <= 2e-4 && rel_error(got.gmu, cpu.gmu, scale) <= 2e-4,
          tag + ": float32 GPU and CPU backward differ by more than 2e-4");
    return;
  }
  std::vector<double> glw, gmu, gvar;
  if (g_lw) {
    glw = widen(*g_lw);
    gmu = widen(*g_mu);
    gvar = widen(*g_var);
  }
  const GradResult<double> exact = cpu_backward(pd, fwd64, steps, g_lw ? &glw : nullptr,
                                                g_lw ? &gmu : nullptr, g_lw ? &gvar : nullptr,
                                                var_floor);
  const double scale = std::max(max_abs(exact), 1e-300);
  const bool verbose = std::getenv("EMU_VERBOSE") != nullptr;
  const GradResult<T> on_cpu = verbose ? gpu_backward(p, cpu_fwd, steps, g_lw, g_mu, g_var, var_floor) : got;
  const std::vector<T>* o[] = {&on_cpu.gx, &on_cpu.gw, &on_cpu.glw, &on_cpu.gmu, &on_cpu.gvar};
  const std::vector<T>* a[] = {&got.gx, &got.gw, &got.glw, &got.gmu, &got.gvar};
  const std::vector<T>* c[] = {&cpu.gx, &cpu.gw, &cpu.glw, &cpu.gmu, &cpu.gvar};
  const std::vector<double>* x[] = {&exact.gx, &exact.gw, &exact.glw, &exact.gmu, &exact.gvar};
  for (int i = 0; i < 5; ++i) {
    const double bar = std::max(1e-4, 2 * rel_error(*c[i], *x[i], scale));
    const double e = rel_error(*a[i], *x[i], scale);
    if (verbose)  // the GPU backward on the CPU's trajectory separates the two sources of error
      std::printf("%s%s: error gpu %.2e, cpu %.2e, gpu on the cpu trajectory %.2e\n", tag.c_str(),
                  names[i], e, rel_error(*c[i], *x[i], scale), rel_error(*o[i], *x[i], scale));
    check(e <= bar, tag + names[i] + ": relative error " + std::to_string(e) + " > " + std::to_string(bar));
  }
}

template <typename T>
void run_em_case(const EmCase& c, unsigned seed) {
  const std::string tag = std::string(type_name<T>()) + " " + str(c.shape) +
                          " T=" + std::to_string(c.n_iter) + " tol=" + std::to_string(c.tol);
  EmProblem<T> p(c.shape, seed, c.padding, c.scale);
  const int64_t steps = c.n_iter + 1;
  const EmResult<T> want = cpu_forward(p, c.n_iter, c.var_floor, c.tol, true);
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  const EmResult<T> got = gpu_forward(p, c.n_iter, c.var_floor, c.tol, true);
  compare_forward(got, want, "em_forward " + tag);
  // Without the trajectory: only the final parameters.
  const EmResult<T> last = gpu_forward(p, c.n_iter, c.var_floor, c.tol, false);
  const int64_t BK = c.shape.B * c.shape.K, BKD = BK * c.shape.D;
  check(std::equal(last.mu.begin(), last.mu.end(), got.mu.end() - BKD) &&
            std::equal(last.var.begin(), last.var.end(), got.var.end() - BKD) &&
            std::equal(last.lw.begin(), last.lw.end(), got.lw.end() - BK),
        "em_forward " + tag + ": keep_trajectory=False returns the last step");

  const auto g_lw = random_vector<T>(steps * BK, seed + 1);
  const auto g_mu = random_vector<T>(steps * BKD, seed + 2);
  const auto g_var = random_vector<T>(steps * BKD, seed + 3);
  check_backward(p, want, got, c.n_iter, c.var_floor, c.tol, &g_lw, &g_mu, &g_var, "em_backward " + tag);
  const GradResult<T> ggot = gpu_backward(p, got, steps, &g_lw, &g_mu, &g_var, c.var_floor);

  // Determinism: another thread schedule gives the same bits.
  s2m_emu::config().schedule = s2m_emu::Schedule::kReverse;
  const EmResult<T> again = gpu_forward(p, c.n_iter, c.var_floor, c.tol, true);
  const GradResult<T> gagain = gpu_backward(p, got, steps, &g_lw, &g_mu, &g_var, c.var_floor);
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  check_same_bits(again.mu, got.mu, "em_forward " + tag + " means");
  check_same_bits(again.var, got.var, "em_forward " + tag + " variances");
  check_same_bits(again.loglik, got.loglik, "em_forward " + tag + " loglik");
  check_same_bits(gagain.gx, ggot.gx, "em_backward " + tag + " grad x");
  check_same_bits(gagain.gmu, ggot.gmu, "em_backward " + tag + " grad means0");
  check_same_bits(gagain.gw, ggot.gw, "em_backward " + tag + " grad w");
  // And a random order of the threads in every barrier interval.
  s2m_emu::config().schedule = s2m_emu::Schedule::kRandom;
  s2m_emu::config().seed = seed;
  const EmResult<T> shuffled = gpu_forward(p, c.n_iter, c.var_floor, c.tol, true);
  const GradResult<T> gshuffled = gpu_backward(p, got, steps, &g_lw, &g_mu, &g_var, c.var_floor);
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  check_same_bits(shuffled.mu, got.mu, "em_forward " + tag + " means, random schedule");
  check_same_bits(shuffled.var, got.var, "em_forward " + tag + " variances, random schedule");
  check_same_bits(shuffled.loglik, got.loglik, "em_forward " + tag + " loglik, random schedule");
  check_same_bits(gshuffled.gx, ggot.gx, "em_backward " + tag + " grad x, random schedule");
  check_same_bits(gshuffled.gmu, ggot.gmu, "em_backward " + tag + " grad means0, random schedule");
  check_same_bits(gshuffled.gvar, ggot.gvar, "em_backward " + tag + " grad variances0, random schedule");
}

// The three placements compute the same bits. For each kernel, the emulated shared-memory
// limit is lowered until the layout moves x, then everything, to global memory.
template <typename T>
void run_placements(Shape shape, unsigned seed) {
  EmProblem<T> p(shape, seed);
  const int64_t n_iter = 4, steps = n_iter + 1;
  const int64_t BK = shape.B * shape.K, BKD = BK * shape.D;
  const auto g_lw = random_vector<T>(steps * BK, seed + 1);
  const auto g_mu = random_vector<T>(steps * BKD, seed + 2);
  const auto g_var = random_vector<T>(steps * BKD, seed + 3);
  const std::string tag = std::string(type_name<T>()) + " " + str(shape);
  const int saved = s2m_emu::config().max_smem_optin;
  auto limit_for = [&](bool backward, int placement) {
    for (int kb = 228; kb >= 1; --kb) {
      s2m_emu::config().max_smem_optin = kb * 1024;
      const int got = backward ? s2m::cuda::em_backward_placement<T>(shape.N, shape.D, shape.K)
                               : s2m::cuda::em_forward_placement<T>(shape.N, shape.D, shape.K);
      if (got == placement) return kb * 1024;
    }
    return -1;
  };
  std::vector<EmResult<T>> fwd;
  std::vector<GradResult<T>> bwd;
  for (int placement = 0; placement < 3; ++placement) {
    const int lf = limit_for(false, placement), lb = limit_for(true, placement);
    check(lf > 0 && lb > 0, "placements " + tag + ": no limit gives placement " +
                                std::to_string(placement));
    if (lf < 0 || lb < 0) break;
    s2m_emu::config().max_smem_optin = lf;
    fwd.push_back(gpu_forward(p, n_iter, 1e-3, 0.0, true));
    s2m_emu::config().max_smem_optin = lb;
    bwd.push_back(gpu_backward(p, fwd.front(), steps, &g_lw, &g_mu, &g_var, 1e-3));
  }
  s2m_emu::config().max_smem_optin = saved;
  for (size_t i = 1; i < fwd.size(); ++i) {
    const std::string t = "placement " + std::to_string(i) + " vs 0, " + tag;
    check_same_bits(fwd[i].mu, fwd[0].mu, t + " means");
    check_same_bits(fwd[i].var, fwd[0].var, t + " variances");
    check_same_bits(fwd[i].lw, fwd[0].lw, t + " log_weights");
    check_same_bits(fwd[i].loglik, fwd[0].loglik, t + " loglik");
    check_same_bits(bwd[i].gx, bwd[0].gx, t + " grad x");
    check_same_bits(bwd[i].gw, bwd[0].gw, t + " grad w");
    check_same_bits(bwd[i].gmu, bwd[0].gmu, t + " grad means0");
    check_same_bits(bwd[i].gvar, bwd[0].gvar, t + " grad variances0");
  }
}

// Edge cases of the rules: a dead component, a set without weight, no trajectory gradient.
template <typename T>
void run_edge_cases(unsigned seed) {
  const std::string tag = type_name<T>();
  {
    // Component 2 starts far from every point: Nk underflows, it keeps its mean and variance.
    EmProblem<T> p({2, 40, 6, 3}, seed);
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t d = 0; d < 6; ++d) {
        p.mu0[(b * 3 + 2) * 6 + d] = T(1e4);
        p.var0[(b * 3 + 2) * 6 + d] = T(1e-2);
      }
    const EmResult<T> want = cpu_forward(p, 5, 1e-3, 0.0, true);
    const EmResult<T> got = gpu_forward(p, 5, 1e-3, 0.0, true);
    compare_forward(got, want, "em_forward dead component " + tag);
    check(got.mu[(5 * 2 + 1) * 3 * 6 + 2 * 6] == T(1e4), "dead component keeps its mean " + tag);
    const auto g_lw = random_vector<T>(6 * 6, seed + 1);
    const auto g_mu = random_vector<T>(6 * 36, seed + 2);
    const auto g_var = random_vector<T>(6 * 36, seed + 3);
    check_backward(p, want, got, 5, 1e-3, 0.0, &g_lw, &g_mu, &g_var, "em_backward dead component " + tag);
    check_backward<T>(p, want, got, 5, 1e-3, 0.0, nullptr, nullptr, nullptr,
                      "em_backward without gradient " + tag);
  }
  {
    // Set 1 has no weight (only reachable with validation off): parameters kept, finite.
    EmProblem<T> p({2, 20, 5, 2}, seed + 5);
    for (int64_t n = 0; n < 20; ++n) p.w[20 + n] = T(0);
    const EmResult<T> want = cpu_forward(p, 3, 1e-3, 0.0, true);
    const EmResult<T> got = gpu_forward(p, 3, 1e-3, 0.0, true);
    compare_forward(got, want, "em_forward zero-weight set " + tag);
    const auto g_lw = random_vector<T>(4 * 4, seed + 1);
    const auto g_mu = random_vector<T>(4 * 20, seed + 2);
    const auto g_var = random_vector<T>(4 * 20, seed + 3);
    check_backward(p, want, got, 3, 1e-3, 0.0, &g_lw, &g_mu, &g_var, "em_backward zero-weight set " + tag);
  }
  {
    // var_floor = 0 and duplicated points: the variance clamp engages.
    EmProblem<T> p({1, 12, 3, 2}, seed + 9, false);
    std::fill(p.w.begin(), p.w.end(), T(1));  // exact means: S2 = 0
    for (int64_t n = 0; n < 12; ++n)
      for (int64_t d = 0; d < 3; ++d) p.x[n * 3 + d] = T(n % 2 == 0 ? 1.0 : -2.0);
    for (int64_t d = 0; d < 3; ++d) {
      p.mu0[d] = T(1.0);
      p.mu0[3 + d] = T(-2.0);
    }
    const EmResult<T> want = cpu_forward(p, 3, 0.0, 0.0, true);
    const EmResult<T> got = gpu_forward(p, 3, 0.0, 0.0, true);
    // After the clamp, log-densities hinge on (x - mu)^2 / eps^2 with x - mu pure rounding:
    // the log-likelihood is ill-conditioned by construction; the parameters are not.
    compare_forward(got, want, "em_forward clamped variance " + tag, false);
    check(got.var[3 * 6] <= s2m::Limits<T>::var_min, "variance clamp engaged " + tag);
    const auto g_lw = random_vector<T>(4 * 2, seed + 1);
    const auto g_mu = random_vector<T>(4 * 6, seed + 2);
    const auto g_var = random_vector<T>(4 * 6, seed + 3);
    check_backward(p, want, got, 3, 0.0, 0.0, &g_lw, &g_mu, &g_var, "em_backward clamped variance " + tag);
  }
}

template <typename T>
void run_em_tests() {
  const std::vector<EmCase> cases = {
      {{3, 17, 5, 2}, 4, 1e-3, 0.0, true},     // odd D: scalar path; N < 32
      {{2, 64, 16, 4}, 5, 1e-3, 0.0, true},    // vector path, one k-chunk
      {{2, 40, 8, 1}, 5, 1e-3, 0.0, true},     // K = 1 shortcut
      {{2, 33, 12, 6}, 3, 1e-2, 0.0, true},    // K not a multiple of the k-chunk
      {{2, 300, 4, 3}, 3, 1e-3, 0.0, true},    // N > threads per block
      {{3, 50, 8, 3}, 30, 1e-3, 1e-4, true},   // tol: sets stop early
      {{2, 30, 4, 1}, 6, 1e-3, 1e-3, false},   // tol with K = 1
      {{2, 10, 3, 2}, 0, 1e-3, 0.0, true},     // n_iter = 0
      {{2, 1, 3, 2}, 3, 1e-3, 0.0, false},     // N = 1
      {{3, 3, 4, 5}, 3, 1e-3, 0.0, false},     // N < K
      {{3, 15, 1, 2}, 4, 1e-3, 0.0, true},     // D = 1
      {{2, 25, 5, 2}, 5, 1e-11, 0.0, true, 1e-4},  // tiny scale
      {{2, 25, 5, 2}, 5, 1e5, 0.0, true, 1e4},     // huge scale
      {{2, 25, 5, 3}, 5, 0.0, 0.0, true},      // no floor
  };
  unsigned seed = 100;
  for (const EmCase& c : cases) run_em_case<T>(c, seed++);
  run_placements<T>({2, 48, 24, 3}, 7);
  run_placements<T>({2, 40, 7, 5}, 8);  // scalar path
  run_edge_cases<T>(11);
}

}  // namespace

void run_score_tests();     // emu_test_score.cpp
void run_kmeanspp_tests();  // emu_test_score.cpp

// Trajectory offsets past 2^31 elements (no allocation: the index function alone), checked
// against exact 128-bit integer arithmetic.
void run_index_tests() {
  struct Case {
    int64_t t, B, b, per_set;
  };
  const Case cases[] = {{10, 131072, 131071, 8 * 256},    // K = 8, D = 256, B = 2^17, last step
                        {10, 1 << 20, (1 << 20) - 1, 4096},  // 4.7e10 elements
                        {0, 3000000, 2999999, 1024},        // t = 0, b * per_set > 2^31
                        {1, 1, 0, int64_t(1) << 40}};
  for (const Case& c : cases) {
    const __int128 exact = (__int128(c.t) * c.B + c.b) * c.per_set;
    const int64_t got = s2m::cuda::traj_offset(c.t, c.B, c.b, c.per_set);
    check(exact > (__int128(1) << 31) && __int128(got) == exact,
          "traj_offset(" + std::to_string(c.t) + ", " + std::to_string(c.B) + ", " +
              std::to_string(c.b) + ", " + std::to_string(c.per_set) + ") = " +
              std::to_string(got) + " past 2^31");
  }
}

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  if (only.empty() || only == "em") {
    run_index_tests();
    run_em_tests<double>();
    run_em_tests<float>();
  }
  if (only.empty() || only == "score") run_score_tests();
  if (only.empty() || only == "kmeanspp") run_kmeanspp_tests();
  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

// Shared with emu_test_score.cpp.
void emu_check(bool ok, const std::string& what) { check(ok, what); }
