// Emulator checks of the scoring and k-means++ kernels against direct float64 formulas and the
// k-means++ rule of csrc/cpu/kmeanspp_cpu.cpp. See emu_test.cpp for what the checks assert.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/kmeanspp_kernels.cuh"
#include "cuda/score_kernels.cuh"

void emu_check(bool ok, const std::string& what);

namespace {

template <typename T>
double tol() {
  return sizeof(T) == 8 ? 1e-10 : 1e-4;
}

template <typename T>
std::string tname() {
  return sizeof(T) == 8 ? "float64" : "float32";
}

template <typename A>
void close(const std::vector<A>& got, const std::vector<double>& want, double t,
           const std::string& what) {
  double scale = 0, err = 0;
  bool finite = got.size() == want.size();
  for (size_t i = 0; finite && i < got.size(); ++i) {
    if (!std::isfinite(double(got[i]))) finite = false;
    scale = std::max(scale, std::fabs(want[i]));
    err = std::max(err, std::fabs(double(got[i]) - want[i]));
  }
  const double rel = finite ? err / std::max(scale, 1e-300) : INFINITY;
  if (!(rel <= t) || std::getenv("EMU_VERBOSE"))
    std::printf("      %s: relative error %.3g (tolerance %.1g)\n", what.c_str(), rel, t);
  emu_check(rel <= t, what);
}

template <typename T>
void same_bits(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  emu_check(a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0,
            what + ": different bits under another thread schedule");
}

template <typename T>
std::vector<T> nans(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

// B mixtures in D dims with K components, normalised log weights; queries near them.
template <typename T>
struct Mixtures {
  int64_t B, K, D;
  std::vector<T> lw, mu, var;
  Mixtures(int64_t B_, int64_t K_, int64_t D_, unsigned seed, double offset = 5.0,
           double spread = 2.0, double var_scale = 1.0)
      : B(B_), K(K_), D(D_) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    std::uniform_real_distribution<double> unif(0.3, 2.0);
    lw.resize(B * K);
    mu.resize(B * K * D);
    var.resize(B * K * D);
    for (int64_t b = 0; b < B; ++b) {
      double norm = 0;
      std::vector<double> logits(K);
      for (auto& l : logits) {
        l = normal(rng);
        norm += std::exp(l);
      }
      for (int64_t k = 0; k < K; ++k) lw[b * K + k] = T(logits[k] - std::log(norm));
    }
    for (auto& m : mu) m = T(spread * normal(rng) + offset);  // off the origin: exercises the centring
    for (auto& v : var) v = T(var_scale * unif(rng));
  }
  s2m::cuda::MixtureArgs<T> args() const { return {lw.data(), mu.data(), var.data(), B, K, D}; }
};

template <typename T>
std::vector<T> queries(size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> z(n);
  for (auto& v : z) v = T(2.5 * normal(rng) + 5.0);
  return z;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// Reference log p and its gradients for set b at query z, in float64, written out directly.
struct Ref {
  int64_t K, D;
  std::vector<double> lw, mu, var;
  template <typename T>
  explicit Ref(const Mixtures<T>& m)
      : K(m.K), D(m.D), lw(to_double(m.lw)), mu(to_double(m.mu)), var(to_double(m.var)) {}
  double log_prob(int64_t b, const double* z, double* resp = nullptr) const {
    std::vector<double> l(K);
    double lmax = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      const double* m = mu.data() + (b * K + k) * D;
      const double* v = var.data() + (b * K + k) * D;
      double acc = 0;
      for (int64_t d = 0; d < D; ++d)
        acc += std::log(2 * M_PI * v[d]) + (z[d] - m[d]) * (z[d] - m[d]) / v[d];
      l[k] = lw[b * K + k] - 0.5 * acc;
      lmax = std::max(lmax, l[k]);
    }
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += std::exp(l[k] - lmax);
    const double lse = lmax + std::log(sum);
    if (resp != nullptr)
      for (int64_t k = 0; k < K; ++k) resp[k] = std::exp(l[k] - lse);
    return lse;
  }
  // Adds the gradients of g * log p_b(z).
  void backward(int64_t b, const double* z, double g, double* g_lw, double* g_mu, double* g_var,
                double* g_z) const {
    std::vector<double> resp(K);
    log_prob(b, z, resp.data());
    for (int64_t k = 0; k < K; ++k) {
      const double gl = g * resp[k];
      const double* m = mu.data() + (b * K + k) * D;
      const double* v = var.data() + (b * K + k) * D;
      g_lw[k] += gl;
      for (int64_t d = 0; d < D; ++d) {
        const double e = (z[d] - m[d]) / v[d];
        g_mu[k * D + d] += gl * e;
        g_var[k * D + d] += 0.5 * gl * (e * e - 1 / v[d]);
        g_z[d] -= gl * e;
      }
    }
  }
};

template <typename T>
void paired_case(int64_t B, int64_t Q, int64_t K, int64_t D, unsigned seed) {
  const std::string tag = tname<T>() + " B=" + std::to_string(B) + " Q=" + std::to_string(Q) +
                          " K=" + std::to_string(K) + " D=" + std::to_string(D);
  Mixtures<T> mix(B, K, D, seed);
  const std::vector<T> z = queries<T>(B * Q * D, seed + 1);
  const std::vector<T> grad = queries<T>(B * Q, seed + 2);
  const Ref ref(mix);
  const std::vector<double> zd = to_double(z);
  std::vector<double> want(B * Q), w_gz(B * Q * D, 0.0), w_glw(B * K, 0.0), w_gmu(B * K * D, 0.0),
      w_gvar(B * K * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q) {
      const double* zq = zd.data() + (b * Q + q) * D;
      want[b * Q + q] = ref.log_prob(b, zq);
      ref.backward(b, zq, double(grad[b * Q + q]), w_glw.data() + b * K, w_gmu.data() + b * K * D,
                   w_gvar.data() + b * K * D, w_gz.data() + (b * Q + q) * D);
    }
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::score_paired_workspace_bytes<T>(B, K, D) + 16);
  std::vector<T> out = nans<T>(B * Q);
  emu_check(s2m::cuda::score_paired<T>(z.data(), Q, mix.args(), out.data(), ws.data(), nullptr) ==
                cudaSuccess, "score_paired launch " + tag);
  close(out, want, tol<T>(), "score_paired " + tag);

  auto run_backward = [&](std::vector<T>* gz, std::vector<T>* glw, std::vector<T>* gmu,
                          std::vector<T>* gvar) {
    *gz = nans<T>(B * Q * D);
    *glw = nans<T>(B * K);
    *gmu = nans<T>(B * K * D);
    *gvar = nans<T>(B * K * D);
    std::vector<unsigned char> bws =
      s2m_emu::poisoned_bytes(s2m::cuda::score_backward_workspace_bytes<T>(B, Q, K, D) + 16);
    s2m::cuda::ScoreBackwardArgs<T> a{grad.data(), z.data(), Q * D, Q, mix.args(), gz->data(),
                                      glw->data(), gmu->data(), gvar->data()};
    emu_check(s2m::cuda::score_paired_backward<T>(a, bws.data(), nullptr) == cudaSuccess,
              "score_paired_backward launch " + tag);
  };
  std::vector<T> gz, glw, gmu, gvar;
  run_backward(&gz, &glw, &gmu, &gvar);
  const double bt = tol<T>();
  close(gz, w_gz, bt, "score_paired_backward grad z " + tag);
  close(glw, w_glw, bt, "score_paired_backward grad log_weights " + tag);
  close(gmu, w_gmu, bt, "score_paired_backward grad means " + tag);
  close(gvar, w_gvar, bt, "score_paired_backward grad variances " + tag);
  s2m_emu::config().schedule = s2m_emu::Schedule::kReverse;
  std::vector<T> gz2, glw2, gmu2, gvar2;
  run_backward(&gz2, &glw2, &gmu2, &gvar2);
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  same_bits(gmu2, gmu, "score_paired_backward grad means " + tag);
  same_bits(gvar2, gvar, "score_paired_backward grad variances " + tag);
  same_bits(gz2, gz, "score_paired_backward grad z " + tag);
  s2m_emu::config().schedule = s2m_emu::Schedule::kRandom;
  s2m_emu::config().seed = seed;
  std::vector<T> gz3, glw3, gmu3, gvar3;
  run_backward(&gz3, &glw3, &gmu3, &gvar3);
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  same_bits(gmu3, gmu, "score_paired_backward grad means, random schedule " + tag);
  same_bits(gz3, gz, "score_paired_backward grad z, random schedule " + tag);
}

template <typename T>
void pool_case(int64_t B, int64_t M, int64_t K, int64_t D, unsigned seed, bool backward) {
  const std::string tag = tname<T>() + " B=" + std::to_string(B) + " M=" + std::to_string(M) +
                          " K=" + std::to_string(K) + " D=" + std::to_string(D);
  Mixtures<T> mix(B, K, D, seed);
  const std::vector<T> z = queries<T>(M * D, seed + 1);
  const Ref ref(mix);
  const std::vector<double> zd = to_double(z);
  std::vector<double> want(B * M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) want[b * M + m] = ref.log_prob(b, zd.data() + m * D);
  auto run = [&]() {
    std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::score_pool_workspace_bytes<T>(B, K, D) + 16);
    std::vector<T> out = nans<T>(B * M);
    emu_check(s2m::cuda::score_pool<T>(z.data(), M, mix.args(), out.data(), ws.data(), nullptr) ==
                  cudaSuccess, "score_pool launch " + tag);
    return out;
  };
  const std::vector<T> out = run();
  close(out, want, tol<T>(), "score_pool " + tag);
  s2m_emu::config().schedule = s2m_emu::Schedule::kReverse;
  const std::vector<T> again = run();
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  same_bits(again, out, "score_pool " + tag);
  s2m_emu::config().schedule = s2m_emu::Schedule::kRandom;
  s2m_emu::config().seed = seed;
  const std::vector<T> shuffled = run();
  s2m_emu::config().schedule = s2m_emu::Schedule::kForward;
  same_bits(shuffled, out, "score_pool, random schedule " + tag);
  if (!backward) return;

  const std::vector<T> grad = queries<T>(B * M, seed + 2);
  std::vector<double> w_gz(M * D, 0.0), w_glw(B * K, 0.0), w_gmu(B * K * D, 0.0),
      w_gvar(B * K * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      ref.backward(b, zd.data() + m * D, double(grad[b * M + m]), w_glw.data() + b * K,
                   w_gmu.data() + b * K * D, w_gvar.data() + b * K * D, w_gz.data() + m * D);
  std::vector<T> gz = nans<T>(M * D), glw = nans<T>(B * K), gmu = nans<T>(B * K * D),
                 gvar = nans<T>(B * K * D);
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::score_pool_backward_workspace_bytes<T>(B, M, K, D) + 16);
  emu_check(s2m::cuda::score_pool_backward<T>(grad.data(), z.data(), M, mix.args(), gz.data(),
                                              glw.data(), gmu.data(), gvar.data(), ws.data(),
                                              nullptr) == cudaSuccess,
            "score_pool_backward launch " + tag);
  const double bt = tol<T>();
  close(gz, w_gz, bt, "score_pool_backward grad z " + tag);
  close(glw, w_glw, bt, "score_pool_backward grad log_weights " + tag);
  close(gmu, w_gmu, bt, "score_pool_backward grad means " + tag);
  close(gvar, w_gvar, bt, "score_pool_backward grad variances " + tag);
}

// Queries farther from every component than T can express score -inf and pass no gradient
// (gmm_math.h, scored_point_passes_gradient); the others match the float64 reference.
template <typename T>
void underflow_case(bool pool, unsigned seed) {
  const int64_t B = 2, K = 3, D = 5, Q = 9;
  const double var_scale = sizeof(T) == 8 ? 1e-20 : 1e-12, far = sizeof(T) == 8 ? 1e150 : 1e16;
  const std::string tag = tname<T>() + (pool ? " pool" : " paired") + " queries beyond the range";
  Mixtures<T> mix(B, K, D, seed, 0.0, std::sqrt(var_scale), var_scale);
  const int64_t rows = pool ? Q : B * Q;
  std::mt19937_64 rng(seed + 1);
  std::normal_distribution<double> normal;
  std::vector<T> z(rows * D);
  std::vector<bool> is_far(rows);
  for (int64_t r = 0; r < rows; ++r) {
    is_far[r] = r % 3 == 1;
    const int64_t c = pool ? 0 : (r / Q) * K;  // near component 0 of its set
    for (int64_t d = 0; d < D; ++d)
      z[r * D + d] = is_far[r] ? T((d % 2 ? -1 : 1) * far)
                               : T(mix.mu[c * D + d] + std::sqrt(double(mix.var[c * D + d])) * normal(rng));
  }
  const std::vector<T> grad = queries<T>(B * Q, seed + 2);
  const Ref ref(mix);
  const std::vector<double> zd = to_double(z);
  std::vector<double> want(B * Q), w_gz(rows * D, 0.0), w_glw(B * K, 0.0), w_gmu(B * K * D, 0.0),
      w_gvar(B * K * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t r = pool ? q : b * Q + q;
      if (is_far[r]) continue;
      want[b * Q + q] = ref.log_prob(b, zd.data() + r * D);
      ref.backward(b, zd.data() + r * D, double(grad[b * Q + q]), w_glw.data() + b * K,
                   w_gmu.data() + b * K * D, w_gvar.data() + b * K * D, w_gz.data() + r * D);
    }
  std::vector<T> out = nans<T>(B * Q), gz = nans<T>(rows * D), glw = nans<T>(B * K),
                 gmu = nans<T>(B * K * D), gvar = nans<T>(B * K * D);
  if (pool) {
    std::vector<unsigned char> ws =
        s2m_emu::poisoned_bytes(s2m::cuda::score_pool_workspace_bytes<T>(B, K, D) + 16);
    emu_check(s2m::cuda::score_pool<T>(z.data(), Q, mix.args(), out.data(), ws.data(), nullptr) ==
                  cudaSuccess, "score_pool launch " + tag);
    std::vector<unsigned char> bws =
        s2m_emu::poisoned_bytes(s2m::cuda::score_pool_backward_workspace_bytes<T>(B, Q, K, D) + 16);
    emu_check(s2m::cuda::score_pool_backward<T>(grad.data(), z.data(), Q, mix.args(), gz.data(),
                                                glw.data(), gmu.data(), gvar.data(), bws.data(),
                                                nullptr) == cudaSuccess,
              "score_pool_backward launch " + tag);
  } else {
    std::vector<unsigned char> ws =
        s2m_emu::poisoned_bytes(s2m::cuda::score_paired_workspace_bytes<T>(B, K, D) + 16);
    emu_check(s2m::cuda::score_paired<T>(z.data(), Q, mix.args(), out.data(), ws.data(), nullptr) ==
                  cudaSuccess, "score_paired launch " + tag);
    std::vector<unsigned char> bws =
        s2m_emu::poisoned_bytes(s2m::cuda::score_backward_workspace_bytes<T>(B, Q, K, D) + 16);
    s2m::cuda::ScoreBackwardArgs<T> a{grad.data(), z.data(), Q * D, Q, mix.args(), gz.data(),
                                      glw.data(), gmu.data(), gvar.data()};
    emu_check(s2m::cuda::score_paired_backward<T>(a, bws.data(), nullptr) == cudaSuccess,
              "score_paired_backward launch " + tag);
  }
  std::vector<T> near_out;
  std::vector<double> near_want;
  bool far_is_minus_inf = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t r = pool ? q : b * Q + q;
      if (is_far[r]) {
        far_is_minus_inf = far_is_minus_inf && out[b * Q + q] == -std::numeric_limits<T>::infinity();
      } else {
        near_out.push_back(out[b * Q + q]);
        near_want.push_back(want[b * Q + q]);
      }
    }
  emu_check(far_is_minus_inf, tag + ": far queries score -inf");
  close(near_out, near_want, tol<T>(), tag + ": scores of the near queries");
  close(gz, w_gz, tol<T>(), tag + ": grad z");
  close(glw, w_glw, tol<T>(), tag + ": grad log_weights");
  close(gmu, w_gmu, tol<T>(), tag + ": grad means");
  close(gvar, w_gvar, tol<T>(), tag + ": grad variances");
}

// The rule of csrc/cpu/kmeanspp_cpu.cpp, written out sequentially.
template <typename T>
int64_t ref_sample(const std::vector<T>& p, double u) {
  double total = 0;
  for (T v : p) total += double(v);
  const double target = u * total;
  double cum = 0;
  int64_t last_positive = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    cum += double(p[i]);
    if (p[i] > T(0)) last_positive = int64_t(i);
    if (cum > target) return int64_t(i);
  }
  return last_positive;
}

template <typename T>
std::vector<int64_t> ref_kmeanspp(const std::vector<T>& x, const std::vector<T>& w,
                                  const std::vector<double>& u, int64_t B, int64_t N, int64_t D,
                                  int64_t K) {
  std::vector<int64_t> idx(B * K);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<T> wb(w.begin() + b * N, w.begin() + (b + 1) * N);
    std::vector<T> d2(N, std::numeric_limits<T>::infinity()), p(N);
    idx[b * K] = ref_sample(wb, u[b * K]);
    for (int64_t j = 1; j < K; ++j) {
      const T* c = x.data() + (b * N + idx[b * K + j - 1]) * D;
      double total = 0;
      for (int64_t n = 0; n < N; ++n) {
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) {
          const T diff = x[(b * N + n) * D + d] - c[d];
          acc += diff * diff;
        }
        d2[n] = std::min(d2[n], acc);
        p[n] = wb[n] * d2[n];
        total += double(p[n]);
      }
      idx[b * K + j] = total > 0 ? ref_sample(p, u[b * K + j]) : ref_sample(wb, u[b * K + j]);
    }
  }
  return idx;
}

template <typename T>
void kmeanspp_case(int64_t B, int64_t N, int64_t D, int64_t K, unsigned seed, bool duplicates) {
  const std::string tag = tname<T>() + " B=" + std::to_string(B) + " N=" + std::to_string(N) +
                          " D=" + std::to_string(D) + " K=" + std::to_string(K);
  std::vector<T> x = queries<T>(B * N * D, seed);
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::vector<T> w(B * N);
  for (int64_t i = 0; i < B * N; ++i) w[i] = T(i % 5 == 3 ? 0.0 : 0.5 + unif(rng));
  if (duplicates)  // one distinct weighted point per set: every later draw falls back to weights
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) x[(b * N + n) * D + d] = x[b * N * D + d];
  std::vector<double> u(B * K);
  for (auto& v : u) v = unif(rng);
  const std::vector<int64_t> want = ref_kmeanspp(x, w, u, B, N, D, K);
  std::vector<int64_t> idx(B * K, -1);
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::kmeanspp_workspace_bytes<T>(B, N) + 16);
  emu_check(s2m::cuda::kmeanspp<T>(x.data(), w.data(), u.data(), B, N, D, K, idx.data(), {},
                                   ws.data(), nullptr) == cudaSuccess, "kmeanspp launch " + tag);
  emu_check(idx == want, "kmeanspp indices " + tag);

  // s2m::kmeanspp_init: the same draws, and the initial parameters against double sums.
  const T var_floor = T(0.01);
  std::vector<T> lw = nans<T>(B * K), mu = nans<T>(B * K * D), var = nans<T>(B * K * D);
  std::fill(idx.begin(), idx.end(), -1);
  ws = s2m_emu::poisoned_bytes(s2m::cuda::kmeanspp_workspace_bytes<T>(B, N) + 16);
  const s2m::cuda::KmeansppInit<T> init{lw.data(), mu.data(), var.data(), var_floor};
  emu_check(s2m::cuda::kmeanspp<T>(x.data(), w.data(), u.data(), B, N, D, K, idx.data(), init,
                                   ws.data(), nullptr) == cudaSuccess, "kmeanspp_init launch " + tag);
  emu_check(idx == want, "kmeanspp_init indices " + tag);
  std::vector<double> want_lw(B * K, -std::log(double(K))), want_mu(B * K * D), want_var(B * K * D);
  for (int64_t b = 0; b < B; ++b) {
    double total = 0;
    for (int64_t n = 0; n < N; ++n) total += double(w[b * N + n]);
    if (!(total > 0)) total = 1;
    for (int64_t d = 0; d < D; ++d) {
      double centre = 0, spread = 0;
      for (int64_t n = 0; n < N; ++n) centre += double(w[b * N + n]) * double(x[(b * N + n) * D + d]);
      centre /= total;
      for (int64_t n = 0; n < N; ++n) {
        const double dev = double(x[(b * N + n) * D + d]) - centre;
        spread += double(w[b * N + n]) * dev * dev;
      }
      for (int64_t k = 0; k < K; ++k) {
        want_mu[(b * K + k) * D + d] = double(x[(b * N + want[b * K + k]) * D + d]);
        want_var[(b * K + k) * D + d] = spread / total + double(var_floor);
      }
    }
  }
  close(lw, want_lw, tol<T>(), "kmeanspp_init log weights " + tag);
  close(mu, want_mu, 0.0, "kmeanspp_init means " + tag);
  close(var, want_var, tol<T>(), "kmeanspp_init variances " + tag);
}

}  // namespace

// The hard case for the pool kernel's scaled form in float32: mixtures far from the origin,
// narrow, and items close to the components (tests/test_core_scoring.py's far-and-narrow).
void far_and_narrow_pool_case() {
  const int64_t B = 6, M = 200, D = 64, K = 4;
  Mixtures<float> mix(B, K, D, 21, 1e3, 0.1, 1e-2);
  std::mt19937_64 rng(22);
  std::normal_distribution<double> normal;
  std::vector<float> z(M * D);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = m % (B * K);
    for (int64_t d = 0; d < D; ++d)
      z[m * D + d] = float(mix.mu[c * D + d] + std::sqrt(double(mix.var[c * D + d])) * normal(rng));
  }
  const Ref ref(mix);
  std::vector<double> want(B * M);
  const std::vector<double> zd = to_double(z);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) want[b * M + m] = ref.log_prob(b, zd.data() + m * D);
  std::vector<unsigned char> ws =
      s2m_emu::poisoned_bytes(s2m::cuda::score_pool_workspace_bytes<float>(B, K, D) + 16);
  std::vector<float> out = nans<float>(B * M);
  emu_check(s2m::cuda::score_pool<float>(z.data(), M, mix.args(), out.data(), ws.data(), nullptr) ==
                cudaSuccess, "score_pool launch far-and-narrow");
  close(out, want, 1e-4, "score_pool float32 far-and-narrow (offset 1e3, spread 0.1, var 1e-2)");
}

void run_score_tests() {
  far_and_narrow_pool_case();
  for (bool pool : {false, true}) {
    underflow_case<double>(pool, 30);
    underflow_case<float>(pool, 31);
  }
  paired_case<double>(3, 37, 3, 5, 1);
  paired_case<double>(2, 300, 1, 16, 2);
  paired_case<float>(3, 37, 3, 5, 3);
  paired_case<float>(2, 70, 5, 33, 4);
  // K = 1, 2, 3 (one chunk of 4), 5 (one chunk of 8), 11 (two chunks of 8); D not a multiple of 8;
  // M not a multiple of the row tile (double 64, float 96).
  pool_case<double>(5, 70, 2, 7, 10, true);
  pool_case<double>(37, 130, 11, 13, 11, true);
  pool_case<float>(37, 300, 3, 16, 12, true);
  pool_case<float>(3, 129, 1, 9, 13, true);
  pool_case<float>(20, 200, 5, 24, 14, false);
  pool_case<float>(9, 140, 4, 128, 15, false);
  // float tile of 96 rows: one row past it; K = 11, two chunks of 8 (the running logsumexp).
  pool_case<float>(7, 97, 11, 13, 16, true);
}

void run_kmeanspp_tests() {
  kmeanspp_case<double>(3, 50, 4, 3, 1, false);
  kmeanspp_case<double>(2, 600, 3, 5, 2, false);  // N over one block of threads
  kmeanspp_case<float>(3, 40, 7, 4, 3, false);
  kmeanspp_case<float>(2, 30, 3, 3, 4, true);
  kmeanspp_case<float>(2, 70, 300, 2, 5, false);  // D over one block of threads
}
