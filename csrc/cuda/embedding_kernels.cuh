// The kernels of the fused noisy embedding (forward) and its weight gradient (backward), and
// the launch logic on raw pointers (grid and block shape, vector or scalar path). Included by
// embedding.cu (nvcc) and by the host emulator of tests/cuda_emu (g++): one kernel text.
//
// Forward, uniform / gaussian: a 2-D block (TX, TY) = 256 threads; TY token rows per block
// (grid-stride over rows), TX threads across a row. A thread owns CPT consecutive Philox
// counters (4 * CPT elements: 16 bytes of fp32 / fp16 / bf16), one Philox call per 4
// elements, 16-byte vector loads/stores when the row width and pointers allow it.
// Forward, bernoulli: one warp per (row, chunk of 32 counters = 4096 elements); lane i draws
// counter i of the chunk into shared memory (512 bytes per warp), then the warp streams the
// chunk with 16-byte packs, each lane reading its word (broadcast) and shifting bits.
// Ids out of range are never read: their output rows are NaN and, with an `error` buffer
// (contract C1), the kernel records one bad id and V there (record_bad_id).
// SeedArg: the seed and counter offset, as values or read on the device at run time (CUDA-graph
// safe: a replay sees what its generator state or captured torch.randint holds; no host sync).
// SCALE (embed_scale != 1, Gemma): e = T(e * embed_scale) before the noise; the unscaled
// instantiations are the plain kernels.
//
// Backward (details and extra memory at the kernels): the sorted path (deterministic, and
// every fp16/bf16 gradient) -> the ids sorted stably by the caller, chunks of 32 sorted
// positions a warp, runs of <= 32 tokens summed serially in token order (bit-identical to the
// reference and the CPU kernel), longer runs as per-chunk partial sums combined in chunk order
// by a second kernel; each gradient row written once. The atomic path (non-deterministic
// float32 / float64) -> atomicAdd straight into the result. Both accumulate in AddType<T>
// (contract C3: float32, float64 for float64 grads). SCALE: each token row (pair halves
// summed first) times embed_scale before it is accumulated (the reference's order).
#pragma once

#include <algorithm>
#include <cstdint>

#include "device_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Where a forward's Philox seed and first counter come from (contract C4). seed_ptr null: the
// values `seed` and `offset`. Else read on the device when the kernel runs: the seed is
// *seed_ptr (the op's seed_tensor, or the CUDA generator's seed under graph capture) XOR
// xor_mask, and the counter offset (*offset_ptr + offset_add) / 4 (PyTorch's Philox offset,
// 4 per counter: the generator's state under capture) or 0 without offset_ptr.
struct SeedArg {
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_add = 0, xor_mask = 0;

  __device__ __forceinline__ void get(uint64_t& s, uint64_t& o) const {
    if (seed_ptr == nullptr) {
      s = seed;
      o = offset;
      return;
    }
    s = static_cast<uint64_t>(*seed_ptr) ^ xor_mask;
    o = offset_ptr == nullptr ? 0 : (static_cast<uint64_t>(*offset_ptr) + offset_add) / 4;
  }
};

// ---------------------------------------------------------------------------------------
// Forward: uniform / gaussian
// ---------------------------------------------------------------------------------------
template <typename T, typename I, int KIND, int CPT, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
forward_ug_kernel(const I* __restrict__ ids, int64_t n, const T* __restrict__ weight,
                  int64_t w_stride, int64_t V, T* __restrict__ out, int64_t d, int64_t G,
                  float mag, const float* __restrict__ tok_mag, SeedArg sa, bool symmetric,
                  typename AddType<T>::type es, int64_t* __restrict__ error) {
  constexpr int E = 4 * CPT;  // elements per thread-unit
  uint64_t seed, offset;
  sa.get(seed, offset);
  using P = Pack<T, E>;
  const int64_t units = (G + CPT - 1) / CPT;
  using A = typename AddType<T>::type;  // e + n in float32 (float64 for float64 weights)
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    const bool valid = id >= 0 && id < V;
    if (!valid && error != nullptr && threadIdx.x == 0) record_bad_id(error, id, V);
    const float m = tok_mag != nullptr ? tok_mag[r] : mag;
    const T* e = weight + (valid ? id : 0) * w_stride;
    T* o = out + r * d;
    T* o2 = out + (n + r) * d;
    const uint64_t row_ctr = offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(G);
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      float xi[E];
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        const Words4 w = philox4x32_10(row_ctr + static_cast<uint64_t>(u * CPT + c), seed);
        words_to_noise4(w, KIND, xi + 4 * c);
      }
      const int64_t j0 = u * E;
      if (VEC) {
        P ev;
        if (valid) ev = *reinterpret_cast<const P*>(e + j0);
        P a, b;
#pragma unroll
        for (int k = 0; k < E; ++k) {
          A x = valid ? static_cast<A>(ev.v[k]) : static_cast<A>(nan);
          if (SCALE) x = scale_embedding<T, A>(x, es);
          const A nz = static_cast<A>(mul_rn(xi[k], m));
          a.v[k] = static_cast<T>(add_rn(x, nz));
          b.v[k] = static_cast<T>(sub_rn(x, nz));
        }
        *reinterpret_cast<P*>(o + j0) = a;
        if (symmetric) *reinterpret_cast<P*>(o2 + j0) = b;
      } else {
#pragma unroll
        for (int k = 0; k < E; ++k) {
          const int64_t j = j0 + k;
          if (j < d) {
            A x = valid ? static_cast<A>(e[j]) : static_cast<A>(nan);
            if (SCALE) x = scale_embedding<T, A>(x, es);
            const A nz = static_cast<A>(mul_rn(xi[k], m));
            o[j] = static_cast<T>(add_rn(x, nz));
            if (symmetric) o2[j] = static_cast<T>(sub_rn(x, nz));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward: bernoulli (+-1), one Philox call per 128 elements
// ---------------------------------------------------------------------------------------
// elements of one 16-byte pack (at least 2, a divisor of 32)
template <typename T>
constexpr int kBernoulliPack = 16 / sizeof(T) >= 2 ? 16 / sizeof(T) : 2;

template <typename T, typename I, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
forward_bernoulli_kernel(const I* __restrict__ ids, int64_t n, const T* __restrict__ weight,
                         int64_t w_stride, int64_t V, T* __restrict__ out, int64_t d,
                         int64_t G, int64_t chunks_per_row, float mag,
                         const float* __restrict__ tok_mag, SeedArg sa, bool symmetric,
                         typename AddType<T>::type es, int64_t* __restrict__ error) {
  uint64_t seed, offset;
  sa.get(seed, offset);
  constexpr int E = kBernoulliPack<T>;
  using P = Pack<T, E>;
  __shared__ __align__(16) uint32_t smem[kWarps][32 * 4];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  uint32_t* sw = smem[warp];
  using A = typename AddType<T>::type;  // e + n in float32 (float64 for float64 weights)
  const float nan = __int_as_float(0x7fc00000);
  const int64_t total = n * chunks_per_row;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + warp; unit < total;
       unit += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = unit / chunks_per_row;
    const int64_t c = unit - r * chunks_per_row;
    const int64_t g0 = c * 32;
    const int64_t ng = G - g0 < 32 ? G - g0 : 32;
    if (lane < ng) {
      const Words4 w = philox4x32_10(
          offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(G) +
              static_cast<uint64_t>(g0 + lane),
          seed);
      // words of the chunk, in order: element local index L uses word L >> 5, bit L & 31
      *reinterpret_cast<uint4*>(sw + 4 * lane) = make_uint4(w.w[0], w.w[1], w.w[2], w.w[3]);
    }
    __syncwarp();
    const int64_t id = static_cast<int64_t>(ids[r]);
    const bool valid = id >= 0 && id < V;
    if (!valid && error != nullptr && c == 0 && lane == 0) record_bad_id(error, id, V);
    const float m = tok_mag != nullptr ? tok_mag[r] : mag;
    const T* e = weight + (valid ? id : 0) * w_stride;
    T* o = out + r * d;
    T* o2 = out + (n + r) * d;
    const int64_t jb = g0 * 128;
    const int64_t je = (g0 + ng) * 128 < d ? (g0 + ng) * 128 : d;
    if (VEC) {
      for (int64_t j0 = jb + static_cast<int64_t>(lane) * E; j0 < je; j0 += 32 * E) {
        const int local = static_cast<int>(j0 - jb);
        const uint32_t bits = sw[local >> 5] >> (local & 31);
        P ev;
        if (valid) ev = *reinterpret_cast<const P*>(e + j0);
        P a, b;
#pragma unroll
        for (int k = 0; k < E; ++k) {
          A x = valid ? static_cast<A>(ev.v[k]) : static_cast<A>(nan);
          if (SCALE) x = scale_embedding<T, A>(x, es);
          const A nz = static_cast<A>(((bits >> k) & 1u) ? -m : m);
          a.v[k] = static_cast<T>(add_rn(x, nz));
          b.v[k] = static_cast<T>(sub_rn(x, nz));
        }
        *reinterpret_cast<P*>(o + j0) = a;
        if (symmetric) *reinterpret_cast<P*>(o2 + j0) = b;
      }
    } else {
      for (int64_t j = jb + lane; j < je; j += 32) {
        const int local = static_cast<int>(j - jb);
        A x = valid ? static_cast<A>(e[j]) : static_cast<A>(nan);
        if (SCALE) x = scale_embedding<T, A>(x, es);
        const A nz = static_cast<A>(((sw[local >> 5] >> (local & 31)) & 1u) ? -m : m);
        o[j] = static_cast<T>(add_rn(x, nz));
        if (symmetric) o2[j] = static_cast<T>(sub_rn(x, nz));
      }
    }
    __syncwarp();  // the next unit overwrites sw
  }
}

// ---------------------------------------------------------------------------------------
// Forward launch: the grid, the block and the path, from the shapes and pointers alone
// ---------------------------------------------------------------------------------------
struct ForwardLaunch {
  dim3 grid, block;
  bool vec;            // 16-byte packs (else the scalar path)
  int64_t G;           // Philox counters per row
  int64_t chunks;      // bernoulli: 32-counter chunks per row
};

inline ForwardLaunch plan_forward(int64_t kind, int64_t n, int64_t d, int64_t w_stride,
                                  int64_t elem_bytes, const void* weight, const void* out,
                                  int sms) {
  const int64_t max_blocks = static_cast<int64_t>(sms) * 32;
  ForwardLaunch l{};
  if (kind == kBernoulli) {
    const int64_t E = 16 / elem_bytes >= 2 ? 16 / elem_bytes : 2;  // kBernoulliPack
    l.G = (d + 127) / 128;
    l.chunks = (l.G + 31) / 32;
    l.vec = d % E == 0 && w_stride % E == 0 && aligned(weight, elem_bytes * E) &&
            aligned(out, elem_bytes * E);
    l.grid = dim3(grid_blocks(std::min<int64_t>((n * l.chunks + kWarps - 1) / kWarps,
                                                max_blocks)));
    l.block = dim3(kThreads);
    return l;
  }
  const int64_t cpt = elem_bytes == 2 ? 2 : 1;  // 16-byte packs (32 for float64)
  const int64_t E = 4 * cpt;
  l.G = (d + 3) / 4;
  l.chunks = 0;
  const int64_t units = (l.G + cpt - 1) / cpt;
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, next_pow2(units)));
  const int ty = kThreads / tx;
  l.block = dim3(tx, ty);
  l.grid = dim3(grid_blocks(std::min<int64_t>((n + ty - 1) / ty, max_blocks)));
  l.vec = d % E == 0 && w_stride % E == 0 && aligned(weight, elem_bytes * E) &&
          aligned(out, elem_bytes * E);
  return l;
}

// The forward of n >= 1 tokens, d >= 1 columns (the op's checks done by the caller).
template <typename T, typename I, bool SCALE>
void launch_forward(const I* ids, int64_t n, const T* weight, int64_t w_stride, int64_t V,
                    T* out, int64_t d, int64_t kind, float mag, const float* tok_mag,
                    SeedArg seed, bool symmetric, double embed_scale, int64_t* error,
                    cudaStream_t stream, int sms) {
  // float32(embed_scale), float64 for float64 weights (the reference's multiply)
  const auto es = static_cast<typename AddType<T>::type>(embed_scale);
  const ForwardLaunch l =
      plan_forward(kind, n, d, w_stride, sizeof(T), weight, out, sms);
  if (kind == kBernoulli) {
    auto kernel = l.vec ? forward_bernoulli_kernel<T, I, true, SCALE>
                        : forward_bernoulli_kernel<T, I, false, SCALE>;
    FASTNOISE_LAUNCH(kernel, l.grid, l.block, stream, ids, n, weight, w_stride, V, out, d,
                     l.G, l.chunks, mag, tok_mag, seed, symmetric, es, error);
    return;
  }
  constexpr int CPT = sizeof(T) == 2 ? 2 : 1;
  auto kernel = kind == kUniform
                    ? (l.vec ? forward_ug_kernel<T, I, kUniform, CPT, true, SCALE>
                             : forward_ug_kernel<T, I, kUniform, CPT, false, SCALE>)
                    : (l.vec ? forward_ug_kernel<T, I, kGaussian, CPT, true, SCALE>
                             : forward_ug_kernel<T, I, kGaussian, CPT, false, SCALE>);
  FASTNOISE_LAUNCH(kernel, l.grid, l.block, stream, ids, n, weight, w_stride, V, out, d, l.G,
                   mag, tok_mag, seed, symmetric, es, error);
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
// The sorted path (deterministic=True, and every fp16/bf16 gradient): the caller sorts the
// ids stably with their token positions (perm); the sorted positions are cut into chunks of
// kChunk = 32 (a warp's chunk: its ids and positions in shared memory, one loaded per lane),
// and runs of equal ids are summed in float32 (float64 for float64 grads, C3):
//  * a run of at most kChunk tokens is summed by one warp, serially in token order (the
//    reference's index_add_ order: bit-identical to it and to the CPU kernel): by
//    backward_chunk_kernel when it lies in one chunk, else (it crosses one chunk boundary)
//    by backward_combine_kernel of the chunk where it ends;
//  * a longer run (a frequent token: EOS, BOS, padding) is cut at the chunk boundaries.
//    backward_chunk_kernel sums each chunk's piece serially; a piece that reaches the
//    chunk's end goes to partial[chunk]. backward_combine_kernel of the chunk where the run
//    ends adds the partials in chunk order, then that chunk's own last piece. A run of L
//    tokens is a dependent chain of <= 32 rows, then ceil(L / 32) partial rows: not L rows.
//    Fixed order everywhere (the same bits run to run), but not the reference's: within
//    float32 rounding of it.
// Both kernels: one warp per (chunk, 128-column tile); every warp of the first has 32 sorted
// positions of work (no warp per sorted position), and every grad row is read once.
// Each gradient row with a token is written once, by one warp (no atomics); the caller zeroes
// the gradient (rows no token points to, padding_idx).
// Extra memory of the sorted path, besides the (V, d) result: the sort (sorted ids and perm,
// int64: 16 N bytes; 8 N more for int32 ids cast to int64; at::sort's own O(N) workspace)
// and partial: ceil(N / 32) rows of d float32 (float64 for float64 grads), 4 d ceil(N / 32)
// bytes. Independent of V.
// The atomic path (deterministic=False with float32 / float64 grads): atomicAdd straight
// into the zeroed result, no sort, no extra memory; the order of the sums varies run to run.
constexpr int kChunk = 32;          // sorted positions per chunk: one per lane
constexpr int kTile = 128;          // gradient columns per warp: 4 per lane
constexpr unsigned int kAllLanes = 0xffffffffu;

// Column k (0..3) of this lane in the tile starting at jt: VEC, 4 consecutive columns (one
// 4-element pack; d % 4 == 0), else columns 32 apart. Each column is summed in the same
// order either way, so both give the same bits.
template <bool VEC>
__device__ __forceinline__ int64_t lane_column(int64_t jt, int lane, int k) {
  return VEC ? jt + 4 * lane + k : jt + lane + 32 * k;
}

// This lane's 4 values of the U token rows at positions pos[0 .. U) (their pair's rows added
// first, then times es): every load of the U rows (and pairs) is issued before any arithmetic
// on them. Columns past d read as 0 (never stored): predicated loads, no branch between rows.
template <typename T, bool VEC, bool SCALE, int U>
__device__ __forceinline__ void token_values(const T* __restrict__ g,
                                             const int64_t* __restrict__ pos, int64_t n,
                                             int64_t d, int64_t jt, int lane, bool symmetric,
                                             typename AddType<T>::type es,
                                             typename AddType<T>::type (&v)[U][4]) {
  using A = typename AddType<T>::type;
  A b[U][4];
  if (VEC) {
    using P = Pack<T, 4>;
    const int64_t j0 = lane_column<true>(jt, lane, 0);
    const bool in = j0 < d;  // all 4 columns or none (d % 4 == 0)
    P pa[U], pb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (in) pa[u] = *reinterpret_cast<const P*>(g + pos[u] * d + j0);
    }
    if (symmetric) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (in) pb[u] = *reinterpret_cast<const P*>(g + (pos[u] + n) * d + j0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[u][k] = in ? static_cast<A>(pa[u].v[k]) : A(0);
        b[u][k] = in && symmetric ? static_cast<A>(pb[u].v[k]) : A(0);
      }
    }
  } else {
    // one row pointer each, the 4 columns at fixed offsets 32 apart
    const int64_t j0 = lane_column<false>(jt, lane, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const T* r = g + pos[u] * d + j0;
#pragma unroll
      for (int k = 0; k < 4; ++k) v[u][k] = j0 + 32 * k < d ? static_cast<A>(r[32 * k]) : A(0);
    }
    if (symmetric) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const T* r = g + (pos[u] + n) * d + j0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          b[u][k] = j0 + 32 * k < d ? static_cast<A>(r[32 * k]) : A(0);
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      A x = v[u][k];
      if (symmetric) x = add_rn(x, b[u][k]);
      v[u][k] = SCALE ? mul_rn(x, es) : x;
    }
  }
}

// acc[k] += the token rows at positions pos[q0 .. q1] (inclusive; the warp's positions in
// shared memory, read as broadcasts: no shuffle, so no convergence the compiler must prove),
// in order, four rows' loads at a time.
template <typename T, bool VEC, bool SCALE>
__device__ __forceinline__ void add_token_rows(const T* __restrict__ g,
                                               const int64_t* __restrict__ pos, int q0, int q1,
                                               int64_t n, int64_t d, int64_t jt, int lane,
                                               bool symmetric, typename AddType<T>::type es,
                                               typename AddType<T>::type (&acc)[4]) {
  using A = typename AddType<T>::type;
  int q = q0;
  for (; q + 3 <= q1; q += 4) {
    A v[4][4];
    token_values<T, VEC, SCALE, 4>(g, pos + q, n, d, jt, lane, symmetric, es, v);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] = add_rn(acc[k], v[u][k]);
    }
  }
  for (; q <= q1; ++q) {
    A v[1][4];
    token_values<T, VEC, SCALE, 1>(g, pos + q, n, d, jt, lane, symmetric, es, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[k] = add_rn(acc[k], v[0][k]);
  }
}

// row[this lane's columns] = acc, rounded to the row's type.
template <bool VEC, typename R, typename A>
__device__ __forceinline__ void store_lane(R* __restrict__ row, int64_t d, int64_t jt, int lane,
                                           const A (&acc)[4]) {
  if (VEC) {
    const int64_t j0 = lane_column<true>(jt, lane, 0);
    if (j0 < d) {
      Pack<R, 4> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = static_cast<R>(acc[k]);
      *reinterpret_cast<Pack<R, 4>*>(row + j0) = o;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = lane_column<false>(jt, lane, k);
      if (j < d) row[j] = static_cast<R>(acc[k]);
    }
  }
}

// One warp per (chunk c, column tile blockIdx.y): the runs of the chunk (see above).
template <typename T, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_chunk_kernel(const T* __restrict__ g, const int64_t* __restrict__ sorted,
                      const int64_t* __restrict__ perm, int64_t n, int64_t d, int64_t V,
                      int64_t padding, bool symmetric, typename AddType<T>::type es,
                      T* __restrict__ grad, typename AddType<T>::type* __restrict__ partial) {
  using A = typename AddType<T>::type;  // C3: float32, float64 for float64 grads
  __shared__ int64_t s_id[kWarps][kChunk], s_pos[kWarps][kChunk];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t p0 = c * kChunk;
  if (p0 >= n) return;  // the whole warp
  const int len = static_cast<int>(n - p0 < kChunk ? n - p0 : kChunk);
  const int64_t jt = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t* ids = s_id[warp];
  const int64_t* pos = s_pos[warp];
  s_id[warp][lane] = lane < len ? sorted[p0 + lane] : 0;
  s_pos[warp][lane] = lane < len ? perm[p0 + lane] : 0;
  __syncwarp();
  // bit q: position q is the last of its run in this chunk
  const unsigned int ends = __ballot_sync(
      kAllLanes, lane < len && (lane == len - 1 || ids[lane + 1] != ids[lane]));
  const bool tail_goes_on = p0 + kChunk < n && sorted[p0 + kChunk] == ids[len - 1];
  int qs = 0;
  if (p0 > 0 && sorted[p0 - 1] == ids[0]) {
    // the first run began in an earlier chunk: unless it also goes on (a middle piece of a
    // long run, to partial), backward_combine_kernel of this chunk finishes it
    const int qe = __ffs(static_cast<int>(ends)) - 1;
    if (!(qe == len - 1 && tail_goes_on)) qs = qe + 1;
  }
  while (qs < len) {  // warp-uniform: one run [qs, qe] of the chunk a step
    const int qe = qs + __ffs(static_cast<int>(ends >> qs)) - 1;
    const int64_t id = ids[qs];
    const bool cut_tail = qe == len - 1 && tail_goes_on;
    // a run that goes on past the chunk: long (> kChunk tokens from s) -> this piece to
    // partial; short -> the next chunk's combine sums it whole, in token order. (A middle
    // piece, s = p0, passes the test: the run goes on past p0 + kChunk.)
    const int64_t s = p0 + qs;
    const bool mine = !cut_tail || (s + kChunk < n && sorted[s + kChunk] == id);
    if (mine && id >= 0 && id < V && id != padding) {
      A acc[4] = {A(0), A(0), A(0), A(0)};
      add_token_rows<T, VEC, SCALE>(g, pos, qs, qe, n, d, jt, lane, symmetric, es, acc);
      if (cut_tail) {
        store_lane<VEC>(partial + c * d, d, jt, lane, acc);
      } else {
        store_lane<VEC>(grad + id * d, d, jt, lane, acc);
      }
    }
    qs = qe + 1;
  }
}

// One warp per (chunk c, column tile): finishes the run that began before chunk c and ends
// in it: a short one (<= kChunk tokens) summed whole in token order, a long one as the
// partials of its earlier chunks (in chunk order) plus its piece in chunk c.
template <typename T, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_combine_kernel(const T* __restrict__ g, const int64_t* __restrict__ sorted,
                        const int64_t* __restrict__ perm, int64_t n, int64_t d, int64_t V,
                        int64_t padding, bool symmetric, typename AddType<T>::type es,
                        T* __restrict__ grad,
                        const typename AddType<T>::type* __restrict__ partial) {
  using A = typename AddType<T>::type;
  __shared__ int64_t s_pos[kWarps][kChunk];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t p0 = c * kChunk;
  if (c == 0 || p0 >= n) return;  // the whole warp (as every return below)
  const int64_t id = sorted[p0];
  if (sorted[p0 - 1] != id || id < 0 || id >= V || id == padding) return;
  const int len = static_cast<int>(n - p0 < kChunk ? n - p0 : kChunk);
  const bool in_run = lane < len && sorted[p0 + lane] == id;
  const int count = __popc(__ballot_sync(kAllLanes, in_run));  // the run's tokens in chunk c
  if (count == kChunk && p0 + kChunk < n && sorted[p0 + kChunk] == id) return;  // goes on
  const int64_t e = p0 + count - 1;  // the run's last position
  // its first position: the lower bound of id in sorted[0, p0)
  int64_t lo = 0, hi = p0 - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < id) lo = mid + 1; else hi = mid;
  }
  const int64_t s = lo;
  const int64_t jt = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t* pos = s_pos[warp];
  A acc[4] = {A(0), A(0), A(0), A(0)};
  if (e - s + 1 <= kChunk) {
    // short: all its rows (from chunk c - 1 and c), in token order
    s_pos[warp][lane] = s + lane <= e ? perm[s + lane] : 0;
    __syncwarp();
    add_token_rows<T, VEC, SCALE>(g, pos, 0, static_cast<int>(e - s), n, d, jt, lane,
                                  symmetric, es, acc);
  } else {
    s_pos[warp][lane] = lane < count ? perm[p0 + lane] : 0;
    __syncwarp();
    int64_t k = s / kChunk;  // the chunk of its first piece
    for (; k + 3 < c; k += 4) {  // four partial rows' loads before their adds
      A v[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t j = lane_column<VEC>(jt, lane, q);
          v[u][q] = j < d ? partial[(k + u) * d + j] : A(0);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] = add_rn(acc[q], v[u][q]);
      }
    }
    for (; k < c; ++k) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t j = lane_column<VEC>(jt, lane, q);
        acc[q] = add_rn(acc[q], j < d ? partial[k * d + j] : A(0));
      }
    }
    A piece[4] = {A(0), A(0), A(0), A(0)};  // its last piece, in chunk c
    add_token_rows<T, VEC, SCALE>(g, pos, 0, count - 1, n, d, jt, lane, symmetric, es, piece);
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[q] = add_rn(acc[q], piece[q]);
  }
  store_lane<VEC>(grad + id * d, d, jt, lane, acc);
}

template <typename T, typename I, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_atomic_kernel(const T* __restrict__ g, const I* __restrict__ ids, int64_t n,
                       int64_t d, int64_t V, int64_t padding, bool symmetric,
                       typename AddType<T>::type es, T* __restrict__ grad) {
  using A = typename AddType<T>::type;
  static_assert(sizeof(A) == sizeof(T), "atomics go straight into a float32/float64 result");
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    if (id < 0 || id >= V || id == padding) continue;
    const T* row = g + r * d;
    const T* row2 = g + (r + n) * d;
    T* dst = grad + id * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      A v = static_cast<A>(row[j]);
      if (symmetric) v = add_rn(v, static_cast<A>(row2[j]));
      if (SCALE) v = mul_rn(v, es);
      atomicAdd(dst + j, v);
    }
  }
}

// Which backward runs, and the buffer the sorted one needs (the .cu op allocates what this
// says; tests/cuda_emu checks it). float16/bfloat16 grads always take the sorted path: the
// atomic one would need a float32 (V, d) temporary (C3) and a cast, ~3x the gradient.
struct BackwardPlan {
  bool sorted;           // sort + chunk/combine kernels; else atomics into the result
  int64_t partial_rows;  // sorted: rows of d AddType<T> values in `partial`
};

inline BackwardPlan plan_backward(int64_t elem_bytes, bool deterministic, int64_t n) {
  BackwardPlan p{};
  p.sorted = deterministic || elem_bytes == 2;
  p.partial_rows = p.sorted ? std::max<int64_t>(1, (n + kChunk - 1) / kChunk) : 0;
  return p;
}

// The sorted backward of n >= 1 tokens (sorted: the ids sorted stably, int64; perm: their
// token positions) into grad (V, d), zeroed by the caller; partial: plan_backward's rows of d
// AddType<T> (need not be initialised).
template <typename T>
void launch_backward_sorted(const T* g, const int64_t* sorted, const int64_t* perm, int64_t n,
                            int64_t d, int64_t V, int64_t padding, bool symmetric,
                            double embed_scale, T* grad, typename AddType<T>::type* partial,
                            cudaStream_t stream) {
  using A = typename AddType<T>::type;
  const int64_t tiles = (d + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "fastnoise: embedding_dim ", d, " is too wide for the "
              "sorted CUDA backward (at most ", 65535 * kTile, ")");
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const dim3 grid(grid_blocks((chunks + kWarps - 1) / kWarps), static_cast<unsigned int>(tiles));
  const auto es = static_cast<A>(embed_scale);
  const bool vec = d % 4 == 0 && aligned(g, 4 * sizeof(T)) && aligned(grad, 4 * sizeof(T)) &&
                   aligned(partial, 4 * sizeof(A));
  const bool scale = embed_scale != 1.0;
  auto chunk = vec ? (scale ? backward_chunk_kernel<T, true, true>
                            : backward_chunk_kernel<T, true, false>)
                   : (scale ? backward_chunk_kernel<T, false, true>
                            : backward_chunk_kernel<T, false, false>);
  FASTNOISE_LAUNCH(chunk, grid, dim3(kThreads), stream, g, sorted, perm, n, d, V, padding,
                   symmetric, es, grad, partial);
  if (chunks < 2) return;  // no run crosses a chunk boundary
  const A* partial_in = partial;
  auto combine = vec ? (scale ? backward_combine_kernel<T, true, true>
                              : backward_combine_kernel<T, true, false>)
                     : (scale ? backward_combine_kernel<T, false, true>
                              : backward_combine_kernel<T, false, false>);
  FASTNOISE_LAUNCH(combine, grid, dim3(kThreads), stream, g, sorted, perm, n, d, V, padding,
                   symmetric, es, grad, partial_in);
}

// The atomic backward of n >= 1 tokens straight into grad (V, d), float32 or float64,
// zeroed by the caller.
template <typename T, typename I>
void launch_backward_atomic(const T* g, const I* ids, int64_t n, int64_t d, int64_t V,
                            int64_t padding, bool symmetric, double embed_scale, T* grad,
                            cudaStream_t stream, int sms) {
  const int tx = static_cast<int>(
      std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(d))));
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks =
      std::min<int64_t>((n + block.y - 1) / block.y, static_cast<int64_t>(sms) * 32);
  const auto es = static_cast<typename AddType<T>::type>(embed_scale);
  auto kernel = embed_scale != 1.0 ? backward_atomic_kernel<T, I, true>
                                   : backward_atomic_kernel<T, I, false>;
  FASTNOISE_LAUNCH(kernel, dim3(grid_blocks(blocks)), block, stream, g, ids, n, d, V, padding,
                   symmetric, es, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise
