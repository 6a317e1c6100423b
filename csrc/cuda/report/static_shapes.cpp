// Prints, for the benchmark suite's shapes, which kernel instantiation each CUDA op launches,
// with its dynamic shared memory and threads per block under the sm_80 and sm_90 per-block
// shared-memory limits. Host code only (no device is queried): read by static_report.py.
// Output: one tab-separated line per (op, shape, arch):
//   kernel  shape  arch  dynamic_smem_bytes  threads
#include <cstdint>
#include <cstdio>

#include "cuda/em_kernels.cuh"
#include "cuda/score_kernels.cuh"

namespace {

struct Arch {
  const char* name;
  int64_t max_smem_optin;  // bytes of shared memory one block may opt in to
};

// cudaDevAttrMaxSharedMemoryPerBlockOptin of the A100 and H100/H200.
constexpr Arch kArchs[] = {{"sm_80", 166912}, {"sm_90", 232448}};

struct EmShape {
  const char* name;
  int64_t N, D, K;
};

constexpr EmShape kEmShapes[] = {{"B1024 N64 D128 K4", 64, 128, 4},
                                 {"B16384 N256 D256 K8", 256, 256, 8}};

}  // namespace

int main() {
  namespace c = s2m::cuda;
  for (const Arch& a : kArchs) {
    for (const EmShape& s : kEmShapes) {
      for (const bool backward : {false, true}) {
        const int placement = c::em_placement_for_limit<float>(s.N, s.D, s.K, backward,
                                                               a.max_smem_optin);
        const int64_t smem = c::em_smem_bytes_for_limit<float>(s.N, s.D, s.K, backward,
                                                               a.max_smem_optin);
        const int vec = s.D % 4 == 0 ? 4 : 1;
        std::printf("%s_kernel<float, %d, %d>\t%s\t%s\t%lld\t%d\n",
                    backward ? "em_backward" : "em_forward", vec, placement, s.name, a.name,
                    static_cast<long long>(smem), c::kEmThreads);
      }
    }
    // Pool scoring of M items against B mixtures, D = 128, K = 4 (one chunk of 4 components).
    std::printf("score_pool_kernel<float, 4>\tpool D128 K4\t%s\t%zu\t256\n", a.name,
                c::score_pool_smem_bytes<float>());
    int threads = 0;
    const size_t gz = c::pool_grad_z_smem_bytes<float>(4, 128, a.max_smem_optin, &threads);
    std::printf("pool_grad_z_kernel<float>\tpool D128 K4\t%s\t%zu\t%d\n", a.name, gz, threads);
  }
  return 0;
}
