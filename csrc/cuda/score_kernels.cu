// Scoring kernels (paired and pool, forward and backward). Torch-free; see score_kernels.cuh.
//
// Paired scoring mirrors csrc/cpu/score_cpu.cpp: one thread per query, the direct form
// sum_d (z - mu)^2 / v. Pool scoring uses the scaled form
//     (z - mu)^2 / v = e^2,   e = fma(zc, s, ms),   s = 1/sqrt(v),  ms = -(mu - c) s,
// with zc = z - c and c the mean of all component means: two FMAs per (item, component, dim),
// the same count as the matrix-product expansion, but e is formed before squaring, so nothing
// cancels: |error of e| <= ~3 eps (|zc| + |mu - c|) / sqrt(v), against the expansion's
// eps (|z|^2 + |mu|^2) / v after squaring (bench/NOTES.md, CUDA section).
#include "cuda/score_kernels.cuh"

#include <algorithm>

#include "common/gmm_math.h"
#include "cuda/device_common.cuh"

namespace s2m {
namespace cuda {
namespace {

constexpr int kThreads = 256;

S2M_DEV int lane() { return int(threadIdx.x) % kWarpSize; }

// ----------------------------------------------------------------------------- constants
// iv = 1 / v and log_norm = log pi - 1/2 sum_d log(2 pi v) of each of the B*K components
// (cpu: precompute_components). One warp per component.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mixture_constants_kernel(const T* lw, const T* var, int64_t BK, int D, T* iv, T* log_norm) {
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (c >= BK) return;  // a whole warp: no barrier below
  const T* v = var + c * D;
  for (int d = lane(); d < D; d += kWarpSize) iv[c * D + d] = T(1) / v[d];
  const T sum_log = warp_ordered_sum<T>(D, [&](int d) { return std::log(v[d]); });
  if (lane() == 0) log_norm[c] = component_log_norm(lw[c], sum_log, int64_t(D));
}

template <typename T>
cudaError_t launch_mixture_constants(const MixtureArgs<T>& mix, T* iv, T* log_norm,
                                     cudaStream_t stream) {
  const int64_t BK = mix.B * mix.K;
  if (BK == 0) return cudaSuccess;
  const int warps = kThreads / kWarpSize;
  S2M_LAUNCH(mixture_constants_kernel<T>, dim3(unsigned((BK + warps - 1) / warps)),
             dim3(kThreads), 0, stream, mix.log_weights, mix.variances, BK, int(mix.D), iv,
             log_norm);
  return cudaGetLastError();
}

// l = log_norm_k - 1/2 sum_d (z - mu)^2 / v for one point and one component.
template <typename T>
S2M_DEV T component_log_density(const T* z, const T* mu, const T* iv, T log_norm, int D) {
  T acc = T(0);
  for (int d = 0; d < D; ++d) {
    const T diff = z[d] - mu[d];
    acc = std::fma(diff * diff, iv[d], acc);
  }
  return log_norm - T(0.5) * acc;
}

// logsumexp_k l_k = *m + log(*s) with *m = max_k l_k and *s = sum_k exp(l_k - *m), accumulated
// online over k. Posteriors are then exp(l_k - *m) / *s (not exp(l_k - lse): lse carries a
// rounding error of eps |lse|, which exp would turn into a relative error).
template <typename T>
S2M_DEV void point_log_sum(const T* z, const T* mu, const T* iv, const T* log_norm, int K, int D,
                           T* m_out, T* s_out) {
  T m = neg_inf<T>(), s = T(0);
  for (int k = 0; k < K; ++k) {
    const T l = component_log_density(z, mu + k * D, iv + k * D, log_norm[k], D);
    if (l > m) {
      s = s * std::exp(m - l) + T(1);
      m = l;
    } else {
      s += std::exp(shifted_log_density(l, m));  // all -inf so far: counts 1, not NaN
    }
  }
  *m_out = m;
  *s_out = s;
}

template <typename T>
S2M_DEV T point_log_prob(const T* z, const T* mu, const T* iv, const T* log_norm, int K, int D) {
  T m, s;
  point_log_sum(z, mu, iv, log_norm, K, D, &m, &s);
  return m + std::log(s);
}

// ----------------------------------------------------------------------------- paired
template <typename T>
__global__ void __launch_bounds__(kThreads)
    score_paired_kernel(const T* z, int64_t Q, int64_t q_blocks, int K, int D, const T* mu,
                        const T* iv, const T* log_norm, T* out) {
  const int64_t b = blockIdx.x / q_blocks;
  const int64_t q = (blockIdx.x % q_blocks) * blockDim.x + threadIdx.x;
  if (q >= Q) return;
  const int64_t KD = int64_t(K) * D;
  out[b * Q + q] = point_log_prob(z + (b * Q + q) * D, mu + b * KD, iv + b * KD, log_norm + b * K,
                                  K, D);
}

// Per-set gradient sums of a chunk of queries, accumulated in partial[(b, chunk)] =
// [g_lw (K) | g_mu (K*D) | g_var (K*D)]; optionally g_z of each query (paired scoring).
// Queries go in tiles of P: dL/dl (P, K) in shared memory, then one thread per (k, d) sums over
// the tile in query order (cpu: point_log_densities_backward).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    score_backward_kernel(ScoreBackwardArgs<T> a, const T* iv_all, const T* log_norm_all,
                          int nchunks, int64_t chunk_len, int P, T* partial) {
  S2M_DYNAMIC_SHARED(smem);
  T* gl = reinterpret_cast<T*>(smem);  // (P, K)
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t b = blockIdx.x / nchunks;
  const int64_t chunk = blockIdx.x % nchunks;
  const int K = int(a.mix.K), D = int(a.mix.D), KD = K * D;
  const int64_t Q = a.Q;
  const T* mu = a.mix.means + b * KD;
  const T* iv = iv_all + b * KD;
  const T* log_norm = log_norm_all + b * K;
  const T* zb = a.z + b * a.z_batch_stride;
  const T* grad = a.grad + b * Q;
  T* part = partial + (b * nchunks + chunk) * (K + 2 * int64_t(KD));
  for (int i = tid; i < K + 2 * KD; i += nt) part[i] = T(0);
  const int64_t q_begin = chunk * chunk_len;
  const int64_t q_end = std::min(Q, q_begin + chunk_len);
  __syncthreads();
  for (int64_t q0 = q_begin; q0 < q_end; q0 += P) {
    const int np = int(std::min<int64_t>(P, q_end - q0));
    // dL/dl[p, k] = grad * r_k.
    for (int p = tid; p < np; p += nt) {
      const T g = grad[q0 + p];
      const T* zq = zb + (q0 + p) * D;
      T lmax = T(0), sum = T(1);
      if (g != T(0)) point_log_sum(zq, mu, iv, log_norm, K, D, &lmax, &sum);
      if (g == T(0) || !scored_point_passes_gradient(lmax)) {
        for (int k = 0; k < K; ++k) gl[p * K + k] = T(0);
        continue;
      }
      const T g_over_sum = g / sum;
      for (int k = 0; k < K; ++k) {
        const T l = component_log_density(zq, mu + k * D, iv + k * D, log_norm[k], D);
        gl[p * K + k] = g_over_sum * std::exp(l - lmax);
      }
    }
    __syncthreads();
    if (a.g_z != nullptr) {
      // dL/dz[p, d] = -sum_k dL/dl[p, k] (z - mu_k) / v_k
      for (int it = tid; it < np * D; it += nt) {
        const int p = it / D, d = it % D;
        const T zv = zb[(q0 + p) * D + d];
        T acc = T(0);
        for (int k = 0; k < K; ++k) acc -= gl[p * K + k] * ((zv - mu[k * D + d]) * iv[k * D + d]);
        a.g_z[(b * Q + q0 + p) * D + d] = acc;
      }
    }
    // dL/dmu = sum_p gl e, dL/dv = sum_p gl (e^2 - 1/v) / 2 with e = (z - mu) / v.
    for (int kd = tid; kd < KD; kd += nt) {
      const int k = kd / D, d = kd % D;
      const T m = mu[kd], s = iv[kd];
      T gm = T(0), gv = T(0);
      for (int p = 0; p < np; ++p) {
        const T g = gl[p * K + k];
        const T e = (zb[(q0 + p) * D + d] - m) * s;
        // (g e) e, not g (e e): e e may overflow where g = 0 (a query that passes no gradient).
        const T h = g * e;
        gm += h;
        gv += T(0.5) * (h * e - g * s);
      }
      part[K + kd] += gm;
      part[K + KD + kd] += gv;
    }
    for (int k = tid; k < K; k += nt) {
      T acc = T(0);
      for (int p = 0; p < np; ++p) acc += gl[p * K + k];
      part[k] += acc;
    }
    __syncthreads();
  }
}

// out = sum over chunks, in chunk order, of the per-chunk sums.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_chunks_kernel(const T* partial, int nchunks, int64_t B, int K, int64_t KD, T* g_lw,
                         T* g_mu, T* g_var) {
  const int64_t per = K + 2 * KD;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * per) return;
  const int64_t b = i / per, j = i % per;
  T acc = T(0);
  for (int c = 0; c < nchunks; ++c) acc += partial[(b * nchunks + c) * per + j];
  if (j < K)
    g_lw[b * K + j] = acc;
  else if (j < K + KD)
    g_mu[b * KD + (j - K)] = acc;
  else
    g_var[b * KD + (j - K - KD)] = acc;
}

struct BackwardPlan {
  int P;            // queries per tile
  int nchunks;      // chunks of queries per set
  int64_t chunk_len;
  size_t smem;
};

template <typename T>
BackwardPlan backward_plan(int64_t B, int64_t Q, int64_t K, const DeviceLimits& dev) {
  BackwardPlan p;
  p.P = int(std::max<int64_t>(1, std::min<int64_t>(kThreads, (48 * 1024) / (K * int64_t(sizeof(T))))));
  const int64_t tiles = std::max<int64_t>(1, (Q + p.P - 1) / p.P);
  // Enough blocks to fill the device twice over, without splitting below one tile.
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(dev.sm_count) + B - 1) / std::max<int64_t>(B, 1));
  const int64_t chunks = std::min<int64_t>({want, tiles, 4096});
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  p.chunk_len = tiles_per_chunk * p.P;
  p.nchunks = int((tiles + tiles_per_chunk - 1) / tiles_per_chunk);
  p.smem = size_t(p.P) * size_t(K) * sizeof(T);
  return p;
}

template <typename T>
size_t backward_partial_elems(int64_t B, const BackwardPlan& p, int64_t K, int64_t D) {
  return size_t(B) * size_t(p.nchunks) * size_t(K + 2 * K * D);
}

// Workspace of the backward: iv (B*K*D) | log_norm (B*K) | partial sums.
template <typename T>
cudaError_t run_score_backward(const ScoreBackwardArgs<T>& a, T* ws, cudaStream_t stream) {
  const int64_t B = a.mix.B, K = a.mix.K, D = a.mix.D, KD = K * D;
  if (B == 0) return cudaSuccess;
  DeviceLimits dev;
  cudaError_t e = query_device_limits(&dev);
  if (e != cudaSuccess) return e;
  T* iv = ws;
  T* log_norm = iv + round_up(size_t(B * KD), 2);
  T* partial = log_norm + round_up(size_t(B * K), 2);
  e = launch_mixture_constants(a.mix, iv, log_norm, stream);
  if (e != cudaSuccess) return e;
  const BackwardPlan p = backward_plan<T>(B, a.Q, K, dev);
  S2M_LAUNCH(score_backward_kernel<T>, dim3(unsigned(B * p.nchunks)), dim3(kThreads), p.smem,
             stream, a, iv, log_norm, p.nchunks, p.chunk_len, p.P, partial);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t total = B * (K + 2 * KD);
  S2M_LAUNCH(reduce_chunks_kernel<T>, dim3(unsigned((total + kThreads - 1) / kThreads)),
             dim3(kThreads), 0, stream, partial, p.nchunks, B, int(K), KD, a.g_log_weights,
             a.g_means, a.g_variances);
  return cudaGetLastError();
}

template <typename T>
size_t score_backward_ws_bytes(int64_t B, int64_t Q, int64_t K, int64_t D) {
  DeviceLimits dev;
  if (query_device_limits(&dev) != cudaSuccess) return 0;
  const BackwardPlan p = backward_plan<T>(B, Q, K, dev);
  return (round_up(size_t(B * K * D), 2) + round_up(size_t(B * K), 2) +
          backward_partial_elems<T>(B, p, K, D)) * sizeof(T);
}

// ----------------------------------------------------------------------------- pool forward
// Block tile: BM pool rows x kPoolBN component columns, 16 x 16 threads, each a TM x 8
// register tile; d in steps of kPoolBD through shared memory, the next step's global loads
// held in registers while the current one is computed.
constexpr int kPoolBN = 128;
constexpr int kPoolBD = 8;

template <typename T>
struct PoolTile {
  // Rows per thread (registers: TM x 8 accumulators). float: 6, not 8, so that the tile, its
  // pipelined loads and the kernel's indices fit 128 registers without spilling.
  static constexpr int TM = sizeof(T) == 4 ? 6 : 4;
  static constexpr int BM = 16 * TM;
  static constexpr int BMP = BM + 4;                  // padded row of the transposed z tile
  static constexpr int ZPT = BM * kPoolBD / kThreads; // z elements each thread loads per step
  static constexpr size_t smem = size_t(kPoolBD * BMP + 2 * kPoolBD * kPoolBN) * sizeof(T);
  static_assert(BM * kPoolBD % kThreads == 0 && kThreads % kPoolBD == 0, "z tile load mapping");
};

// Columns: component k = c * kc + j of mixture b is column b * kc + j of chunk c.
struct PoolPlan {
  int kc;        // components per chunk (1, 2, 4 or 8); K <= 8 fits one chunk
  int chunks;
  int64_t ncol;  // B * kc rounded up to kPoolBN (padding columns score -inf)
  int dpad;      // D rounded up to kPoolBD (padding dims contribute 0)
};

inline PoolPlan pool_plan(int64_t B, int64_t K, int64_t D) {
  PoolPlan p;
  p.kc = K >= 8 ? 8 : (K > 4 ? 8 : (K > 2 ? 4 : int(K)));
  p.chunks = int((K + p.kc - 1) / p.kc);
  p.ncol = int64_t(round_up(size_t(B * p.kc), kPoolBN));
  p.dpad = int(round_up(size_t(D), kPoolBD));
  return p;
}

// Workspace: center (D) | S, MS (chunks, dpad, ncol) | LN (chunks, ncol).
struct PoolPlanes {
  size_t center, s, ms, ln, total;  // element offsets / count
};

inline PoolPlanes pool_planes(const PoolPlan& p, int64_t D) {
  PoolPlanes o;
  const size_t plane = size_t(p.chunks) * size_t(p.dpad) * size_t(p.ncol);
  o.center = 0;
  o.s = round_up(size_t(D), 4);
  o.ms = o.s + plane;
  o.ln = o.ms + plane;
  o.total = o.ln + size_t(p.chunks) * size_t(p.ncol);
  return o;
}

// center[d] = mean over all components of mu[., d] (one thread per d, in component order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_center_kernel(const T* mu, int64_t BK, int D, T* center) {
  const int d = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (d >= D) return;
  T acc = T(0);
  for (int64_t c = 0; c < BK; ++c) acc += mu[c * D + d];
  center[d] = acc / T(BK);
}

// S, MS, LN of every (chunk, column): one warp each, lanes over d.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_planes_kernel(const T* lw, const T* mu, const T* var, const T* center, int64_t B, int K,
                       int D, PoolPlan plan, T* S, T* MS, T* LN) {
  const int64_t task = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (task >= plan.chunks * plan.ncol) return;  // a whole warp
  const int64_t c = task / plan.ncol, col = task % plan.ncol;
  const int64_t b = col / plan.kc;
  const int k = int(c) * plan.kc + int(col % plan.kc);
  const bool valid = b < B && k < K;
  const int64_t comp = (b * K + k) * D;
  T* sp = S + c * plan.dpad * plan.ncol + col;
  T* msp = MS + c * plan.dpad * plan.ncol + col;
  // LN before the d loop, so no value waits for after it: double division and square root in
  // the loop call slow-path subroutines, and a value kept across them took a stack slot.
  if (valid) {
    const T sum_log = warp_ordered_sum<T>(D, [&](int d) { return std::log(var[comp + d]); });
    if (lane() == 0) LN[c * plan.ncol + col] = component_log_norm(lw[b * K + k], sum_log, int64_t(D));
  } else if (lane() == 0) {
    LN[c * plan.ncol + col] = neg_inf<T>();
  }
  for (int d = lane(); d < plan.dpad; d += kWarpSize) {
    T s = T(0), ms = T(0);
    if (valid && d < D) {
      s = T(1) / std::sqrt(var[comp + d]);
      ms = -(mu[comp + d] - center[d]) * s;
    }
    sp[int64_t(d) * plan.ncol] = s;
    msp[int64_t(d) * plan.ncol] = ms;
  }
}

template <typename T>
struct PoolArgs {
  const T* z;
  const T* center;
  const T* S;
  const T* MS;
  const T* LN;
  T* out;
  int64_t M, B;
  int D;
  PoolPlan plan;
};

// float: two blocks per SM (<= 128 registers a thread); double keeps its larger tiles' registers.
template <typename T, int KC>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1)
    score_pool_kernel(PoolArgs<T> a) {
  using Tile = PoolTile<T>;
  constexpr int TM = Tile::TM, BM = Tile::BM, BMP = Tile::BMP, ZPT = Tile::ZPT;
  constexpr int BD = kPoolBD, BN = kPoolBN, kModels = 8 / KC;
  constexpr int kZRows = kThreads / BD;  // z rows per thread's load element
  // Widest aligned piece of a thread's TM tile rows (float TM = 6: 8-byte pieces).
  constexpr int kZPiece = TM % max_vec<T>() == 0 ? max_vec<T>() : (TM % 2 == 0 ? 2 : 1);
  S2M_DYNAMIC_SHARED(smem);
  T* zs = reinterpret_cast<T*>(smem);  // [BD][BMP] z tile, transposed, centred
  T* ss = zs + BD * BMP;                // [BD][BN] 1/sqrt(v), columns permuted (below)
  T* mss = ss + BD * BN;                // [BD][BN] -(mu - c)/sqrt(v)
  const int tid = int(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const PoolPlan& plan = a.plan;
  const int col0 = int(blockIdx.x) * BN;  // ncol < 2^31 (run_score_pool)
  // Tile loads: each thread copies 4 columns of one S/MS row and dim z_col of ZPT z rows
  // (z_row + e kZRows): a warp reads 4 rows of 8 consecutive dims.
  const int s_row = tid / 32, s_col = (tid % 32) * 4;
  // Thread tx owns logical columns tx*8 .. tx*8+7, stored at tx*4 .. +3 and 64 + tx*4 .. +3 so
  // that a quarter-warp's 16-byte reads hit distinct banks.
  const int s_dst = (s_col % 8 == 0) ? (s_col / 8) * 4 : 64 + (s_col / 8) * 4;
  const int z_row = tid / BD, z_col = tid % BD;

  for (int64_t rb = blockIdx.y; rb * BM < a.M; rb += gridDim.y) {
    const int64_t m0 = rb * BM;
    const T* zrow = a.z + (m0 + z_row) * a.D;  // this thread's first z row of the tile load
    const int64_t z_rows_left = a.M - m0 - z_row;
    const int chunks = KC < 8 ? 1 : plan.chunks;  // K <= KC < 8: one chunk
    for (int c = 0; c < chunks; ++c) {
      const T* S = a.S + int64_t(c) * plan.dpad * plan.ncol + col0;
      const T* MS = a.MS + int64_t(c) * plan.dpad * plan.ncol + col0;
      T acc[TM][8];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = T(0);
      T zpf[ZPT], spf[4], mspf[4];
      auto load_step = [&](int d0) {
        const int d = d0 + z_col;
        const T cd = d < a.D ? a.center[d] : T(0);
#pragma unroll
        for (int e = 0; e < ZPT; ++e)
          zpf[e] = (e * kZRows < z_rows_left && d < a.D) ? zrow[int64_t(e * kZRows) * a.D + d] - cd : T(0);
        load_elems<T, 4>(S + int64_t(d0 + s_row) * plan.ncol + s_col, spf);
        load_elems<T, 4>(MS + int64_t(d0 + s_row) * plan.ncol + s_col, mspf);
      };
      auto store_step = [&]() {
#pragma unroll
        for (int e = 0; e < ZPT; ++e) zs[z_col * BMP + z_row + e * kZRows] = zpf[e];
        store_elems<T, 4>(ss + s_row * BN + s_dst, spf);
        store_elems<T, 4>(mss + s_row * BN + s_dst, mspf);
      };
      load_step(0);
      store_step();
      __syncthreads();
      for (int d0 = 0; d0 < plan.dpad; d0 += BD) {
        const bool more = d0 + BD < plan.dpad;
        if (more) load_step(d0 + BD);
#pragma unroll
        for (int dd = 0; dd < BD; ++dd) {
          T zr[TM], sv[8], mv[8];
#pragma unroll
          for (int i = 0; i < TM; i += kZPiece) load_elems<T, kZPiece>(zs + dd * BMP + ty * TM + i, zr + i);
          load_elems<T, 4>(ss + dd * BN + tx * 4, sv);
          load_elems<T, 4>(ss + dd * BN + 64 + tx * 4, sv + 4);
          load_elems<T, 4>(mss + dd * BN + tx * 4, mv);
          load_elems<T, 4>(mss + dd * BN + 64 + tx * 4, mv + 4);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const T e = std::fma(zr[i], sv[j], mv[j]);
              acc[i][j] = std::fma(e, e, acc[i][j]);
            }
        }
        __syncthreads();
        if (more) {
          store_step();
          __syncthreads();
        }
      }
      // Epilogue of the chunk: logsumexp over each mixture's components in registers.
      T ln[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) ln[j] = a.LN[int64_t(c) * plan.ncol + col0 + tx * 8 + j];
#pragma unroll
      for (int q = 0; q < kModels; ++q) {
        const int64_t b = (col0 + tx * 8 + q * KC) / KC;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          T lm = neg_inf<T>();
#pragma unroll
          for (int j = 0; j < KC; ++j) {
            const T l = ln[q * KC + j] - T(0.5) * acc[i][q * KC + j];
            lm = l > lm ? l : lm;
          }
          T ls = T(0);
#pragma unroll
          for (int j = 0; j < KC; ++j)
            ls += std::exp(shifted_log_density(ln[q * KC + j] - T(0.5) * acc[i][q * KC + j], lm));
          const int64_t m = m0 + ty * TM + i;
          if (KC < 8) {  // K <= KC: one chunk
            if (b < a.B && m < a.M) a.out[b * a.M + m] = lm + std::log(ls);
          } else {
            // The running logsumexp over chunks lives in out (this thread wrote it for the
            // previous chunk): no registers held across the d loop, 8 bytes per (row, mixture)
            // and chunk against 2 * 8 * D FMAs.
            if (b < a.B && m < a.M) {
              T r = lm + std::log(ls);
              if (c > 0) {
                const T prev = a.out[b * a.M + m];
                const T mx = lm > prev ? lm : prev;
                r = mx + std::log(std::exp(shifted_log_density(prev, mx)) +
                                  ls * std::exp(shifted_log_density(lm, mx)));
              }
              a.out[b * a.M + m] = r;
            }
          }
        }
      }
    }
  }
}

template <typename T>
cudaError_t run_score_pool(const T* z, int64_t M, const MixtureArgs<T>& mix, T* out, T* ws,
                           cudaStream_t stream) {
  const int64_t B = mix.B, K = mix.K, D = mix.D;
  if (M == 0 || B == 0) return cudaSuccess;
  const PoolPlan plan = pool_plan(B, K, D);
  if (plan.ncol > INT32_MAX) return cudaErrorInvalidValue;  // 32-bit column index in the kernel
  const PoolPlanes o = pool_planes(plan, D);
  T* center = ws + o.center;
  S2M_LAUNCH(pool_center_kernel<T>, dim3(unsigned((D + kThreads - 1) / kThreads)), dim3(kThreads),
             0, stream, mix.means, B * K, int(D), center);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t tasks = plan.chunks * plan.ncol;
  const int warps = kThreads / kWarpSize;
  S2M_LAUNCH(pool_planes_kernel<T>, dim3(unsigned((tasks + warps - 1) / warps)), dim3(kThreads), 0,
             stream, mix.log_weights, mix.means, mix.variances, center, B, int(K), int(D), plan,
             ws + o.s, ws + o.ms, ws + o.ln);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  PoolArgs<T> a{z, center, ws + o.s, ws + o.ms, ws + o.ln, out, M, B, int(D), plan};
  const int64_t row_blocks = (M + PoolTile<T>::BM - 1) / PoolTile<T>::BM;
  const dim3 grid(unsigned(plan.ncol / kPoolBN), unsigned(std::min<int64_t>(row_blocks, 65535)));
  const size_t smem = PoolTile<T>::smem;
  auto kernel = plan.kc == 1   ? score_pool_kernel<T, 1>
                : plan.kc == 2 ? score_pool_kernel<T, 2>
                : plan.kc == 4 ? score_pool_kernel<T, 4>
                               : score_pool_kernel<T, 8>;
  S2M_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, a);
  return cudaGetLastError();
}

// ----------------------------------------------------------------------------- pool backward
// dL/dz[m] = sum_{b,k} grad[b,m] r_bk(z_m) (mu_bk - z_m) / v_bk: one warp per pool item, lanes
// over d, mixtures in order. Per warp in shared memory: l (K) and the gradient (D).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_grad_z_kernel(const T* grad, const T* z, int64_t M, int64_t B, int K, int D,
                       const T* mu, const T* iv, const T* log_norm, T* g_z) {
  S2M_DYNAMIC_SHARED(smem);
  const int warps = int(blockDim.x) / kWarpSize, w = int(threadIdx.x) / kWarpSize;
  const int64_t m = int64_t(blockIdx.x) * warps + w;
  if (m >= M) return;  // a whole warp; no block barrier below
  const int per_warp = int(round_up(size_t(K), 2)) + D;
  T* l = reinterpret_cast<T*>(smem) + int64_t(w) * per_warp;
  T* acc = l + round_up(size_t(K), 2);
  const T* zm = z + m * D;
  for (int d = lane(); d < D; d += kWarpSize) acc[d] = T(0);
  const int64_t KD = int64_t(K) * D;
  for (int64_t b = 0; b < B; ++b) {
    const T g = grad[b * M + m];
    if (g == T(0)) continue;  // the same in every lane
    const T* mub = mu + b * KD;
    const T* ivb = iv + b * KD;
    T lmax = neg_inf<T>();
    for (int k = 0; k < K; ++k) {
      T part = T(0);
      for (int d = lane(); d < D; d += kWarpSize) {
        const T diff = zm[d] - mub[k * D + d];
        part = std::fma(diff * diff, ivb[k * D + d], part);
      }
      const T lk = log_norm[b * K + k] - T(0.5) * warp_sum(part);
      if (lane() == 0) l[k] = lk;
      lmax = lk > lmax ? lk : lmax;
    }
    __syncwarp();
    if (!scored_point_passes_gradient(lmax)) continue;  // the same in every lane
    T s = T(0);
    for (int k = 0; k < K; ++k) s += std::exp(l[k] - lmax);
    const T g_over_sum = g / s;
    for (int k = 0; k < K; ++k) {
      const T gk = g_over_sum * std::exp(l[k] - lmax);
      for (int d = lane(); d < D; d += kWarpSize)
        acc[d] += gk * ((mub[k * D + d] - zm[d]) * ivb[k * D + d]);
    }
    __syncwarp();  // l is rewritten for the next mixture
  }
  for (int d = lane(); d < D; d += kWarpSize) g_z[m * D + d] = acc[d];
}

}  // namespace

template <typename T>
size_t score_pool_smem_bytes() {
  return PoolTile<T>::smem;
}

// Warps per block of pool_grad_z_kernel: as many as fit max_smem (each holds l and its g_z row).
template <typename T>
size_t pool_grad_z_smem_bytes(int64_t K, int64_t D, int64_t max_smem, int* threads) {
  const size_t per_warp = (round_up(size_t(K), 2) + size_t(D)) * sizeof(T);
  const int warps = int(std::min<size_t>(kThreads / kWarpSize, size_t(max_smem) / per_warp));
  *threads = warps * kWarpSize;
  return per_warp * size_t(warps);
}

// ----------------------------------------------------------------------------- entry points
template <typename T>
size_t score_paired_workspace_bytes(int64_t B, int64_t K, int64_t D) {
  return (round_up(size_t(B * K * D), 2) + round_up(size_t(B * K), 2)) * sizeof(T);
}

template <typename T>
cudaError_t score_paired(const T* z, int64_t Q, const MixtureArgs<T>& mix, T* out, void* workspace,
                         cudaStream_t stream) {
  const int64_t B = mix.B, K = mix.K, D = mix.D;
  if (B == 0 || Q == 0) return cudaSuccess;
  T* iv = static_cast<T*>(workspace);
  T* log_norm = iv + round_up(size_t(B * K * D), 2);
  cudaError_t e = launch_mixture_constants(mix, iv, log_norm, stream);
  if (e != cudaSuccess) return e;
  const int64_t q_blocks = (Q + kThreads - 1) / kThreads;
  S2M_LAUNCH(score_paired_kernel<T>, dim3(unsigned(B * q_blocks)), dim3(kThreads), 0, stream, z, Q,
             q_blocks, int(K), int(D), mix.means, iv, log_norm, out);
  return cudaGetLastError();
}

template <typename T>
size_t score_backward_workspace_bytes(int64_t B, int64_t Q, int64_t K, int64_t D) {
  return score_backward_ws_bytes<T>(B, Q, K, D);
}

template <typename T>
cudaError_t score_paired_backward(const ScoreBackwardArgs<T>& args, void* workspace,
                                  cudaStream_t stream) {
  return run_score_backward(args, static_cast<T*>(workspace), stream);
}

template <typename T>
size_t score_pool_workspace_bytes(int64_t B, int64_t K, int64_t D) {
  return pool_planes(pool_plan(B, K, D), D).total * sizeof(T);
}

template <typename T>
cudaError_t score_pool(const T* z, int64_t M, const MixtureArgs<T>& mix, T* out, void* workspace,
                       cudaStream_t stream) {
  return run_score_pool(z, M, mix, out, static_cast<T*>(workspace), stream);
}

template <typename T>
size_t score_pool_backward_workspace_bytes(int64_t B, int64_t M, int64_t K, int64_t D) {
  return score_backward_ws_bytes<T>(B, M, K, D);
}

template <typename T>
cudaError_t score_pool_backward(const T* grad, const T* z, int64_t M, const MixtureArgs<T>& mix,
                                T* g_z, T* g_log_weights, T* g_means, T* g_variances,
                                void* workspace, cudaStream_t stream) {
  const int64_t B = mix.B, K = mix.K, D = mix.D;
  if (B == 0) return cudaSuccess;  // the glue zero-fills g_z
  // The mixtures' gradients: paired backward with every set seeing the whole pool.
  ScoreBackwardArgs<T> a{grad, z, 0, M, mix, nullptr, g_log_weights, g_means, g_variances};
  T* ws = static_cast<T*>(workspace);
  cudaError_t e = run_score_backward(a, ws, stream);
  if (e != cudaSuccess || M == 0) return e;
  const T* iv = ws;  // left there by run_score_backward
  const T* log_norm = iv + round_up(size_t(B * K * D), 2);
  DeviceLimits dev;
  e = query_device_limits(&dev);
  if (e != cudaSuccess) return e;
  int threads = 0;
  const size_t smem = pool_grad_z_smem_bytes<T>(K, D, dev.max_smem_optin, &threads);
  const int warps = threads / kWarpSize;
  if (warps < 1) return cudaErrorInvalidValue;  // D too large for one warp's shared memory
  e = allow_dynamic_smem(pool_grad_z_kernel<T>, smem);
  if (e != cudaSuccess) return e;
  S2M_LAUNCH(pool_grad_z_kernel<T>, dim3(unsigned((M + warps - 1) / warps)),
             dim3(unsigned(warps * kWarpSize)), smem, stream, grad, z, M, B, int(K), int(D),
             mix.means, iv, log_norm, g_z);
  return cudaGetLastError();
}

#define S2M_INSTANTIATE_SCORE(T)                                                                 \
  template size_t score_paired_workspace_bytes<T>(int64_t, int64_t, int64_t);                   \
  template cudaError_t score_paired<T>(const T*, int64_t, const MixtureArgs<T>&, T*, void*,     \
                                       cudaStream_t);                                           \
  template size_t score_backward_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t);        \
  template cudaError_t score_paired_backward<T>(const ScoreBackwardArgs<T>&, void*, cudaStream_t); \
  template size_t score_pool_workspace_bytes<T>(int64_t, int64_t, int64_t);                     \
  template cudaError_t score_pool<T>(const T*, int64_t, const MixtureArgs<T>&, T*, void*,       \
                                     cudaStream_t);                                             \
  template size_t score_pool_backward_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t);   \
  template size_t score_pool_smem_bytes<T>();                                                  \
  template size_t pool_grad_z_smem_bytes<T>(int64_t, int64_t, int64_t, int*);                   \
  template cudaError_t score_pool_backward<T>(const T*, const T*, int64_t, const MixtureArgs<T>&, \
                                              T*, T*, T*, T*, void*, cudaStream_t);
S2M_INSTANTIATE_SCORE(float)
S2M_INSTANTIATE_SCORE(double)
#undef S2M_INSTANTIATE_SCORE

}  // namespace cuda
}  // namespace s2m
