// Peak floating-point throughput of this CPU: independent multiply-add chains in vector
// registers, for one thread and for every core. Compiled once per instruction-set level by
// bench/peak_flops.py, which picks the flags; the vector width follows them:
//   -mavx512f: 64-byte vectors, -mavx2 -mfma: 32 bytes, neither: 16 bytes (SSE2).
// With FMA the compiler contracts a * b + c into one instruction; without it (SSE2) the
// same counts as a multiply and an add. Either way a multiply-add is 2 flops.
//
//   peak_flops SECONDS THREADS   -> one JSON line
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

// Enough independent chains to hide the latency of a multiply-add on two pipes (4-5 cycles).
constexpr int kChains = 12;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int lanes = kBytes / sizeof(T);
};

volatile double g_seed = 1e-3;  // volatile: the compiler cannot fold the loop away

template <typename T>
double chain_flops(double seconds, double* sink) {
  using V = typename Vec<T>::type;
  V acc[kChains];
  const T s = T(g_seed);
  for (int j = 0; j < kChains; ++j) acc[j] = V{} + s * T(j + 1);
  const V b = V{} + T(0.999999), c = V{} + s;  // converges to c / (1 - b): no overflow or subnormals
  const long block = 1 << 16;
  long blocks = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (long i = 0; i < block; ++i) {
#pragma GCC unroll 12
      for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * b + c;
    }
    ++blocks;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  T total = 0;
  for (int j = 0; j < kChains; ++j)
    for (int l = 0; l < Vec<T>::lanes; ++l) total += acc[j][l];
  *sink += double(total);
  return 2.0 * Vec<T>::lanes * kChains * double(block) * double(blocks) / elapsed;
}

template <typename T>
double all_threads(double seconds, int threads, double* sink) {
  std::vector<double> rates(threads), sinks(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { rates[t] = chain_flops<T>(seconds, &sinks[t]); });
  for (auto& th : pool) th.join();
  double sum = 0;
  for (int t = 0; t < threads; ++t) {
    sum += rates[t];
    *sink += sinks[t];
  }
  return sum;
}

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  const int threads = argc > 2 ? std::max(1, std::atoi(argv[2])) : 1;
  double sink = 0;
  const double f32 = chain_flops<float>(seconds, &sink), f64 = chain_flops<double>(seconds, &sink);
  const double f32_all = all_threads<float>(seconds, threads, &sink);
  const double f64_all = all_threads<double>(seconds, threads, &sink);
  std::printf("{\"vector_bytes\": %d, \"float32_1t\": %.6g, \"float64_1t\": %.6g, \"threads\": %d, "
              "\"float32_all\": %.6g, \"float64_all\": %.6g, \"sink\": %.3g}\n",
              kBytes, f32, f64, threads, f32_all, f64_all, sink);
  return 0;
}
