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
// Backward: deterministic -> the ids sorted stably (by the caller), one warp per (run of equal
// ids, 128-column tile) summing its tokens' rows in token order (the CPU kernel's order, so
// the result is bit-identical to it), written once in the output dtype. Non-deterministic ->
// atomicAdd into a (V, d) buffer (no sort). Both accumulate in AddType<T> (contract C3:
// float32, float64 for float64 grads). SCALE: each token row (pair halves summed first) times
// embed_scale before it is accumulated (the reference's order).
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
// One warp per (position p of the sorted ids, 128-column tile blockIdx.y); the warp that
// starts a run sums the run's rows (token order) on its tile, 4 accumulators per lane.
template <typename T, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_sorted_kernel(const T* __restrict__ g, const int64_t* __restrict__ sorted,
                       const int64_t* __restrict__ perm, int64_t n, int64_t d, int64_t V,
                       int64_t padding, bool symmetric, typename AddType<T>::type es,
                       T* __restrict__ grad) {
  using A = typename AddType<T>::type;  // C3: float32, float64 for float64 grads
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (p >= n) return;
  const int64_t id = sorted[p];
  if (p > 0 && sorted[p - 1] == id) return;
  if (id < 0 || id >= V || id == padding) return;
  int64_t q_end = p + 1;
  while (q_end < n && sorted[q_end] == id) ++q_end;
  // one 128-column tile per blockIdx.y: a frequent id's rows are summed by d / 128 warps at
  // once, each column still in the same order (deterministic, the CPU kernel's sums)
  const int64_t jt = static_cast<int64_t>(blockIdx.y) * 128;
  A acc[4] = {A(0), A(0), A(0), A(0)};
  for (int64_t q = p; q < q_end; ++q) {
    const int64_t pos = perm[q];
    const T* row = g + pos * d;
    const T* row2 = g + (pos + n) * d;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = jt + lane + 32 * k;
      if (j < d) {
        A v = static_cast<A>(row[j]);
        if (symmetric) v = add_rn(v, static_cast<A>(row2[j]));
        if (SCALE) v = mul_rn(v, es);
        acc[k] = add_rn(acc[k], v);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t j = jt + lane + 32 * k;
    if (j < d) grad[id * d + j] = static_cast<T>(acc[k]);
  }
}

template <typename T, typename I, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_atomic_kernel(const T* __restrict__ g, const I* __restrict__ ids, int64_t n,
                       int64_t d, int64_t V, int64_t padding, bool symmetric,
                       typename AddType<T>::type es,
                       typename AddType<T>::type* __restrict__ grad) {
  using A = typename AddType<T>::type;  // C3: float32, float64 for float64 grads
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    if (id < 0 || id >= V || id == padding) continue;
    const T* row = g + r * d;
    const T* row2 = g + (r + n) * d;
    A* dst = grad + id * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      A v = static_cast<A>(row[j]);
      if (symmetric) v = add_rn(v, static_cast<A>(row2[j]));
      if (SCALE) v = mul_rn(v, es);
      atomicAdd(dst + j, v);
    }
  }
}

// Deterministic backward of n >= 1 tokens (sorted: the ids sorted stably, perm: their token
// positions) into grad (V, d), zeroed by the caller.
template <typename T>
void launch_backward_sorted(const T* g, const int64_t* sorted, const int64_t* perm, int64_t n,
                            int64_t d, int64_t V, int64_t padding, bool symmetric,
                            double embed_scale, T* grad, cudaStream_t stream) {
  const int64_t tiles = (d + 127) / 128;
  TORCH_CHECK(tiles <= 65535, "fastnoise: embedding_dim ", d, " is too wide for the "
              "deterministic CUDA backward (at most ", 65535 * 128, ")");
  const dim3 grid(grid_blocks((n + kWarps - 1) / kWarps), static_cast<unsigned int>(tiles));
  const auto es = static_cast<typename AddType<T>::type>(embed_scale);
  auto kernel = embed_scale != 1.0 ? backward_sorted_kernel<T, true>
                                   : backward_sorted_kernel<T, false>;
  FASTNOISE_LAUNCH(kernel, grid, dim3(kThreads), stream, g, sorted, perm, n, d, V, padding,
                   symmetric, es, grad);
}

// Atomic backward of n >= 1 tokens into acc (V, d) in AddType<T>, zeroed by the caller.
template <typename T, typename I>
void launch_backward_atomic(const T* g, const I* ids, int64_t n, int64_t d, int64_t V,
                            int64_t padding, bool symmetric, double embed_scale,
                            typename AddType<T>::type* acc, cudaStream_t stream, int sms) {
  const int tx = static_cast<int>(
      std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(d))));
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks =
      std::min<int64_t>((n + block.y - 1) / block.y, static_cast<int64_t>(sms) * 32);
  const auto es = static_cast<typename AddType<T>::type>(embed_scale);
  auto kernel = embed_scale != 1.0 ? backward_atomic_kernel<T, I, true>
                                   : backward_atomic_kernel<T, I, false>;
  FASTNOISE_LAUNCH(kernel, dim3(grid_blocks(blocks)), block, stream, g, ids, n, d, V, padding,
                   symmetric, es, acc);
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise
