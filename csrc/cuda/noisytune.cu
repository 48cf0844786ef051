// CUDA NoisyTune: W += (u - 0.5) * float32(lam) * std(W) for a list of tensors, in place.
//
// multi_tensor_apply style, two launches for the whole list (any mix of fp32 / fp16 / bf16 /
// fp64 tensors):
//  1. statistics: the tensors share a budget of kStatBlockBudget blocks in proportion to their
//     size (at least 1, at most one group a thread), so every block streams about the same
//     number of elements and the largest tensor leaves no long tail. Each thread sums
//     x - x[0] and its square over 4-element groups in fp64 (shifted by the tensor's first
//     element: no cancellation for a large mean, no division per element), blocks merge
//     (n, mean, M2) with Chan's formula (warp shuffles), write one fp64 partial, and the last
//     block of a tensor to finish (threadfence + atomic ticket) merges the partials, all its
//     threads in a fixed order (deterministic), and writes s_k = float32(lam) * std_k (NaN =
//     skip the tensor).
//  2. perturbation: one Philox call per 4 elements; a thread takes 16-byte packs (4 fp32 or
//     8 fp16/bf16 elements) when aligned.
// Blocks find their tensor by binary search in a small per-tensor table; extra device memory
// is the table, one ticket and scale per tensor and at most kStatBlockBudget + #tensors
// partials of 24 bytes (< 0.5 MiB plus 24 bytes a tensor).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kNtThreads = 256;
constexpr int64_t kStatBlockBudget = 16384;  // ~124 blocks an SM on an H100
constexpr int64_t kMaxPerturbBlocks = 2048;

// Per-tensor table row (int64 each).
enum Meta : int {
  kPtr = 0, kNumel, kStart, kDtype, kStatBegin, kStatBlocks, kPertBegin, kPertBlocks, kMetaCols
};
enum DtypeCode : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// The tensor whose block range [begin, begin + nblocks) holds `b` (every tensor has >= 1).
__device__ __forceinline__ int find_tensor(const int64_t* meta, int T, int64_t b, int col) {
  int lo = 0, hi = T - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta[mid * kMetaCols + col] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Count, mean and sum of squared deviations (M2) of values shifted by the tensor's first
// element; the std does not depend on the shift.
struct Moments {
  double n, mean, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  Moments r;
  r.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  const double fb = b.n / r.n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
  return r;
}

// Elements a thread takes at once: one 16-byte vector of fp32 / fp16 / bf16 (4 or 8
// elements: 1 or 2 Philox counters), two of fp64; always a whole number of counters.
constexpr int group_for_size(size_t element_bytes) { return element_bytes == 2 ? 8 : 4; }

template <typename T>
constexpr int kGroup = group_for_size(sizeof(T));

int64_t group_size(at::ScalarType t) { return group_for_size(c10::elementSize(t)); }

// This thread's moments of tensor x (block b of nb): plain fp64 sums of y = x - shift and y^2
// (x and shift are floats, so y is exact in fp64), turned into (n, mean, M2) once at the end.
template <typename T>
__device__ __forceinline__ Moments stats_tensor(const T* x, int64_t numel, int64_t b,
                                                int64_t nb) {
  constexpr int G = kGroup<T>;
  const double shift = static_cast<float>(x[0]);
  const int64_t groups = (numel + G - 1) / G;
  const bool vec = aligned(x, sizeof(T) * G);
  double n = 0.0, s = 0.0, ss = 0.0;
  for (int64_t q = b * kNtThreads + threadIdx.x; q < groups; q += nb * kNtThreads) {
    const int64_t i0 = q * G;
    if (vec && i0 + G <= numel) {
      const Pack<T, G> p = *reinterpret_cast<const Pack<T, G>*>(x + i0);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const double y = static_cast<double>(static_cast<float>(p.v[k])) - shift;
        s += y;
        ss += y * y;
      }
      n += G;
    } else {
      for (int64_t i = i0; i < numel && i < i0 + G; ++i) {
        const double y = static_cast<double>(static_cast<float>(x[i])) - shift;
        s += y;
        ss += y * y;
        n += 1.0;
      }
    }
  }
  if (n == 0.0) return Moments{0.0, 0.0, 0.0};
  const double mean = s / n;
  return Moments{n, mean, fmax(ss - s * mean, 0.0)};
}

// The block's moments merged in a fixed tree (warp shuffles, then the warps in order):
// deterministic. Every thread of the block must call it; the result is thread 0's.
__device__ __forceinline__ Moments block_merge(Moments w, Moments* warp_res) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    Moments o{__shfl_down_sync(0xffffffffu, w.n, s), __shfl_down_sync(0xffffffffu, w.mean, s),
              __shfl_down_sync(0xffffffffu, w.m2, s)};
    w = merge(w, o);
  }
  __syncthreads();  // warp_res may still be read from a previous call
  if ((threadIdx.x & 31) == 0) warp_res[threadIdx.x >> 5] = w;
  __syncthreads();
  Moments acc = warp_res[0];
  if (threadIdx.x == 0) {
    for (int i = 1; i < kNtThreads / 32; ++i) acc = merge(acc, warp_res[i]);
  }
  return acc;
}

__global__ void __launch_bounds__(kNtThreads)
noisytune_stats_kernel(const int64_t* __restrict__ meta, int T, double* __restrict__ partials,
                       unsigned int* __restrict__ tickets, float* __restrict__ scale,
                       float lam) {
  const int64_t blk = blockIdx.x;
  const int k = find_tensor(meta, T, blk, kStatBegin);
  const int64_t* row = meta + k * kMetaCols;
  const int64_t b = blk - row[kStatBegin];
  const int64_t nb = row[kStatBlocks];
  const int64_t numel = row[kNumel];
  void* ptr = reinterpret_cast<void*>(row[kPtr]);
  Moments w;
  switch (row[kDtype]) {
    case kF32: w = stats_tensor(static_cast<const float*>(ptr), numel, b, nb); break;
    case kF16: w = stats_tensor(static_cast<const at::Half*>(ptr), numel, b, nb); break;
    case kBF16: w = stats_tensor(static_cast<const at::BFloat16*>(ptr), numel, b, nb); break;
    default: w = stats_tensor(static_cast<const double*>(ptr), numel, b, nb); break;
  }
  __shared__ Moments warp_res[kNtThreads / 32];
  __shared__ bool is_last;
  const Moments blk_moments = block_merge(w, warp_res);
  if (threadIdx.x == 0) {
    double* part = partials + 3 * blk;
    part[0] = blk_moments.n;
    part[1] = blk_moments.mean;
    part[2] = blk_moments.m2;
    __threadfence();
    const unsigned int ticket = atomicAdd(tickets + k, 1u);
    is_last = ticket == static_cast<unsigned int>(nb - 1);
  }
  __syncthreads();
  if (!is_last) return;  // the same for the whole block
  __threadfence();
  // the last block of tensor k merges its nb partials (up to thousands for a big tensor):
  // thread t takes partials t, t + 256, ... in order, then the fixed block tree: deterministic
  const double* part = partials + 3 * row[kStatBegin];
  Moments m{0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < nb; i += kNtThreads) {
    m = merge(m, Moments{__ldcg(part + 3 * i), __ldcg(part + 3 * i + 1), __ldcg(part + 3 * i + 2)});
  }
  const Moments all = block_merge(m, warp_res);
  if (threadIdx.x == 0) {
    const float sd = static_cast<float>(sqrt(all.m2 / (all.n - 1.0)));
    const bool skip = !isfinite(sd) || sd == 0.0f;
    scale[k] = skip ? __int_as_float(0x7fc00000) : __fmul_rn(lam, sd);
  }
}

template <typename T>
__device__ __forceinline__ void perturb_tensor(T* x, int64_t numel, int64_t b, int64_t nb,
                                               float s, uint64_t seed, uint64_t start) {
  constexpr int G = kGroup<T>;
  const int64_t groups = (numel + G - 1) / G;
  const bool vec = aligned(x, sizeof(T) * G);
  for (int64_t q = b * kNtThreads + threadIdx.x; q < groups; q += nb * kNtThreads) {
    const int64_t i0 = q * G;  // element i uses counter start + i / 4, word i % 4
    Words4 r[G / 4];
#pragma unroll
    for (int c = 0; c < G / 4; ++c) {
      r[c] = philox4x32_10(start + static_cast<uint64_t>(i0 / 4 + c), seed);
    }
    if (vec && i0 + G <= numel) {
      Pack<T, G> p = *reinterpret_cast<Pack<T, G>*>(x + i0);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        p.v[k] = static_cast<T>(
            add_rn(static_cast<float>(p.v[k]), noisytune_delta(r[k / 4].w[k % 4], s)));
      }
      *reinterpret_cast<Pack<T, G>*>(x + i0) = p;
    } else {
      for (int k = 0; k < G && i0 + k < numel; ++k) {
        x[i0 + k] = static_cast<T>(
            add_rn(static_cast<float>(x[i0 + k]), noisytune_delta(r[k / 4].w[k % 4], s)));
      }
    }
  }
}

__global__ void __launch_bounds__(kNtThreads)
noisytune_perturb_kernel(const int64_t* __restrict__ meta, int T,
                         const float* __restrict__ scale, uint64_t seed) {
  const int64_t blk = blockIdx.x;
  const int k = find_tensor(meta, T, blk, kPertBegin);
  const float s = scale[k];
  if (s != s) return;  // skipped tensor (std 0 or not finite)
  const int64_t* row = meta + k * kMetaCols;
  const int64_t b = blk - row[kPertBegin];
  const int64_t nb = row[kPertBlocks];
  const int64_t numel = row[kNumel];
  const uint64_t start = static_cast<uint64_t>(row[kStart]);
  void* ptr = reinterpret_cast<void*>(row[kPtr]);
  switch (row[kDtype]) {
    case kF32: perturb_tensor(static_cast<float*>(ptr), numel, b, nb, s, seed, start); break;
    case kF16: perturb_tensor(static_cast<at::Half*>(ptr), numel, b, nb, s, seed, start); break;
    case kBF16:
      perturb_tensor(static_cast<at::BFloat16*>(ptr), numel, b, nb, s, seed, start);
      break;
    default: perturb_tensor(static_cast<double*>(ptr), numel, b, nb, s, seed, start); break;
  }
}

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "fastnoise: noisytune_ needs floating tensors, got ", t);
  }
}

void noisytune_cuda(at::TensorList tensors, double lam, int64_t seed, at::IntArrayRef starts) {
  TORCH_CHECK(tensors.size() == starts.size(), "fastnoise: noisytune_ got ", tensors.size(),
              " tensors but ", starts.size(), " start counters");
  if (tensors.empty()) return;
  const c10::Device device = tensors[0].device();
  int64_t total_groups = 0;  // of the tensors that get perturbed (numel >= 2)
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device() == device, "fastnoise: noisytune_ tensors must share one device (",
                device, " vs ", t.device(), ")");
    TORCH_CHECK(t.is_contiguous(), "fastnoise: noisytune_ needs contiguous tensors");
    const int64_t gs = group_size(t.scalar_type());
    if (t.numel() >= 2) total_groups += (t.numel() + gs - 1) / gs;
  }
  std::vector<int64_t> meta;
  int64_t stat_blocks = 0, pert_blocks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t code = dtype_code(t.scalar_type());
    const int64_t numel = t.numel();
    if (numel < 2) continue;
    const int64_t gs = group_size(t.scalar_type());
    const int64_t groups = (numel + gs - 1) / gs;
    const int64_t full = (groups + kNtThreads - 1) / kNtThreads;  // one group a thread
    // the tensor's share of the stats budget (fp64: no overflow for any real size)
    const int64_t share = static_cast<int64_t>(std::ceil(
        static_cast<double>(kStatBlockBudget) * static_cast<double>(groups) /
        static_cast<double>(total_groups)));
    const int64_t nbs = std::max<int64_t>(1, std::min(full, share));
    const int64_t nbp = std::min(kMaxPerturbBlocks, full);
    const int64_t row[kMetaCols] = {reinterpret_cast<int64_t>(t.data_ptr()), numel, starts[i],
                                    code, stat_blocks, nbs, pert_blocks, nbp};
    meta.insert(meta.end(), row, row + kMetaCols);
    stat_blocks += nbs;
    pert_blocks += nbp;
  }
  const int T = static_cast<int>(meta.size() / kMetaCols);
  if (T == 0) return;
  TORCH_CHECK(device.is_cuda(), "fastnoise: CUDA noisytune_ got tensors on ", device);
  c10::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(device);
  at::Tensor meta_host = at::empty({static_cast<int64_t>(meta.size())},
                                   at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(meta.begin(), meta.end(), meta_host.data_ptr<int64_t>());
  const at::Tensor meta_dev =
      meta_host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const at::TensorOptions fopt = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor partials = at::empty({3 * stat_blocks}, fopt.dtype(at::kDouble));
  at::Tensor scale = at::empty({T}, fopt);
  at::Tensor tickets = at::zeros({T}, at::TensorOptions().device(device).dtype(at::kInt));
  noisytune_stats_kernel<<<grid_blocks(stat_blocks), kNtThreads, 0, stream>>>(
      meta_dev.const_data_ptr<int64_t>(), T, partials.data_ptr<double>(),
      reinterpret_cast<unsigned int*>(tickets.data_ptr<int>()), scale.data_ptr<float>(),
      static_cast<float>(lam));
  FASTNOISE_KERNEL_LAUNCH_CHECK();
  noisytune_perturb_kernel<<<grid_blocks(pert_blocks), kNtThreads, 0, stream>>>(
      meta_dev.const_data_ptr<int64_t>(), T, scale.const_data_ptr<float>(), as_u64(seed));
  FASTNOISE_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("noisytune_", &fastnoise::cuda::noisytune_cuda);
}
