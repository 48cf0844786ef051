// NoisyTune's kernels, W += (u - 0.5) * s for a list of tensors in place (contract C2), and
// their launch logic on raw pointers (the plan: per-tensor table, block budget). Included by
// noisytune.cu (nvcc) and by the host emulator of tests/cuda_emu (g++): one kernel text.
//
// multi_tensor_apply style, two launches for the whole list (any mix of fp32 / fp16 / bf16 /
// fp64 tensors):
//  1. statistics, for the tensors whose std is not given (C5): they share a budget of
//     kStatBlockBudget blocks in proportion to their size (at least 1, at most one group a
//     thread), so every block streams about the same number of elements and the largest
//     tensor leaves no long tail. Each thread sums x - x[0] and its square over 4- or
//     8-element groups in fp64 (shifted by the tensor's first element: no cancellation for a
//     large mean, no division per element), blocks merge (n, mean, M2) with Chan's formula
//     (warp shuffles), write one fp64 partial, and the last block of a tensor to finish
//     (threadfence + atomic ticket) merges the partials, all its threads in a fixed order
//     (deterministic), and writes the tensor's scale s (noisytune_scale; NaN = unchanged).
//  2. perturbation: one Philox call per 4 elements; a thread takes 16-byte packs (4 fp32 or
//     8 fp16/bf16 elements, two 16-byte halves of fp64) when aligned.
// Everything the kernels read about the tensors is one int64 table (built by plan_noisytune,
// copied to the device once): a row per perturbed tensor, a row per tensor whose statistics
// the kernel computes (with its ticket), then one fp64 scale per perturbed tensor (given
// stds: computed on the host; else written by the stats kernel). Blocks find their row by
// binary search. Extra device memory: the table and at most kStatBlockBudget + #tensors
// partials of 24 bytes (< 0.5 MiB).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "device_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kNtThreads = 256;
constexpr int64_t kStatBlockBudget = 16384;  // ~124 blocks an SM on an H100
constexpr int64_t kMaxPerturbBlocks = 2048;

// Row of a perturbed tensor (int64 each).
enum TensorCol : int { kPtr = 0, kNumel, kStart, kDtype, kPertBegin, kPertBlocks, kTensorCols };
// Row of a tensor whose std the stats kernel computes.
enum StatCol : int { kStatTensor = 0, kStatBegin, kStatBlocks, kStatTicket, kStatCols };
enum DtypeCode : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline int64_t element_bytes(int64_t dtype) {
  return dtype == kF64 ? 8 : (dtype == kF32 ? 4 : 2);
}

// The row whose block range [begin, begin + nblocks) holds `b` (every row has >= 1 block).
__device__ __forceinline__ int find_row(const int64_t* rows, int nrows, int cols, int col,
                                        int64_t b) {
  int lo = 0, hi = nrows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (rows[mid * cols + col] <= b) lo = mid; else hi = mid - 1;
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
constexpr int group_for_size(int64_t bytes) { return bytes == 2 ? 8 : 4; }

template <typename T>
constexpr int kGroup = group_for_size(sizeof(T));

// The exact value of an element in fp64 (fp16 / bf16 through float32: exact).
template <typename T>
__device__ __forceinline__ double exact_value(T x) {
  return static_cast<double>(static_cast<typename AddType<T>::type>(x));
}

// This thread's moments of tensor x (block b of nb): plain fp64 sums of y = x - shift and y^2
// (exact for fp32 / fp16 / bf16 elements), turned into (n, mean, M2) once at the end.
template <typename T>
__device__ __forceinline__ Moments stats_tensor(const T* x, int64_t numel, int64_t b,
                                                int64_t nb) {
  constexpr int G = kGroup<T>;
  const double shift = exact_value(x[0]);
  const int64_t groups = (numel + G - 1) / G;
  const bool vec = aligned(x, sizeof(T) * G);
  double n = 0.0, s = 0.0, ss = 0.0;
  for (int64_t q = b * kNtThreads + threadIdx.x; q < groups; q += nb * kNtThreads) {
    const int64_t i0 = q * G;
    if (vec && i0 + G <= numel) {
      const Pack<T, G> p = *reinterpret_cast<const Pack<T, G>*>(x + i0);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const double y = exact_value(p.v[k]) - shift;
        s += y;
        ss += y * y;
      }
      n += G;
    } else {
      for (int64_t i = i0; i < numel && i < i0 + G; ++i) {
        const double y = exact_value(x[i]) - shift;
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

// table: the plan's table on the device; T perturbed tensors, S of them with statistics.
__global__ void __launch_bounds__(kNtThreads)
noisytune_stats_kernel(int64_t* __restrict__ table, int T, int S,
                       double* __restrict__ partials, double lam) {
  const int64_t blk = blockIdx.x;
  int64_t* stat_rows = table + static_cast<int64_t>(T) * kTensorCols;
  int64_t* srow = stat_rows + find_row(stat_rows, S, kStatCols, kStatBegin, blk) * kStatCols;
  const int k = static_cast<int>(srow[kStatTensor]);
  const int64_t* row = table + static_cast<int64_t>(k) * kTensorCols;
  double* scale = reinterpret_cast<double*>(stat_rows + static_cast<int64_t>(S) * kStatCols);
  const int64_t b = blk - srow[kStatBegin];
  const int64_t nb = srow[kStatBlocks];
  const int64_t numel = row[kNumel];
  const void* ptr = reinterpret_cast<const void*>(row[kPtr]);
  Moments w;
  switch (row[kDtype]) {
    case kF32: w = stats_tensor(static_cast<const float*>(ptr), numel, b, nb); break;
    case kF16: w = stats_tensor(static_cast<const c10::Half*>(ptr), numel, b, nb); break;
    case kBF16: w = stats_tensor(static_cast<const c10::BFloat16*>(ptr), numel, b, nb); break;
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
    const unsigned long long ticket =
        atomicAdd(reinterpret_cast<unsigned long long*>(srow + kStatTicket), 1ull);
    is_last = ticket == static_cast<unsigned long long>(nb - 1);
  }
  __syncthreads();
  if (!is_last) return;  // the same for the whole block
  __threadfence();
  // the last block of the tensor merges its nb partials (up to thousands for a big tensor):
  // thread t takes partials t, t + 256, ... in order, then the fixed block tree: deterministic
  const double* part = partials + 3 * srow[kStatBegin];
  Moments m{0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < nb; i += kNtThreads) {
    m = merge(m, Moments{__ldcg(part + 3 * i), __ldcg(part + 3 * i + 1), __ldcg(part + 3 * i + 2)});
  }
  const Moments all = block_merge(m, warp_res);
  if (threadIdx.x == 0) {
    scale[k] = noisytune_scale(lam, sqrt(all.m2 / (all.n - 1.0)), row[kDtype] == kF64);
  }
}

// C2: float32 arithmetic for fp32 / fp16 / bf16 tensors (s is a float32 value), float64 for
// fp64 tensors; each op rounded once.
template <typename T>
__device__ __forceinline__ T perturbed(T x, uint32_t word, double s) {
  using A = typename AddType<T>::type;
  return static_cast<T>(add_rn(static_cast<A>(x), noisytune_delta(word, static_cast<A>(s))));
}

template <typename T>
__device__ __forceinline__ void perturb_tensor(T* x, int64_t numel, int64_t b, int64_t nb,
                                               double s, uint64_t seed, uint64_t start) {
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
      for (int k = 0; k < G; ++k) p.v[k] = perturbed(p.v[k], r[k / 4].w[k % 4], s);
      *reinterpret_cast<Pack<T, G>*>(x + i0) = p;
    } else {
      for (int k = 0; k < G && i0 + k < numel; ++k) {
        x[i0 + k] = perturbed(x[i0 + k], r[k / 4].w[k % 4], s);
      }
    }
  }
}

__global__ void __launch_bounds__(kNtThreads)
noisytune_perturb_kernel(const int64_t* __restrict__ table, int T, int S, uint64_t seed) {
  const int64_t blk = blockIdx.x;
  const int k = find_row(table, T, kTensorCols, kPertBegin, blk);
  const double* scale = reinterpret_cast<const double*>(
      table + static_cast<int64_t>(T) * kTensorCols + static_cast<int64_t>(S) * kStatCols);
  const double s = scale[k];
  if (s != s) return;  // unchanged tensor (s zero or not finite)
  const int64_t* row = table + static_cast<int64_t>(k) * kTensorCols;
  const int64_t b = blk - row[kPertBegin];
  const int64_t nb = row[kPertBlocks];
  const int64_t numel = row[kNumel];
  const uint64_t start = static_cast<uint64_t>(row[kStart]);
  void* ptr = reinterpret_cast<void*>(row[kPtr]);
  switch (row[kDtype]) {
    case kF32: perturb_tensor(static_cast<float*>(ptr), numel, b, nb, s, seed, start); break;
    case kF16: perturb_tensor(static_cast<c10::Half*>(ptr), numel, b, nb, s, seed, start); break;
    case kBF16:
      perturb_tensor(static_cast<c10::BFloat16*>(ptr), numel, b, nb, s, seed, start);
      break;
    default: perturb_tensor(static_cast<double*>(ptr), numel, b, nb, s, seed, start); break;
  }
}

// ---------------------------------------------------------------------------------------
// Host: the plan (table, grids) and the two launches
// ---------------------------------------------------------------------------------------
struct NoisyTuneTensor {
  void* ptr;
  int64_t numel;
  int64_t start;  // first Philox counter
  int64_t dtype;  // DtypeCode
};

struct NoisyTunePlan {
  std::vector<int64_t> table;  // T tensor rows, S stat rows, T scales (fp64 bits)
  int tensors = 0;             // T: tensors perturbed (or whose std the kernel computes)
  int stat_tensors = 0;        // S
  int64_t stat_blocks = 0, pert_blocks = 0;
};

// stds: nullptr, or one given std per tensor (C5: no statistics pass for them). Tensors with
// fewer than 2 elements, and those whose given std makes s zero or not finite, get no row.
inline NoisyTunePlan plan_noisytune(const std::vector<NoisyTuneTensor>& tensors, double lam,
                                    const double* stds, int64_t stat_budget) {
  int64_t total_groups = 0;  // of the tensors whose statistics the kernel computes
  for (const NoisyTuneTensor& t : tensors) {
    if (t.numel >= 2 && stds == nullptr) {
      const int64_t gs = group_for_size(element_bytes(t.dtype));
      total_groups += (t.numel + gs - 1) / gs;
    }
  }
  NoisyTunePlan plan;
  std::vector<int64_t> stat_rows;
  std::vector<double> scales;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const NoisyTuneTensor& t = tensors[i];
    if (t.numel < 2) continue;
    double s = std::numeric_limits<double>::quiet_NaN();  // the stats kernel writes it
    if (stds != nullptr) {
      s = noisytune_scale(lam, stds[i], t.dtype == kF64);
      if (std::isnan(s)) continue;  // unchanged
    }
    const int64_t gs = group_for_size(element_bytes(t.dtype));
    const int64_t groups = (t.numel + gs - 1) / gs;
    const int64_t full = (groups + kNtThreads - 1) / kNtThreads;  // one group a thread
    if (stds == nullptr) {
      // the tensor's share of the stats budget (fp64: no overflow for any real size)
      const int64_t share = static_cast<int64_t>(std::ceil(
          static_cast<double>(stat_budget) * static_cast<double>(groups) /
          static_cast<double>(total_groups)));
      const int64_t nbs = std::max<int64_t>(1, std::min(full, share));
      const int64_t srow[kStatCols] = {plan.tensors, plan.stat_blocks, nbs, 0};
      stat_rows.insert(stat_rows.end(), srow, srow + kStatCols);
      plan.stat_blocks += nbs;
      ++plan.stat_tensors;
    }
    const int64_t nbp = std::min(kMaxPerturbBlocks, full);
    const int64_t row[kTensorCols] = {reinterpret_cast<int64_t>(t.ptr), t.numel, t.start,
                                      t.dtype, plan.pert_blocks, nbp};
    plan.table.insert(plan.table.end(), row, row + kTensorCols);
    plan.pert_blocks += nbp;
    scales.push_back(s);
    ++plan.tensors;
  }
  plan.table.insert(plan.table.end(), stat_rows.begin(), stat_rows.end());
  for (double s : scales) {
    int64_t bits;
    static_assert(sizeof(bits) == sizeof(s));
    std::memcpy(&bits, &s, sizeof(s));
    plan.table.push_back(bits);
  }
  return plan;
}

// The two launches; table: the plan's table on the device, partials: 3 * stat_blocks doubles.
inline void launch_noisytune(const NoisyTunePlan& plan, int64_t* table, double* partials,
                             double lam, uint64_t seed, cudaStream_t stream) {
  if (plan.tensors == 0) return;
  if (plan.stat_blocks > 0) {
    FASTNOISE_LAUNCH(noisytune_stats_kernel, dim3(grid_blocks(plan.stat_blocks)),
                     dim3(kNtThreads), stream, table, plan.tensors, plan.stat_tensors,
                     partials, lam);
  }
  FASTNOISE_LAUNCH(noisytune_perturb_kernel, dim3(grid_blocks(plan.pert_blocks)),
                   dim3(kNtThreads), stream, static_cast<const int64_t*>(table), plan.tensors,
                   plan.stat_tensors, seed);
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise
