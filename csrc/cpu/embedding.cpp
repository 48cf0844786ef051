// CPU kernels of the fused noisy embedding (forward) and its weight gradient (backward).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace fastnoise {
namespace cpu {
namespace {

template <typename index_t>
void check_ids_in_range(const index_t* ids, int64_t n, int64_t num_weights) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    TORCH_CHECK(id >= 0 && id < num_weights, "fastnoise: ids[", r, "] = ", id,
                " is out of range for an embedding table of ", num_weights, " rows");
  }
}

// Philox of kLanes counters at once, structure-of-arrays so the compiler can vectorize the
// rounds (same function as philox4x32_10, lane by lane).
constexpr int kLanes = 8;
inline void philox_lanes(uint64_t base, uint64_t seed, uint32_t* words /* 4 * kLanes */) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t ctr = base + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(ctr);
    c1[l] = static_cast<uint32_t>(ctr >> 32);
    c2[l] = 0u;
    c3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2[l];
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0[l];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(pb);
      c3[l] = static_cast<uint32_t>(pa);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int l = 0; l < kLanes; ++l) {
    words[4 * l + 0] = c0[l];
    words[4 * l + 1] = c1[l];
    words[4 * l + 2] = c2[l];
    words[4 * l + 3] = c3[l];
  }
}

// Fills words[0 .. 4*G) with the Philox words of counters base .. base + G - 1.
inline void philox_words(uint64_t base, int64_t G, uint64_t seed, uint32_t* words) {
  int64_t g = 0;
  for (; g + kLanes <= G; g += kLanes) {
    philox_lanes(base + static_cast<uint64_t>(g), seed, words + 4 * g);
  }
  for (; g < G; ++g) {
    const Words4 r = philox4x32_10(base + static_cast<uint64_t>(g), seed);
    words[4 * g + 0] = r.w[0];
    words[4 * g + 1] = r.w[1];
    words[4 * g + 2] = r.w[2];
    words[4 * g + 3] = r.w[3];
  }
}

// HAS_SCALE: embed_scale != 1 (Gemma): e = dtype(e * embed_scale) before the noise. The
// unscaled instantiation is the plain kernel (embed_scale unused).
template <typename scalar_t, typename index_t, bool HAS_SCALE>
void forward_kernel(const index_t* ids, int64_t n, const scalar_t* weight, int64_t w_stride,
                    scalar_t* out, int64_t d, int64_t kind, float mag, const float* tok_mag,
                    uint64_t seed, uint64_t offset, bool symmetric, double embed_scale) {
  using acc_t = typename AddType<scalar_t>::type;  // float, or double for double weights
  // the reference multiplies in the add type: float32(embed_scale), float64 for float64
  const acc_t es = static_cast<acc_t>(embed_scale);
  const int64_t per = elements_per_counter(kind);
  const int64_t G = (d + per - 1) / per;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(4 * G));
    std::vector<float> xi(static_cast<size_t>(G * per));
    uint32_t* wp = words.data();
    float* xp = xi.data();
    for (int64_t r = begin; r < end; ++r) {
      philox_words(offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(G), G, seed, wp);
      if (kind == kUniform) {
        for (int64_t j = 0; j < d; ++j) xp[j] = uniform_noise(wp[j]);
      } else if (kind == kGaussian) {
        for (int64_t g = 0; g < G; ++g) {
          box_muller(wp[4 * g + 0], wp[4 * g + 1], xp[4 * g + 0], xp[4 * g + 1]);
          box_muller(wp[4 * g + 2], wp[4 * g + 3], xp[4 * g + 2], xp[4 * g + 3]);
        }
      } else {
        for (int64_t j = 0; j < d; ++j) {
          const uint32_t bit = (wp[j >> 5] >> (j & 31)) & 1u;
          xp[j] = 1.0f - 2.0f * static_cast<float>(bit);  // exact: +-1
        }
      }
      const float m = tok_mag != nullptr ? tok_mag[r] : mag;
      for (int64_t j = 0; j < d; ++j) xp[j] = xp[j] * m;  // n, rounded once
      const scalar_t* e = weight + static_cast<int64_t>(ids[r]) * w_stride;
      scalar_t* o = out + r * d;
      if constexpr (HAS_SCALE) {
        scalar_t* o2 = symmetric ? out + (n + r) * d : nullptr;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t x = scale_embedding<scalar_t, acc_t>(static_cast<acc_t>(e[j]), es);
          o[j] = static_cast<scalar_t>(x + static_cast<acc_t>(xp[j]));
          if (o2 != nullptr) o2[j] = static_cast<scalar_t>(x - static_cast<acc_t>(xp[j]));
        }
      } else {
        (void)es;
        for (int64_t j = 0; j < d; ++j) {
          o[j] = static_cast<scalar_t>(static_cast<acc_t>(e[j]) + static_cast<acc_t>(xp[j]));
        }
        if (symmetric) {
          scalar_t* o2 = out + (n + r) * d;
          for (int64_t j = 0; j < d; ++j) {
            o2[j] = static_cast<scalar_t>(static_cast<acc_t>(e[j]) - static_cast<acc_t>(xp[j]));
          }
        }
      }
    }
  });
}

void embedding_forward_cpu(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& out,
                           int64_t noise, double mag, const std::optional<at::Tensor>& tok_mag,
                           int64_t seed, int64_t offset, bool symmetric, double embed_scale,
                           const std::optional<at::Tensor>& seed_tensor,
                           const std::optional<at::Tensor>& error) {
  (void)error;  // contract C1: the CPU kernel raises on a bad id at once
  check_forward_args(ids, weight, out, noise, tok_mag, symmetric);
  check_seed_tensor(seed_tensor, weight);
  const bool has_scale = embed_scale != 1.0;
  TORCH_CHECK(weight.device().is_cpu(), "fastnoise: CPU kernel got a non-CPU weight");
  if (seed_tensor.has_value()) {
    // a CPU tensor here: read on the host; its uint64 bits override seed, offset 0
    seed = *seed_tensor->const_data_ptr<int64_t>();
    offset = 0;
  }
  const int64_t n = ids.numel();
  const int64_t V = weight.size(0);
  const int64_t d = weight.size(1);
  if (n == 0 || d == 0) return;
  const float* tm = tok_mag.has_value() ? tok_mag->data_ptr<float>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastnoise_embedding_forward_cpu", [&] {
    const index_t* ip = ids.data_ptr<index_t>();
    check_ids_in_range(ip, n, V);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "fastnoise_embedding_forward_cpu", [&] {
          const scalar_t* wp = weight.const_data_ptr<scalar_t>();
          scalar_t* op = out.data_ptr<scalar_t>();
          const float m = static_cast<float>(mag);
          if (has_scale) {
            forward_kernel<scalar_t, index_t, true>(ip, n, wp, weight.stride(0), op, d, noise,
                                                    m, tm, as_u64(seed), as_u64(offset),
                                                    symmetric, embed_scale);
          } else {
            forward_kernel<scalar_t, index_t, false>(ip, n, wp, weight.stride(0), op, d, noise,
                                                     m, tm, as_u64(seed), as_u64(offset),
                                                     symmetric, 1.0);
          }
        });
  });
}

// Deterministic backward: a stable counting sort of the token positions by id, then each
// vocabulary row sums its tokens' gradients in token order (fp32), in parallel over rows.
// The summation order is that of the reference's index_add_ on CPU. HAS_SCALE: each fp32
// token row (the pair's two halves summed first) is multiplied by float32(embed_scale)
// before it is accumulated, as in the reference.
template <typename scalar_t, bool HAS_SCALE>
void backward_kernel(const scalar_t* g, int64_t n, int64_t d, bool symmetric,
                     const std::vector<int64_t>& start, const std::vector<int64_t>& order,
                     int64_t num_weights, int64_t padding, float es, scalar_t* grad) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
  at::parallel_for(0, num_weights, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(d));
    float* a = acc.data();
    for (int64_t v = begin; v < end; ++v) {
      const int64_t s = start[v], e = start[v + 1];
      if (s == e || v == padding) continue;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = s; k < e; ++k) {
        const scalar_t* row = g + order[k] * d;
        if constexpr (HAS_SCALE) {
          if (symmetric) {
            const scalar_t* row2 = g + (order[k] + n) * d;
            for (int64_t j = 0; j < d; ++j) {
              a[j] += (static_cast<float>(row[j]) + static_cast<float>(row2[j])) * es;
            }
          } else {
            for (int64_t j = 0; j < d; ++j) a[j] += static_cast<float>(row[j]) * es;
          }
        } else {
          (void)es;
          if (symmetric) {
            const scalar_t* row2 = g + (order[k] + n) * d;
            for (int64_t j = 0; j < d; ++j) {
              a[j] += static_cast<float>(row[j]) + static_cast<float>(row2[j]);
            }
          } else {
            for (int64_t j = 0; j < d; ++j) a[j] += static_cast<float>(row[j]);
          }
        }
      }
      scalar_t* out = grad + v * d;
      for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(a[j]);
    }
  });
}

at::Tensor embedding_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids,
                                  int64_t num_weights, std::optional<int64_t> padding_idx,
                                  bool symmetric, bool deterministic, double embed_scale) {
  (void)deterministic;  // the CPU kernel is always deterministic
  check_backward_args(grad_out, ids, num_weights, symmetric);
  TORCH_CHECK(grad_out.device().is_cpu(), "fastnoise: CPU kernel got a non-CPU grad_out");
  const int64_t n = ids.numel();
  const int64_t d = grad_out.size(1);
  at::Tensor grad = at::zeros({num_weights, d}, grad_out.options());
  if (n == 0 || d == 0 || num_weights == 0) return grad;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor idc = ids.contiguous();
  std::vector<int64_t> start(static_cast<size_t>(num_weights + 1), 0);
  std::vector<int64_t> order(static_cast<size_t>(n));
  AT_DISPATCH_INDEX_TYPES(idc.scalar_type(), "fastnoise_embedding_backward_cpu", [&] {
    const index_t* ip = idc.const_data_ptr<index_t>();
    check_ids_in_range(ip, n, num_weights);
    for (int64_t r = 0; r < n; ++r) ++start[static_cast<int64_t>(ip[r]) + 1];
    for (int64_t v = 0; v < num_weights; ++v) start[v + 1] += start[v];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < n; ++r) order[fill[static_cast<int64_t>(ip[r])]++] = r;
  });
  const int64_t padding = normalize_padding_idx(padding_idx, num_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "fastnoise_embedding_backward_cpu", [&] {
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        if (embed_scale != 1.0) {
          backward_kernel<scalar_t, true>(gp, n, d, symmetric, start, order, num_weights,
                                          padding, static_cast<float>(embed_scale), out);
        } else {
          backward_kernel<scalar_t, false>(gp, n, d, symmetric, start, order, num_weights,
                                           padding, 1.0f, out);
        }
      });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CPU, m) {
  m.impl("embedding_forward", &fastnoise::cpu::embedding_forward_cpu);
  m.impl("embedding_backward", &fastnoise::cpu::embedding_backward_cpu);
}
