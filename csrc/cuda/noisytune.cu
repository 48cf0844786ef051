// CUDA NoisyTune: W += (u - 0.5) * float32(lam) * std(W) for a list of tensors, in place.
//
// multi_tensor_apply style, two launches for the whole list (any mix of fp32 / fp16 / bf16 /
// fp64 tensors):
//  1. statistics: tensor k gets nb_k = min(256, ceil(groups_k / 256)) blocks; each thread runs
//     Welford (fp32) over 4-element groups (grid-stride inside its tensor), blocks merge with
//     Chan's formula (warp shuffles), write one (count, mean, M2) partial, and the last block
//     of a tensor to finish (threadfence + atomic ticket) merges the partials in block order
//     (fp64, deterministic) and writes s_k = float32(lam) * std_k (NaN = skip the tensor).
//  2. perturbation: one Philox call per 4 elements, 16-byte packs when aligned.
// Blocks find their tensor by binary search in a small per-tensor table; extra device memory
// is O(#tensors) (the table, 256 partials per tensor at most, one ticket and scale each).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kNtThreads = 256;
constexpr int64_t kMaxStatBlocks = 256;
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

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ void welford_add(Welford& w, float x) {
  w.n += 1.0f;
  const float delta = x - w.mean;
  w.mean += delta / w.n;
  w.m2 += delta * (x - w.mean);
}

__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  if (a.n == 0.0f) return b;
  if (b.n == 0.0f) return a;
  Welford r;
  r.n = a.n + b.n;
  const float delta = b.mean - a.mean;
  const float fb = b.n / r.n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
  return r;
}

template <typename T>
__device__ __forceinline__ void stats_tensor(const T* x, int64_t numel, int64_t b, int64_t nb,
                                             Welford& w) {
  const int64_t groups = (numel + 3) / 4;
  const bool vec = aligned(x, sizeof(T) * 4);
  for (int64_t q = b * kNtThreads + threadIdx.x; q < groups; q += nb * kNtThreads) {
    const int64_t i0 = q * 4;
    if (vec && i0 + 4 <= numel) {
      const Pack<T, 4> p = *reinterpret_cast<const Pack<T, 4>*>(x + i0);
#pragma unroll
      for (int k = 0; k < 4; ++k) welford_add(w, static_cast<float>(p.v[k]));
    } else {
      for (int64_t i = i0; i < numel && i < i0 + 4; ++i) welford_add(w, static_cast<float>(x[i]));
    }
  }
}

__global__ void __launch_bounds__(kNtThreads)
noisytune_stats_kernel(const int64_t* __restrict__ meta, int T, float* __restrict__ partials,
                       unsigned int* __restrict__ tickets, float* __restrict__ scale,
                       float lam) {
  const int64_t blk = blockIdx.x;
  const int k = find_tensor(meta, T, blk, kStatBegin);
  const int64_t* row = meta + k * kMetaCols;
  const int64_t b = blk - row[kStatBegin];
  const int64_t nb = row[kStatBlocks];
  const int64_t numel = row[kNumel];
  void* ptr = reinterpret_cast<void*>(row[kPtr]);
  Welford w{0.f, 0.f, 0.f};
  switch (row[kDtype]) {
    case kF32: stats_tensor(static_cast<const float*>(ptr), numel, b, nb, w); break;
    case kF16: stats_tensor(static_cast<const at::Half*>(ptr), numel, b, nb, w); break;
    case kBF16: stats_tensor(static_cast<const at::BFloat16*>(ptr), numel, b, nb, w); break;
    default: stats_tensor(static_cast<const double*>(ptr), numel, b, nb, w); break;
  }
  // block reduction: warp shuffles, then the first warp over the warps' results
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    Welford o{__shfl_down_sync(0xffffffffu, w.n, s), __shfl_down_sync(0xffffffffu, w.mean, s),
              __shfl_down_sync(0xffffffffu, w.m2, s)};
    w = welford_merge(w, o);
  }
  __shared__ Welford warp_res[kNtThreads / 32];
  __shared__ bool is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_res[warp] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford acc = warp_res[0];
    for (int i = 1; i < kNtThreads / 32; ++i) acc = welford_merge(acc, warp_res[i]);
    float* part = partials + 3 * blk;
    part[0] = acc.n;
    part[1] = acc.mean;
    part[2] = acc.m2;
    __threadfence();
    const unsigned int ticket = atomicAdd(tickets + k, 1u);
    is_last = ticket == static_cast<unsigned int>(nb - 1);
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    __threadfence();
    // merge this tensor's partials in block order, fp64: deterministic
    const float* part = partials + 3 * row[kStatBegin];
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t i = 0; i < nb; ++i) {
      const double pn = __ldcg(part + 3 * i), pmean = __ldcg(part + 3 * i + 1),
                   pm2 = __ldcg(part + 3 * i + 2);
      if (pn == 0.0) continue;
      if (n == 0.0) {
        n = pn; mean = pmean; m2 = pm2;
        continue;
      }
      const double tot = n + pn;
      const double delta = pmean - mean;
      mean += delta * (pn / tot);
      m2 += pm2 + delta * delta * (n * pn / tot);
      n = tot;
    }
    const float sd = static_cast<float>(sqrt(m2 / (n - 1.0)));
    const bool skip = !isfinite(sd) || sd == 0.0f;
    scale[k] = skip ? __int_as_float(0x7fc00000) : __fmul_rn(lam, sd);
  }
}

template <typename T>
__device__ __forceinline__ void perturb_tensor(T* x, int64_t numel, int64_t b, int64_t nb,
                                               float s, uint64_t seed, uint64_t start) {
  const int64_t groups = (numel + 3) / 4;
  const bool vec = aligned(x, sizeof(T) * 4);
  for (int64_t q = b * kNtThreads + threadIdx.x; q < groups; q += nb * kNtThreads) {
    const Words4 r = philox4x32_10(start + static_cast<uint64_t>(q), seed);
    const int64_t i0 = q * 4;
    if (vec && i0 + 4 <= numel) {
      Pack<T, 4> p = *reinterpret_cast<Pack<T, 4>*>(x + i0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        p.v[k] = static_cast<T>(add_rn(static_cast<float>(p.v[k]), noisytune_delta(r.w[k], s)));
      }
      *reinterpret_cast<Pack<T, 4>*>(x + i0) = p;
    } else {
      for (int k = 0; k < 4 && i0 + k < numel; ++k) {
        x[i0 + k] =
            static_cast<T>(add_rn(static_cast<float>(x[i0 + k]), noisytune_delta(r.w[k], s)));
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
  std::vector<int64_t> meta;
  int64_t stat_blocks = 0, pert_blocks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, "fastnoise: noisytune_ tensors must share one device (",
                device, " vs ", t.device(), ")");
    TORCH_CHECK(t.is_contiguous(), "fastnoise: noisytune_ needs contiguous tensors");
    const int64_t code = dtype_code(t.scalar_type());
    const int64_t numel = t.numel();
    if (numel < 2) continue;
    const int64_t groups = (numel + 3) / 4;
    const int64_t per_block = kNtThreads;
    const int64_t nbs = std::min<int64_t>(kMaxStatBlocks, (groups + per_block - 1) / per_block);
    const int64_t nbp =
        std::min<int64_t>(kMaxPerturbBlocks, (groups + per_block - 1) / per_block);
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
  at::Tensor partials = at::empty({3 * stat_blocks}, fopt);
  at::Tensor scale = at::empty({T}, fopt);
  at::Tensor tickets = at::zeros({T}, at::TensorOptions().device(device).dtype(at::kInt));
  noisytune_stats_kernel<<<stat_blocks, kNtThreads, 0, stream>>>(
      meta_dev.const_data_ptr<int64_t>(), T, partials.data_ptr<float>(),
      reinterpret_cast<unsigned int*>(tickets.data_ptr<int>()), scale.data_ptr<float>(),
      static_cast<float>(lam));
  FASTNOISE_KERNEL_LAUNCH_CHECK();
  noisytune_perturb_kernel<<<pert_blocks, kNtThreads, 0, stream>>>(
      meta_dev.const_data_ptr<int64_t>(), T, scale.const_data_ptr<float>(), as_u64(seed));
  FASTNOISE_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("noisytune_", &fastnoise::cuda::noisytune_cuda);
}
