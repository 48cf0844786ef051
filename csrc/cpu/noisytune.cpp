// CPU NoisyTune: W += (u - 0.5) * float32(lam) * std(W), in place, per tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace fastnoise {
namespace cpu {
namespace {

constexpr int64_t kStatChunk = 16384;  // fixed: the result does not depend on thread count

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

// Unbiased std in float32 (statistics in float64: per-chunk two-pass, Chan merges in order).
template <typename scalar_t>
float tensor_std(const scalar_t* x, int64_t numel) {
  const int64_t chunks = (numel + kStatChunk - 1) / kStatChunk;
  std::vector<Moments> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kStatChunk, e = std::min(numel, b + kStatChunk);
      double sum = 0.0;
      for (int64_t i = b; i < e; ++i) sum += static_cast<double>(static_cast<float>(x[i]));
      const double mean = sum / static_cast<double>(e - b);
      double m2 = 0.0;
      for (int64_t i = b; i < e; ++i) {
        const double dv = static_cast<double>(static_cast<float>(x[i])) - mean;
        m2 += dv * dv;
      }
      part[c] = Moments{static_cast<double>(e - b), mean, m2};
    }
  });
  Moments all;
  for (const Moments& p : part) all = merge(all, p);
  return static_cast<float>(std::sqrt(all.m2 / (all.n - 1.0)));
}

template <typename scalar_t>
void perturb(scalar_t* x, int64_t numel, float s, uint64_t seed, uint64_t start) {
  const int64_t groups = (numel + 3) / 4;
  at::parallel_for(0, groups, 4096, [&](int64_t gb, int64_t ge) {
    for (int64_t q = gb; q < ge; ++q) {
      const Words4 r = philox4x32_10(start + static_cast<uint64_t>(q), seed);
      const int64_t i0 = 4 * q;
      const int64_t m = std::min<int64_t>(4, numel - i0);
      for (int64_t k = 0; k < m; ++k) {
        x[i0 + k] = static_cast<scalar_t>(static_cast<float>(x[i0 + k]) +
                                          noisytune_delta(r.w[k], s));
      }
    }
  });
}

void noisytune_cpu(at::TensorList tensors, double lam, int64_t seed, at::IntArrayRef starts,
                   std::optional<at::ArrayRef<double>> stds) {
  // placeholder until the CPU kernel implements contract C5
  TORCH_CHECK(!stds.has_value(), "fastnoise: noisytune_ with given stds is not implemented "
              "on the CPU yet");
  TORCH_CHECK(tensors.size() == starts.size(), "fastnoise: noisytune_ got ", tensors.size(),
              " tensors but ", starts.size(), " start counters");
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "fastnoise: CPU noisytune_ got a tensor on ", t.device());
    TORCH_CHECK(t.is_contiguous(), "fastnoise: noisytune_ needs contiguous tensors");
    TORCH_CHECK(supported_float(t.scalar_type()),
                "fastnoise: noisytune_ needs floating tensors, got ", t.scalar_type());
  }
  const float lam32 = static_cast<float>(lam);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    const int64_t numel = t.numel();
    if (numel < 2) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                    "fastnoise_noisytune_cpu", [&] {
      scalar_t* x = t.data_ptr<scalar_t>();
      const float sd = tensor_std(x, numel);
      if (!std::isfinite(sd) || sd == 0.0f) return;
      perturb(x, numel, lam32 * sd, as_u64(seed), as_u64(starts[k]));
    });
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CPU, m) {
  m.impl("noisytune_", &fastnoise::cpu::noisytune_cpu);
}
