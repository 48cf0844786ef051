// CPU kernels of the fused noisy embedding (forward) and its weight gradient (backward).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common.h"
#include "../noisy_embedding.h"
#include "noise_fill.h"

namespace fastnoise {
namespace cpu {
namespace {

// A (V, d) gradient is far above malloc's mmap threshold: fresh pages every call, one page
// fault per 4 KiB on first write (32000 faults, ~90 % of the backward at V=32000 d=1024).
// Where transparent huge pages are "madvise"-only, ask for them on the 2 MiB-aligned interior
// of a buffer this op allocated itself (what torch's allocator does under
// THP_MEM_ALLOC_ENABLE=1): 2 MiB faults instead. Advisory only: the contents are unchanged,
// nothing outside [p, p + nbytes) is touched, and a failure changes nothing.
void advise_huge_pages(void* p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)nbytes;
#endif
}

template <typename index_t>
void check_ids_in_range(const index_t* ids, int64_t n, int64_t num_weights) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t id = static_cast<int64_t>(ids[r]);
    TORCH_CHECK_INDEX(id >= 0 && id < num_weights, "fastnoise: token id ", id, " (ids[", r,
                      "]) is out of range [0, ", num_weights, ")");
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
  const int64_t G = (d + elements_per_counter(kind) - 1) / elements_per_counter(kind);
  const CpuKernels& kernels = cpu_kernels();
  // rows per task: no parallel region for less than at::internal::GRAIN_SIZE elements (32 K):
  // below that, waking the pool (or waiting on a busy core) costs more than the work
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> noise(static_cast<size_t>(fill_buffer_len(d)));
    float* xp = noise.data();
    for (int64_t r = begin; r < end; ++r) {
      const float m = tok_mag != nullptr ? tok_mag[r] : mag;
      const uint64_t first_counter = offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(G);
      const scalar_t* e = weight + static_cast<int64_t>(ids[r]) * w_stride;
      // No software prefetch of the next token's row: 64 prefetches per 4 KiB row took the
      // fill buffers from the stores and made the ±1 row 13 % slower (bench/RESULTS.md).
      scalar_t* o = out + r * d;
      if constexpr (!HAS_SCALE && std::is_same_v<scalar_t, float>) {
        (void)es;
        kernels.noisy_row_f32(static_cast<int>(kind), first_counter, d, seed, m, e, o,
                              symmetric ? out + (n + r) * d : nullptr, xp);
      } else {
        // xp[j] = xi_j * m (the noise n, rounded once)
        kernels.fill_noise(static_cast<int>(kind), first_counter, d, seed, m, xp);
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
    }
  });
}

// The lookup + noise of the flat ids (checked by the caller) into `out` (n or 2n rows of d).
void run_forward(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& out,
                 int64_t noise, float mag, const float* tok_mag, uint64_t seed, uint64_t offset,
                 bool symmetric, double embed_scale) {
  const int64_t n = ids.numel();
  const int64_t V = weight.size(0);
  const int64_t d = weight.size(1);
  if (n == 0 || d == 0) return;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastnoise_embedding_forward_cpu", [&] {
    const index_t* ip = ids.const_data_ptr<index_t>();
    check_ids_in_range(ip, n, V);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "fastnoise_embedding_forward_cpu", [&] {
          const scalar_t* wp = weight.const_data_ptr<scalar_t>();
          scalar_t* op = out.data_ptr<scalar_t>();
          if (embed_scale != 1.0) {
            forward_kernel<scalar_t, index_t, true>(ip, n, wp, weight.stride(0), op, d, noise,
                                                    mag, tok_mag, seed, offset, symmetric,
                                                    embed_scale);
          } else {
            forward_kernel<scalar_t, index_t, false>(ip, n, wp, weight.stride(0), op, d, noise,
                                                     mag, tok_mag, seed, offset, symmetric, 1.0);
          }
        });
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
  TORCH_CHECK(weight.device().is_cpu(), "fastnoise: CPU kernel got a non-CPU weight");
  if (seed_tensor.has_value()) {
    // a CPU tensor here: read on the host; its uint64 bits override seed, offset 0
    seed = *seed_tensor->const_data_ptr<int64_t>();
    offset = 0;
  }
  run_forward(ids, weight, out, noise, static_cast<float>(mag),
              tok_mag.has_value() ? tok_mag->const_data_ptr<float>() : nullptr, as_u64(seed),
              as_u64(offset), symmetric, embed_scale);
}

// ---------------------------------------------------------------------------------------
// The user-facing op fastnoise::noisy_embedding on the CPU
// ---------------------------------------------------------------------------------------
// The values of an integer or bool tensor, as int64 (small: the ids' mask or packing).
std::vector<int64_t> int64_values(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<int64_t> values(static_cast<size_t>(c.numel()));
  AT_DISPATCH_V2(c.scalar_type(), "fastnoise_int64_values", AT_WRAP([&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<int64_t>(p[i]);
  }), AT_EXPAND(AT_INTEGRAL_TYPES), at::kBool, AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES));
  return values;
}

// C1: the first error since the last report is kept.
void record_error(const at::Tensor& error, int64_t code, int64_t value, int64_t bound) {
  int64_t* e = error.data_ptr<int64_t>();
  if (e[0] != 0) return;
  e[1] = value;
  e[2] = bound;
  e[0] = code;
}

// reference.token_scale: each token's mag, alpha / sqrt(L * d) with L its sequence's count of
// kept tokens; masked tokens 0; every token NaN (and the error recorded) when the packing
// inputs are invalid.
void token_scale_cpu(const Packing& packing, int64_t n, int64_t row, int64_t d, double alpha,
                     float* mag, const at::Tensor& error) {
  std::vector<int64_t> keep = packing.mask ? int64_values(*packing.mask) : std::vector<int64_t>();
  // boundaries b_0 = 0 < ... <= b_S = n: sequence k is the tokens [b_k, b_k+1)
  std::vector<int64_t> bounds;
  bool valid = true;
  int64_t code = 0;
  if (packing.cu != nullptr) {
    bounds = int64_values(*packing.cu);
    valid = bounds.front() == 0 && bounds.back() == n;
    for (size_t k = 1; k < bounds.size() && valid; ++k) valid = bounds[k] >= bounds[k - 1];
    code = kBadCuSeqlens;
  } else {
    std::vector<int64_t> pos = packing.positions ? int64_values(*packing.positions)
                                                 : std::vector<int64_t>();
    for (int64_t t = 0; t < n; ++t) {
      if (t % row == 0 || (!pos.empty() && pos[t] == 0)) bounds.push_back(t);
      if (!pos.empty() && pos[t] < 0) valid = false;
    }
    bounds.push_back(n);
    code = kBadPositionIds;
  }
  if (!valid) {
    std::fill(mag, mag + n, std::numeric_limits<float>::quiet_NaN());
    record_error(error, code, 0, n);
    return;
  }
  for (size_t k = 0; k + 1 < bounds.size(); ++k) {
    const int64_t b = bounds[k], e = bounds[k + 1];
    int64_t count = e - b;
    if (!keep.empty()) count = std::count_if(keep.begin() + b, keep.begin() + e,
                                             [](int64_t v) { return v != 0; });
    const float m = scale_of(alpha, count, d);
    for (int64_t t = b; t < e; ++t) mag[t] = keep.empty() || keep[t] != 0 ? m : 0.0f;
  }
}

// What torch.randint(0, 2**63 - 1, ()) gives from the default CPU generator (seeds.draw_seed):
// the same draw, so every backend gets the same seed from the same generator state.
uint64_t draw_cpu_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64() % ((uint64_t{1} << 63) - 1);
}

at::Tensor noisy_embedding_cpu(const at::Tensor& weight_in, const at::Tensor& ids_in,
                               const std::optional<at::Tensor>& attention_mask,
                               const std::optional<at::Tensor>& position_ids,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t noise,
                               double alpha, int64_t seed, int64_t offset, bool draw_seed,
                               bool symmetric, int64_t padding_idx, double embed_scale) {
  const PreparedCall p = prepare_call(weight_in, ids_in, attention_mask, position_ids, cu_seqlens,
                                      noise, alpha, symmetric, padding_idx);
  if (p.empty()) return p.out;
  uint64_t s = as_u64(seed), o = as_u64(offset);
  if (draw_seed) {  // `seed` is then what the drawn seed is XORed with (rank-distinct noise)
    s = draw_cpu_seed() ^ s;
    o = 0;
  }
  std::vector<float> tok_mag;
  if (p.packing.any()) {
    tok_mag.resize(static_cast<size_t>(p.n));
    token_scale_cpu(p.packing, p.n, p.row, p.d, alpha, tok_mag.data(),
                    registered_error_buffer(p.weight.device()));
  }
  run_forward(p.ids, p.weight, p.out.view({-1, p.d}), noise, scale_of(alpha, p.row, p.d),
              tok_mag.empty() ? nullptr : tok_mag.data(), s, o, symmetric,
              round_embed_scale(embed_scale, p.weight.scalar_type()));
  return p.out;
}

// Deterministic backward: a stable counting sort of the token positions by id, then each
// vocabulary row sums its tokens' gradients in token order, in parallel over rows, in
// float32 (float64 for float64 grads: contract C3). The summation order is that of the
// reference's index_add_ on CPU. HAS_SCALE: each token row (the pair's two halves summed
// first) is multiplied by embed_scale (in the accumulation type) before it is accumulated,
// as in the reference.
template <typename scalar_t, bool HAS_SCALE>
void backward_kernel(const scalar_t* g, int64_t n, int64_t d, bool symmetric,
                     const std::vector<int64_t>& start, const std::vector<int64_t>& order,
                     int64_t num_weights, int64_t padding, double embed_scale, scalar_t* grad) {
  using acc_t = typename AddType<scalar_t>::type;  // float, or double for double grads
  const acc_t es = static_cast<acc_t>(embed_scale);
  // vocabulary rows per task: at least at::internal::GRAIN_SIZE elements (see the forward)
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1));
  at::parallel_for(0, num_weights, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(d));
    acc_t* a = acc.data();
    for (int64_t v = begin; v < end; ++v) {
      const int64_t s = start[v], e = start[v + 1];
      scalar_t* out = grad + v * d;
      if (s == e || v == padding) {  // grad is not zeroed beforehand: every row is written
        std::fill(out, out + d, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = s; k < e; ++k) {
        const scalar_t* row = g + order[k] * d;
        if constexpr (HAS_SCALE) {
          if (symmetric) {
            const scalar_t* row2 = g + (order[k] + n) * d;
            for (int64_t j = 0; j < d; ++j) {
              a[j] += (static_cast<acc_t>(row[j]) + static_cast<acc_t>(row2[j])) * es;
            }
          } else {
            for (int64_t j = 0; j < d; ++j) a[j] += static_cast<acc_t>(row[j]) * es;
          }
        } else {
          (void)es;
          if (symmetric) {
            const scalar_t* row2 = g + (order[k] + n) * d;
            for (int64_t j = 0; j < d; ++j) {
              a[j] += static_cast<acc_t>(row[j]) + static_cast<acc_t>(row2[j]);
            }
          } else {
            for (int64_t j = 0; j < d; ++j) a[j] += static_cast<acc_t>(row[j]);
          }
        }
      }
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
  if (n == 0 || d == 0 || num_weights == 0) return at::zeros({num_weights, d}, grad_out.options());
  // Not zeroed here: the kernel writes every row once (zeros where no token points), in
  // parallel, so each page is first touched once, by the thread that fills it.
  at::Tensor grad = at::empty({num_weights, d}, grad_out.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
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
                                          padding, embed_scale, out);
        } else {
          backward_kernel<scalar_t, false>(gp, n, d, symmetric, start, order, num_weights,
                                           padding, 1.0, out);
        }
      });
  return grad;
}

// fastnoise::noisy_embedding_backward: grad_out shaped like the op's output.
at::Tensor noisy_embedding_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids,
                                        int64_t num_weights, int64_t padding_idx, bool symmetric,
                                        double embed_scale) {
  check_noisy_embedding_backward_args(grad_out, ids, num_weights, symmetric);
  return embedding_backward_cpu(grad_rows(grad_out, ids, symmetric), ids.reshape({-1}),
                                num_weights, optional_padding(padding_idx), symmetric,
                                /*deterministic=*/true,
                                round_embed_scale(embed_scale, grad_out.scalar_type()));
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CPU, m) {
  m.impl("embedding_forward", &fastnoise::cpu::embedding_forward_cpu);
  m.impl("embedding_backward", &fastnoise::cpu::embedding_backward_cpu);
  m.impl("noisy_embedding", &fastnoise::cpu::noisy_embedding_cpu);
  m.impl("noisy_embedding_backward", &fastnoise::cpu::noisy_embedding_backward_cpu);
}
