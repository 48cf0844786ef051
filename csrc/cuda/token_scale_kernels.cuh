// The per-token scale of a mask or packed rows (reference.token_scale, contract C4), on the
// device, and its launch logic. Included by noisy_embedding.cu (nvcc) and by the host
// emulator of tests/cuda_emu (g++): one kernel text.
//
// mag[t] = float32(alpha / sqrt(L * d)) in float64, L = the kept tokens of t's sequence;
// masked tokens and sequences with L == 0 get 0; invalid packing inputs make every entry NaN
// and are recorded in the error buffer (C1). The inputs' integer types are read through
// IntRef (bool / uint8, int8, int16, int32, int64), so one kernel serves every dtype.
//
// Rows (no packing, or position_ids): one block per row of L tokens (a sequence never spans
// rows). Chunks of the block's size go left to right; block-wide scans give each token the
// kept tokens before it (K) and its sequence's first token (F). A sequence's first token
// writes K into scratch[F]; its last token turns that into the sequence's count; a second
// pass reads the count of scratch[F] (F parked in mag as int32 bits). position_ids < 0
// anywhere: every block sees it (each scans all of them) and writes NaN.
// cu_seqlens: sequence k is the tokens [cu[k], cu[k+1]); a token finds k by binary search.
// With a mask, one warp per sequence counts its kept tokens into scratch[k] first.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "device_utils.cuh"

namespace fastnoise {
namespace cuda {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kScaleWarps = kScaleThreads / 32;

// An integer or bool tensor's data as int64 values (bytes: 1 unsigned, -1 signed 8-bit, 2,
// 4, 8).
struct IntRef {
  const void* p = nullptr;
  int bytes = 8;
  FASTNOISE_HD int64_t operator[](int64_t i) const {
    switch (bytes) {
      case 1: return static_cast<const uint8_t*>(p)[i];
      case -1: return static_cast<const int8_t*>(p)[i];
      case 2: return static_cast<const int16_t*>(p)[i];
      case 4: return static_cast<const int32_t*>(p)[i];
      default: return static_cast<const int64_t*>(p)[i];
    }
  }
  FASTNOISE_HD bool present() const { return p != nullptr; }
};

struct TokenScaleArgs {
  int64_t n, row, d;  // tokens, tokens a row (L), embedding dim
  double alpha;
  IntRef mask, positions, cu;
  int64_t cu_len;     // entries of cu_seqlens (sequences + 1)
  float* mag;         // (n,) out
  int32_t* scratch;   // (n,) int32 (rows with positions) or (cu_len,) (cu with a mask)
  int64_t* error;     // C1 buffer, or null
};

__device__ inline float scale_for(const TokenScaleArgs& a, int64_t count) {
  // float64 division and square root (IEEE, correctly rounded), then one rounding to float32
  return count <= 0 ? 0.0f
                    : static_cast<float>(a.alpha / sqrt(static_cast<double>(count) *
                                                        static_cast<double>(a.d)));
}

// C1: any record wins; the code is written last.
__device__ __noinline__ void record_packing_error(int64_t* error, int64_t code, int64_t bound) {
  if (error == nullptr) return;
  auto* e = reinterpret_cast<unsigned long long*>(error);
  atomicExch(e + 1, 0ull);
  atomicExch(e + 2, static_cast<unsigned long long>(bound));
  __threadfence();
  atomicExch(e, static_cast<unsigned long long>(code));
}

// An inclusive block scan of two values: the sum of `sum` and the max of `mx`; every thread
// of the block must call it. Returns the block's totals through the references' last values.
__device__ inline void block_scan(int64_t& sum, int64_t& mx, int64_t* warp_sum, int64_t* warp_max,
                                  int64_t& total_sum, int64_t& total_max) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const int64_t s = __shfl_up_sync(0xffffffffu, sum, delta);
    const int64_t m = __shfl_up_sync(0xffffffffu, mx, delta);
    if (lane >= delta) {
      sum += s;
      mx = m > mx ? m : mx;
    }
  }
  if (lane == 31) {
    warp_sum[warp] = sum;
    warp_max[warp] = mx;
  }
  __syncthreads();
  int64_t before_sum = 0, before_max = -1;
  for (int w = 0; w < warp; ++w) {
    before_sum += warp_sum[w];
    before_max = warp_max[w] > before_max ? warp_max[w] : before_max;
  }
  sum += before_sum;
  mx = before_max > mx ? before_max : mx;
  total_sum = 0;
  total_max = -1;
  for (int w = 0; w < kScaleWarps; ++w) {
    total_sum += warp_sum[w];
    total_max = warp_max[w] > total_max ? warp_max[w] : total_max;
  }
  __syncthreads();  // warp_* reused by the next call
}

// Whether some position id is negative (every thread of the block gets the answer).
__device__ inline bool any_negative(const IntRef& positions, int64_t n, int* flag) {
  if (threadIdx.x == 0) *flag = 0;
  __syncthreads();
  bool bad = false;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) bad = bad || positions[t] < 0;
  if (bad) *flag = 1;  // every writer writes 1
  __syncthreads();
  const bool result = *flag != 0;
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kScaleThreads) token_scale_rows_kernel(TokenScaleArgs a) {
  __shared__ int64_t warp_sum[kScaleWarps];
  __shared__ int64_t warp_max[kScaleWarps];
  __shared__ int flag;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * a.row;
  const int64_t e = b + a.row;
  if (a.positions.present() && any_negative(a.positions, a.n, &flag)) {
    for (int64_t t = b + threadIdx.x; t < e; t += blockDim.x) a.mag[t] = __int_as_float(0x7fc00000);
    if (blockIdx.x == 0 && threadIdx.x == 0) record_packing_error(a.error, 3, a.n);
    return;
  }
  if (!a.positions.present()) {  // one sequence a row: count its kept tokens, then write
    int64_t count = 0;
    for (int64_t t = b + threadIdx.x; t < e; t += blockDim.x) {
      count += !a.mask.present() || a.mask[t] != 0;
    }
    int64_t mx = -1, total = 0, total_max = 0;
    block_scan(count, mx, warp_sum, warp_max, total, total_max);
    const float m = scale_for(a, total);
    for (int64_t t = b + threadIdx.x; t < e; t += blockDim.x) {
      a.mag[t] = !a.mask.present() || a.mask[t] != 0 ? m : 0.0f;
    }
    return;
  }
  // packed rows: pass 1, left to right in chunks of the block's size
  int32_t* first_of = reinterpret_cast<int32_t*>(a.mag);  // parked until pass 2
  int64_t carry_kept = 0, carry_first = b;
  for (int64_t c = b; c < e; c += blockDim.x) {
    const int64_t t = c + threadIdx.x;
    const bool in = t < e;
    const bool kept = in && (!a.mask.present() || a.mask[t] != 0);
    const bool start = in && (t == b || a.positions[t] == 0);
    int64_t k = kept ? 1 : 0;             // -> kept tokens up to and including t
    int64_t f = start ? t : -1;           // -> the first token of t's sequence
    int64_t chunk_kept = 0, chunk_first = -1;
    block_scan(k, f, warp_sum, warp_max, chunk_kept, chunk_first);
    k += carry_kept;
    f = f >= 0 ? f : carry_first;
    const int64_t before = k - (kept ? 1 : 0);  // kept tokens before t
    if (start) a.scratch[t] = static_cast<int32_t>(before);
    if (in) first_of[t] = static_cast<int32_t>(f);
    __syncthreads();  // the starts' writes, before the ends read them
    const bool last = in && (t + 1 == e || a.positions[t + 1] == 0);
    if (last) a.scratch[f] = static_cast<int32_t>(k - a.scratch[f]);
    carry_kept += chunk_kept;
    carry_first = chunk_first >= 0 ? chunk_first : carry_first;
    __syncthreads();
  }
  // pass 2: every token reads its sequence's count (each thread its own tokens)
  for (int64_t t = b + threadIdx.x; t < e; t += blockDim.x) {
    const int64_t count = a.scratch[first_of[t]];
    a.mag[t] = !a.mask.present() || a.mask[t] != 0 ? scale_for(a, count) : 0.0f;
  }
}

// Whether cu_seqlens rises from 0 to n without going down (every thread gets the answer).
__device__ inline bool cu_valid(const TokenScaleArgs& a, int* flag) {
  if (threadIdx.x == 0) *flag = a.cu[0] == 0 && a.cu[a.cu_len - 1] == a.n;
  __syncthreads();
  bool bad = false;
  for (int64_t k = threadIdx.x + 1; k < a.cu_len; k += blockDim.x) {
    bad = bad || a.cu[k] < a.cu[k - 1];
  }
  if (bad) *flag = 0;
  __syncthreads();
  const bool result = *flag != 0;
  __syncthreads();
  return result;
}

// cu_seqlens with a mask, first step: scratch[k] = the kept tokens of sequence k (one warp a
// sequence; invalid boundaries are left to the second step).
__global__ void __launch_bounds__(kScaleThreads) token_scale_cu_count_kernel(TokenScaleArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t sequences = a.cu_len - 1;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kScaleWarps + (threadIdx.x >> 5);
       k < sequences; k += static_cast<int64_t>(gridDim.x) * kScaleWarps) {
    const int64_t lo = a.cu[k] < 0 ? 0 : a.cu[k];
    const int64_t hi = a.cu[k + 1] > a.n ? a.n : a.cu[k + 1];
    int64_t count = 0;
    for (int64_t t = lo + lane; t < hi; t += 32) count += a.mask[t] != 0;
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) count += __shfl_xor_sync(0xffffffffu, count, delta);
    if (lane == 0) a.scratch[k] = static_cast<int32_t>(count);
  }
}

// cu_seqlens: each token's sequence k (the last with cu[k] <= t, clamped: never out of
// bounds), its count, its scale.
__global__ void __launch_bounds__(kScaleThreads) token_scale_cu_kernel(TokenScaleArgs a) {
  __shared__ int flag;
  const bool valid = cu_valid(a, &flag);
  if (!valid && blockIdx.x == 0 && threadIdx.x == 0) record_packing_error(a.error, 2, a.n);
  const int64_t last = a.cu_len >= 2 ? a.cu_len - 2 : 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < a.n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!valid) {
      a.mag[t] = __int_as_float(0x7fc00000);
      continue;
    }
    int64_t lo = 0, hi = a.cu_len;  // the first k with cu[k] > t, in [lo, hi]
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (a.cu[mid] <= t) lo = mid + 1; else hi = mid;
    }
    int64_t k = lo - 1;
    k = k < 0 ? 0 : (k > last ? last : k);
    const bool kept = !a.mask.present() || a.mask[t] != 0;
    const int64_t count = a.mask.present() ? a.scratch[k] : a.cu[k + 1] - a.cu[k];
    a.mag[t] = kept ? scale_for(a, count) : 0.0f;
  }
}

// The scale of n >= 1 tokens. scratch: n int32 with position_ids, cu_len int32 with
// cu_seqlens and a mask, else unused (the caller allocates it).
inline void launch_token_scale(const TokenScaleArgs& a, cudaStream_t stream, int sms) {
  if (a.cu.present()) {
    const int64_t blocks = std::min<int64_t>((a.n + kScaleThreads - 1) / kScaleThreads,
                                             static_cast<int64_t>(sms) * 8);
    if (a.mask.present() && a.cu_len > 1) {
      const int64_t count_blocks = std::min<int64_t>(
          (a.cu_len - 1 + kScaleWarps - 1) / kScaleWarps, static_cast<int64_t>(sms) * 8);
      FASTNOISE_LAUNCH(token_scale_cu_count_kernel, dim3(grid_blocks(count_blocks)),
                       dim3(kScaleThreads), stream, a);
    }
    FASTNOISE_LAUNCH(token_scale_cu_kernel, dim3(grid_blocks(blocks)), dim3(kScaleThreads),
                     stream, a);
    return;
  }
  FASTNOISE_LAUNCH(token_scale_rows_kernel, dim3(grid_blocks(a.n / a.row)),
                   dim3(kScaleThreads), stream, a);
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise
