// CUDA kernels of the fused noisy embedding (forward) and its weight gradient (backward).
//
// Forward, uniform / gaussian: a 2-D block (TX, TY) = 256 threads; TY token rows per block
// (grid-stride over rows), TX threads across a row. A thread owns CPT consecutive Philox
// counters (4 * CPT elements: 16 bytes of fp32 / fp16 / bf16), one Philox call per 4
// elements, 16-byte vector loads/stores when the row width and pointers allow it.
// Forward, bernoulli: one warp per (row, chunk of 32 counters = 4096 elements); lane i draws
// counter i of the chunk into shared memory (512 bytes per warp), then the warp streams the
// chunk with 16-byte packs, each lane reading its word (broadcast) and shifting bits.
// Ids out of range are never read: their output rows are NaN (the frontend validates ids,
// but cannot inside a captured CUDA graph).
// seed_ptr (the op's seed_tensor, an int64 on the device) != nullptr: the kernels read the
// 64-bit seed from it at run time and use counter offset 0 (CUDA-graph safe: a replay sees
// the value drawn into it by the captured torch.randint; no host sync).
// SCALE (embed_scale != 1, Gemma): e = T(e * embed_scale) before the noise; the unscaled
// instantiations are the plain kernels.
//
// Backward: deterministic -> stable sort of the ids (at::sort), one warp per (run of equal
// ids, 128-column tile) summing its tokens' rows in token order in fp32 (the CPU kernel's
// order, so the result is bit-identical to it), written once in the output dtype.
// Non-deterministic -> fp32 atomicAdd into an fp32 (V, d) buffer (no sort).
// SCALE: each fp32 token row (pair halves summed first) times float32(embed_scale) before it
// is accumulated (the reference's order).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common.h"
#include "cuda_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------
// Forward: uniform / gaussian
// ---------------------------------------------------------------------------------------
template <typename T, typename I, int KIND, int CPT, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
forward_ug_kernel(const I* __restrict__ ids, int64_t n, const T* __restrict__ weight,
                  int64_t w_stride, int64_t V, T* __restrict__ out, int64_t d, int64_t G,
                  float mag, const float* __restrict__ tok_mag, uint64_t seed,
                  uint64_t offset, const int64_t* __restrict__ seed_ptr, bool symmetric,
                  typename AddType<T>::type es) {
  constexpr int E = 4 * CPT;  // elements per thread-unit
  if (seed_ptr != nullptr) {
    seed = static_cast<uint64_t>(*seed_ptr);
    offset = 0;
  }
  using P = Pack<T, E>;
  const int64_t units = (G + CPT - 1) / CPT;
  using A = typename AddType<T>::type;  // e + n in float32 (float64 for float64 weights)
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    const bool valid = id >= 0 && id < V;
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
template <typename T, typename I, bool VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
forward_bernoulli_kernel(const I* __restrict__ ids, int64_t n, const T* __restrict__ weight,
                         int64_t w_stride, int64_t V, T* __restrict__ out, int64_t d,
                         int64_t G, int64_t chunks_per_row, float mag,
                         const float* __restrict__ tok_mag, uint64_t seed, uint64_t offset,
                         const int64_t* __restrict__ seed_ptr, bool symmetric,
                         typename AddType<T>::type es) {
  if (seed_ptr != nullptr) {
    seed = static_cast<uint64_t>(*seed_ptr);
    offset = 0;
  }
  constexpr int E = 16 / sizeof(T) >= 2 ? 16 / sizeof(T) : 2;  // divides 32
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

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <typename T, typename I, bool SCALE>
void launch_forward(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& out,
                    int64_t kind, float mag, const float* tok_mag, uint64_t seed,
                    uint64_t offset, const int64_t* seed_ptr, bool symmetric,
                    double embed_scale, cudaStream_t stream, int sms) {
  // float32(embed_scale), float64 for float64 weights (the reference's multiply)
  const auto es = static_cast<typename AddType<T>::type>(embed_scale);
  const int64_t n = ids.numel();
  const int64_t V = weight.size(0);
  const int64_t d = weight.size(1);
  const int64_t w_stride = weight.size(0) > 1 ? weight.stride(0) : d;
  const I* ip = ids.const_data_ptr<I>();
  const T* wp = weight.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t max_blocks = static_cast<int64_t>(sms) * 32;
  if (kind == kBernoulli) {
    constexpr int E = 16 / sizeof(T) >= 2 ? 16 / sizeof(T) : 2;
    const int64_t G = (d + 127) / 128;
    const int64_t chunks = (G + 31) / 32;
    const bool vec = d % E == 0 && w_stride % E == 0 && aligned(wp, sizeof(T) * E) &&
                     aligned(op, sizeof(T) * E);
    const int64_t blocks = std::min<int64_t>((n * chunks + kWarps - 1) / kWarps, max_blocks);
    if (vec) {
      forward_bernoulli_kernel<T, I, true, SCALE><<<blocks, kThreads, 0, stream>>>(
          ip, n, wp, w_stride, V, op, d, G, chunks, mag, tok_mag, seed, offset, seed_ptr,
          symmetric, es);
    } else {
      forward_bernoulli_kernel<T, I, false, SCALE><<<blocks, kThreads, 0, stream>>>(
          ip, n, wp, w_stride, V, op, d, G, chunks, mag, tok_mag, seed, offset, seed_ptr,
          symmetric, es);
    }
    FASTNOISE_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int CPT = sizeof(T) == 2 ? 2 : 1;  // 16-byte packs (32 for float64)
  constexpr int E = 4 * CPT;
  const int64_t G = (d + 3) / 4;
  const int64_t units = (G + CPT - 1) / CPT;
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, next_pow2(units)));
  const int ty = kThreads / tx;
  const dim3 block(tx, ty);
  const int64_t blocks = std::min<int64_t>((n + ty - 1) / ty, max_blocks);
  const bool vec = d % E == 0 && w_stride % E == 0 && aligned(wp, sizeof(T) * E) &&
                   aligned(op, sizeof(T) * E);
#define FASTNOISE_LAUNCH_UG(KIND, VEC_)                                                   \
  forward_ug_kernel<T, I, KIND, CPT, VEC_, SCALE><<<blocks, block, 0, stream>>>(          \
      ip, n, wp, w_stride, V, op, d, G, mag, tok_mag, seed, offset, seed_ptr, symmetric, es)
  if (kind == kUniform) {
    if (vec) FASTNOISE_LAUNCH_UG(kUniform, true); else FASTNOISE_LAUNCH_UG(kUniform, false);
  } else {
    if (vec) FASTNOISE_LAUNCH_UG(kGaussian, true); else FASTNOISE_LAUNCH_UG(kGaussian, false);
  }
#undef FASTNOISE_LAUNCH_UG
  FASTNOISE_KERNEL_LAUNCH_CHECK();
}

void embedding_forward_cuda(const at::Tensor& ids, const at::Tensor& weight,
                            const at::Tensor& out, int64_t noise, double mag,
                            const std::optional<at::Tensor>& tok_mag, int64_t seed,
                            int64_t offset, bool symmetric, double embed_scale,
                            const std::optional<at::Tensor>& seed_tensor) {
  check_forward_args(ids, weight, out, noise, tok_mag, symmetric);
  check_seed_tensor(seed_tensor, weight);
  TORCH_CHECK(weight.is_cuda(), "fastnoise: CUDA kernel got a weight on ", weight.device());
  const int64_t n = ids.numel();
  const int64_t d = weight.size(1);
  if (n == 0 || d == 0) return;
  c10::DeviceGuard guard(weight.device());
  cudaStream_t stream = current_stream(weight.device());
  const int sms = sm_count(weight.device().index());
  const float* tm = tok_mag.has_value() ? tok_mag->const_data_ptr<float>() : nullptr;
  // read in-kernel (no host sync): the value at launch time of each graph replay
  const int64_t* sp =
      seed_tensor.has_value() ? seed_tensor->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastnoise_embedding_forward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "fastnoise_embedding_forward_cuda",
        [&] {
          if (embed_scale != 1.0) {
            launch_forward<scalar_t, index_t, true>(ids, weight, out, noise,
                                                    static_cast<float>(mag), tm, as_u64(seed),
                                                    as_u64(offset), sp, symmetric,
                                                    embed_scale, stream, sms);
          } else {
            launch_forward<scalar_t, index_t, false>(ids, weight, out, noise,
                                                     static_cast<float>(mag), tm, as_u64(seed),
                                                     as_u64(offset), sp, symmetric, 1.0,
                                                     stream, sms);
          }
        });
  });
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
// One warp per (position p of the sorted ids, 128-column tile blockIdx.y); the warp that
// starts a run sums the run's rows (token order) on its tile, 4 fp32 accumulators per lane.
template <typename T, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_sorted_kernel(const T* __restrict__ g, const int64_t* __restrict__ sorted,
                       const int64_t* __restrict__ perm, int64_t n, int64_t d, int64_t V,
                       int64_t padding, bool symmetric, float es, T* __restrict__ grad) {
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
  {
    const int64_t jt = static_cast<int64_t>(blockIdx.y) * 128;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t q = p; q < q_end; ++q) {
      const int64_t pos = perm[q];
      const T* row = g + pos * d;
      const T* row2 = g + (pos + n) * d;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t j = jt + lane + 32 * k;
        if (j < d) {
          float v = static_cast<float>(row[j]);
          if (symmetric) v = add_rn(v, static_cast<float>(row2[j]));
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
}

template <typename T, typename I, bool SCALE>
__global__ void __launch_bounds__(kThreads)
backward_atomic_kernel(const T* __restrict__ g, const I* __restrict__ ids, int64_t n,
                       int64_t d, int64_t V, int64_t padding, bool symmetric, float es,
                       float* __restrict__ grad) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    if (id < 0 || id >= V || id == padding) continue;
    const T* row = g + r * d;
    const T* row2 = g + (r + n) * d;
    float* dst = grad + id * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float v = static_cast<float>(row[j]);
      if (symmetric) v = add_rn(v, static_cast<float>(row2[j]));
      if (SCALE) v = mul_rn(v, es);
      atomicAdd(dst + j, v);
    }
  }
}

at::Tensor embedding_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids,
                                   int64_t num_weights, std::optional<int64_t> padding_idx,
                                   bool symmetric, bool deterministic, double embed_scale) {
  check_backward_args(grad_out, ids, num_weights, symmetric);
  const bool scale = embed_scale != 1.0;
  const float es = static_cast<float>(embed_scale);
  TORCH_CHECK(grad_out.is_cuda(), "fastnoise: CUDA kernel got grad_out on ",
              grad_out.device());
  c10::DeviceGuard guard(grad_out.device());
  const int64_t n = ids.numel();
  const int64_t d = grad_out.size(1);
  const int64_t padding = normalize_padding_idx(padding_idx, num_weights);
  if (n == 0 || d == 0 || num_weights == 0) {
    return at::zeros({num_weights, d}, grad_out.options());
  }
  const at::Tensor g = grad_out.contiguous();
  cudaStream_t stream = current_stream(grad_out.device());
  const int sms = sm_count(grad_out.device().index());
  if (deterministic) {
    at::Tensor grad = at::zeros({num_weights, d}, grad_out.options());
    auto sorted_perm = at::sort(ids.to(at::kLong), /*stable=*/true, /*dim=*/0,
                                /*descending=*/false);
    const at::Tensor sorted = std::get<0>(sorted_perm).contiguous();
    const at::Tensor perm = std::get<1>(sorted_perm).contiguous();
    const int64_t blocks = (n + kWarps - 1) / kWarps;
    const int64_t tiles = (d + 127) / 128;
    TORCH_CHECK(tiles <= 65535, "fastnoise: embedding_dim ", d, " is too wide for the "
                "deterministic CUDA backward (at most ", 65535 * 128, ")");
    const unsigned int column_tiles = static_cast<unsigned int>(tiles);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, g.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
          auto kernel = scale ? backward_sorted_kernel<scalar_t, true>
                              : backward_sorted_kernel<scalar_t, false>;
          kernel<<<dim3(grid_blocks(blocks), column_tiles), kThreads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(),
              perm.const_data_ptr<int64_t>(), n, d, num_weights, padding, symmetric, es,
              grad.data_ptr<scalar_t>());
          FASTNOISE_KERNEL_LAUNCH_CHECK();
        });
    return grad;
  }
  at::Tensor grad32 = at::zeros({num_weights, d}, grad_out.options().dtype(at::kFloat));
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(d))));
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks =
      std::min<int64_t>((n + block.y - 1) / block.y, static_cast<int64_t>(sms) * 32);
  const at::Tensor idc = ids.contiguous();
  AT_DISPATCH_INDEX_TYPES(idc.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, g.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
          auto kernel = scale ? backward_atomic_kernel<scalar_t, index_t, true>
                              : backward_atomic_kernel<scalar_t, index_t, false>;
          kernel<<<blocks, block, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), idc.const_data_ptr<index_t>(), n, d,
              num_weights, padding, symmetric, es, grad32.data_ptr<float>());
          FASTNOISE_KERNEL_LAUNCH_CHECK();
        });
  });
  return grad_out.scalar_type() == at::kFloat ? grad32 : grad32.to(grad_out.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("embedding_forward", &fastnoise::cuda::embedding_forward_cuda);
  m.impl("embedding_backward", &fastnoise::cuda::embedding_backward_cuda);
}
