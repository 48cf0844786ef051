// CPU NoisyTune, in place, per tensor (contract C2 of the reference):
//   std64 = sqrt(M2 / (n - 1)) in float64 from the exact element values (or the given std, C5)
//   float32/float16/bfloat16: s = float32(float32(lam) * float32(std64)),
//                             W = dtype(float32(W) + (u - 0.5f) * s)   (float32 ops, no FMA)
//   float64:                  s = lam * std64, W = W + (double(u) - 0.5) * s
//   n < 2, or s not finite, or s == 0: the tensor is unchanged.
// All tensors are cut into fixed chunks (the result does not depend on the thread count);
// one parallel pass computes every chunk's moments, one more perturbs every chunk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "noise_fill.h"

namespace fastnoise {
namespace cpu {
namespace {

// Elements per chunk: a multiple of 4 (a chunk starts on a Philox counter) and of 8 (the
// accumulator lanes below).
constexpr int64_t kChunk = 16384;

struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
};

// Chan et al. pairwise merge.
inline Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  Moments r;
  r.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  r.mean = a.mean + delta * (b.n / r.n);
  r.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / r.n);
  return r;
}

// Two-pass moments of x[0 .. count) in float64 from the exact values, with 8 independent
// accumulators (a fixed order the compiler can vectorize).
template <typename scalar_t>
Moments chunk_moments(const scalar_t* x, int64_t count) {
  constexpr int kAcc = 8;
  const int64_t body = count / kAcc * kAcc;
  double acc[kAcc] = {};
  for (int64_t i = 0; i < body; i += kAcc) {
    for (int k = 0; k < kAcc; ++k) acc[k] += static_cast<double>(x[i + k]);
  }
  double sum = 0.0;
  for (int k = 0; k < kAcc; ++k) sum += acc[k];
  for (int64_t i = body; i < count; ++i) sum += static_cast<double>(x[i]);
  const double mean = sum / static_cast<double>(count);
  double sq[kAcc] = {};
  for (int64_t i = 0; i < body; i += kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      const double dv = static_cast<double>(x[i + k]) - mean;
      sq[k] += dv * dv;
    }
  }
  double m2 = 0.0;
  for (int k = 0; k < kAcc; ++k) m2 += sq[k];
  for (int64_t i = body; i < count; ++i) {
    const double dv = static_cast<double>(x[i]) - mean;
    m2 += dv * dv;
  }
  return Moments{static_cast<double>(count), mean, m2};
}

// float32 moments (the common case) also compiled for AVX-512 and AVX2, picked at load time
// (GCC's target_clones): 4 doubles per instruction (GCC keeps to 256 bits) instead of
// SSE2's 2. The 8 accumulators map to vector lanes without reassociation, so every clone
// gives the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#endif
Moments chunk_moments_f32(const float* x, int64_t count) {
  return chunk_moments(x, count);
}

template <typename scalar_t>
Moments moments_of(const scalar_t* x, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return chunk_moments_f32(x, count);
  } else {
    return chunk_moments(x, count);
  }
}

// x[i] += (u_i - 0.5) * s for the chunk's elements, u_i from counter first_counter + i / 4.
template <typename scalar_t>
void perturb_chunk(scalar_t* x, int64_t count, uint64_t first_counter, uint64_t seed,
                   double s, float* u) {
  cpu_kernels().fill_noise(kFillUniform01, first_counter, count, seed, 0.0f, u);
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < count; ++i) x[i] = x[i] + (static_cast<double>(u[i]) - 0.5) * s;
  } else {
    const float s32 = static_cast<float>(s);
    for (int64_t i = 0; i < count; ++i) {
      // noisytune_delta of noise.h on the drawn u: (u - 0.5f) * s, each op rounded once
      x[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + (u[i] - 0.5f) * s32);
    }
  }
}

struct Chunk {
  int64_t tensor, begin, count;
};

}  // namespace

// The op, with the optional per-tensor std of contract C5 (schema `float[]? stds=None`):
// when given, stds[k] replaces tensor k's std64 (a sharded tensor's std over all ranks).
void noisytune_cpu_impl(at::TensorList tensors, double lam, int64_t seed,
                        at::IntArrayRef starts, std::optional<at::ArrayRef<double>> given_stds) {
  check_noisytune_args(tensors, starts, given_stds);
  const double* stds = given_stds.has_value() ? given_stds->data() : nullptr;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "fastnoise: CPU noisytune_ got a tensor on ", t.device());
  }
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const int64_t numel = tensors[k].numel();
    if (numel < 2) continue;
    for (int64_t b = 0; b < numel; b += kChunk) {
      chunks.push_back(Chunk{static_cast<int64_t>(k), b, std::min(kChunk, numel - b)});
    }
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());

  // 1. every chunk's moments (only where the std is not given)
  std::vector<Moments> part(chunks.size());
  if (stds == nullptr) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const at::Tensor& t = tensors[ch.tensor];
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                        "fastnoise_noisytune_cpu_std", [&] {
          part[c] = moments_of(t.const_data_ptr<scalar_t>() + ch.begin, ch.count);
        });
      }
    });
  }

  // 2. each tensor's scale s (0: leave it unchanged), merging its chunks in order
  std::vector<double> scale(tensors.size(), 0.0);
  std::vector<Moments> all(tensors.size());
  for (int64_t c = 0; c < num_chunks; ++c) {
    all[chunks[c].tensor] = merge(all[chunks[c].tensor], part[c]);
  }
  const float lam32 = static_cast<float>(lam);
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (tensors[k].numel() < 2) continue;
    const double std64 = stds != nullptr ? stds[k] : std::sqrt(all[k].m2 / (all[k].n - 1.0));
    const double s = tensors[k].scalar_type() == at::kDouble
                         ? lam * std64
                         : static_cast<double>(lam32 * static_cast<float>(std64));
    scale[k] = std::isfinite(s) ? s : 0.0;
  }

  // 3. perturb every chunk of the tensors with s != 0
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> u(static_cast<size_t>(fill_buffer_len(kChunk)));
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const double s = scale[ch.tensor];
      if (s == 0.0) continue;
      const at::Tensor& t = tensors[ch.tensor];
      const uint64_t first = as_u64(starts[ch.tensor]) + static_cast<uint64_t>(ch.begin / 4);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                      "fastnoise_noisytune_cpu", [&] {
        perturb_chunk(t.data_ptr<scalar_t>() + ch.begin, ch.count, first, as_u64(seed), s,
                      u.data());
      });
    }
  });
}

namespace {

void noisytune_cpu(at::TensorList tensors, double lam, int64_t seed, at::IntArrayRef starts,
                   std::optional<at::ArrayRef<double>> stds) {
  noisytune_cpu_impl(tensors, lam, seed, starts, stds);
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CPU, m) {
  m.impl("noisytune_", &fastnoise::cpu::noisytune_cpu);
}
