// A CPU emulator of the small CUDA subset that csrc/cuda/*.cu use, so that the kernels' logic
// can be run and checked on machines without a GPU (CI included).
//
// Compile a .cu file as C++ with -DS2M_CUDA_EMU (see csrc/cuda/emu/run_emu_tests.sh): the
// kernels become plain functions, and S2M_LAUNCH runs them block after block. Each thread of a
// block is a fiber (ucontext); fibers run one at a time until they reach a barrier
// (__syncthreads, a warp shuffle) or return. What this catches:
//   * wrong indexing and wrong math (results compared with the CPU kernels);
//   * a missing __syncthreads: run a launch under Schedule::kForward and kReverse; a thread
//     that reads what another writes in the same barrier interval sees different data in the
//     two orders, so the results differ;
//   * a __syncthreads or shuffle reached by only part of a block or warp (reported);
//   * uninitialised shared memory (filled with NaN bytes before each block) and uninitialised
//     global workspace (tests allocate it with poisoned_bytes: NaN bytes before each op);
//   * a hidden dependence on the order threads run in: Schedule::kRandom draws a new order of
//     the block's threads for every barrier interval (the tests run each op under it too);
//   * more dynamic shared memory than the device allows, or over 48 KiB without
//     cudaFuncSetAttribute (reported).
// Not emulated: memory-model subtleties, atomics, streams and events (all work is synchronous).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------- CUDA surface
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // one object shared by the fibers of a block (blocks run in turn)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct s2m_emu_stream* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace s2m_emu {

enum class Schedule { kForward, kReverse, kRandom };

struct Config {
  int max_smem_optin = 227 * 1024;  // an H100's opt-in limit per block
  int sm_count = 4;
  Schedule schedule = Schedule::kForward;
  unsigned seed = 1;
};

inline Config& config() {
  static Config c;
  return c;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline std::map<const void*, int>& smem_attribute() {
  static std::map<const void*, int> m;
  return m;
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("cuda_emu: " + what);
}

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = State::kRunnable;
  dim3 tid;
  int linear = 0;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> shuffle_slots;  // one per thread
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // thrown inside a fiber, rethrown by the scheduler
};

inline Block*& running() {
  static Block* b = nullptr;
  return b;
}

inline Block& block() {
  Block* b = running();
  if (b == nullptr) fail("device code called outside a kernel launch");
  return *b;
}

inline std::vector<std::vector<char>>& stacks() {
  static std::vector<std::vector<char>> s;
  return s;
}

constexpr size_t kStackBytes = 256 * 1024;

inline void fiber_entry() {
  Block& b = block();
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  b.fibers[b.current].state = State::kDone;
  // returning resumes uc_link (the scheduler)
}

inline void yield() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].ctx, &b.scheduler);
}

inline void block_barrier() {
  block().fibers[block().current].state = State::kBlockBarrier;
  yield();
}

inline void warp_barrier() {
  block().fibers[block().current].state = State::kWarpBarrier;
  yield();
}

inline const dim3& thread_idx() { return block().fibers[block().current].tid; }
inline const dim3& block_idx() { return block().block_idx; }
inline const dim3& block_dim() { return block().block_dim; }
inline const dim3& grid_dim() { return block().grid_dim; }
inline unsigned char* dynamic_shared() { return block().smem.data(); }

inline std::vector<int> schedule_order(int n) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  switch (config().schedule) {
    case Schedule::kForward:
      break;
    case Schedule::kReverse:
      std::reverse(order.begin(), order.end());
      break;
    case Schedule::kRandom: {
      std::mt19937 rng(config().seed++);
      std::shuffle(order.begin(), order.end(), rng);
      break;
    }
  }
  return order;
}

inline void run_block(Block& b) {
  const int n = int(b.block_dim.x * b.block_dim.y * b.block_dim.z);
  if (stacks().size() < size_t(n)) stacks().resize(n, std::vector<char>(kStackBytes));
  b.fibers.assign(n, Fiber{});
  b.shuffle_slots.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = dim3(i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y,
                 i / (b.block_dim.x * b.block_dim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks()[i].data();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int warps = (n + 31) / 32;
  for (;;) {
    // Run every runnable fiber until it blocks or returns; a new order each interval.
    for (int i : schedule_order(n)) {
      if (b.fibers[i].state != State::kRunnable) continue;
      b.current = i;
      swapcontext(&b.scheduler, &b.fibers[i].ctx);
      if (b.error) std::rethrow_exception(b.error);
    }
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      const int lo = w * 32, hi = std::min(n, lo + 32);
      int waiting = 0;
      for (int i = lo; i < hi; ++i) waiting += b.fibers[i].state == State::kWarpBarrier;
      if (waiting == 0) continue;
      if (waiting != hi - lo)
        fail("a warp-synchronous operation (shuffle) was reached by only " +
             std::to_string(waiting) + " of the " + std::to_string(hi - lo) + " lanes of warp " +
             std::to_string(w) + " (divergent warp)");
      for (int i = lo; i < hi; ++i) b.fibers[i].state = State::kRunnable;
      released = true;
    }
    if (released) continue;
    int at_barrier = 0, done = 0;
    for (const Fiber& f : b.fibers) {
      at_barrier += f.state == State::kBlockBarrier;
      done += f.state == State::kDone;
    }
    if (done == n) break;
    if (at_barrier + done != n) fail("deadlock: no thread can make progress");
    if (done > 0)
      fail("__syncthreads reached by " + std::to_string(at_barrier) + " threads while " +
           std::to_string(done) + " had returned (divergent barrier)");
    for (Fiber& f : b.fibers) f.state = State::kRunnable;
  }
}

// A global buffer (an op's workspace) of n bytes, every byte 0xFF: read before written, a float
// or double of it is NaN, which the tests' comparisons reject.
inline std::vector<unsigned char> poisoned_bytes(size_t n) {
  return std::vector<unsigned char>(n, 0xFF);
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel* kernel, dim3 grid, dim3 block_dim, size_t smem_bytes, cudaStream_t,
                   Args... args) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return last_error();
  }
  auto it = smem_attribute().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it == smem_attribute().end() ? 48 * 1024 : size_t(it->second);
  if (smem_bytes > allowed || smem_bytes > size_t(config().max_smem_optin)) {
    fail("launch asks for " + std::to_string(smem_bytes) + " bytes of dynamic shared memory; " +
         "allowed " + std::to_string(std::min(allowed, size_t(config().max_smem_optin))));
  }
  const std::function<void()> body = [&]() { kernel(args...); };
  Block b;
  b.grid_dim = grid;
  b.block_dim = block_dim;
  b.body = &body;
  running() = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = dim3(x, y, z);
          b.smem.assign(smem_bytes + 16, 0xFF);  // NaN bytes: uninitialised reads show up
          run_block(b);
        }
  } catch (...) {
    running() = nullptr;
    throw;
  }
  running() = nullptr;
  return cudaSuccess;
}

}  // namespace s2m_emu

#define threadIdx (::s2m_emu::thread_idx())
#define blockIdx (::s2m_emu::block_idx())
#define blockDim (::s2m_emu::block_dim())
#define gridDim (::s2m_emu::grid_dim())

inline void __syncthreads() { ::s2m_emu::block_barrier(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::s2m_emu::fail("__syncwarp: only the full mask is emulated");
  ::s2m_emu::warp_barrier();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::s2m_emu::fail("__shfl_xor_sync: only full warps");
  auto& b = ::s2m_emu::block();
  const int me = b.current, lane = me % 32;
  ::s2m_emu::warp_barrier();  // the previous exchange has been read by every lane
  std::memcpy(&b.shuffle_slots[me], &value, sizeof(T));
  ::s2m_emu::warp_barrier();  // every lane has written
  T out;
  std::memcpy(&out, &b.shuffle_slots[me - lane + (lane ^ lane_mask)], sizeof(T));
  return out;
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::s2m_emu::fail("__shfl_sync: only full warps");
  auto& b = ::s2m_emu::block();
  const int me = b.current, lane = me % 32;
  ::s2m_emu::warp_barrier();
  std::memcpy(&b.shuffle_slots[me], &value, sizeof(T));
  ::s2m_emu::warp_barrier();
  T out;
  std::memcpy(&out, &b.shuffle_slots[me - lane + (src_lane & 31)], sizeof(T));
  return out;
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::s2m_emu::fail("__shfl_up_sync: only full warps");
  auto& b = ::s2m_emu::block();
  const int me = b.current, lane = me % 32;
  ::s2m_emu::warp_barrier();
  std::memcpy(&b.shuffle_slots[me], &value, sizeof(T));
  ::s2m_emu::warp_barrier();
  if (lane < int(delta)) return value;
  T out;
  std::memcpy(&out, &b.shuffle_slots[me - int(delta)], sizeof(T));
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::s2m_emu::last_error();
  ::s2m_emu::last_error() = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = ::s2m_emu::config().max_smem_optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = ::s2m_emu::config().sm_count;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > ::s2m_emu::config().max_smem_optin) return cudaErrorInvalidValue;
  ::s2m_emu::smem_attribute()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
