// Host-side helpers shared by the CPU and CUDA op implementations (argument checks).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>

#include "noise.h"

namespace fastnoise {

inline int64_t elements_per_counter(int64_t kind) { return kind == kBernoulli ? 128 : 4; }

inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Checks of embedding_forward's arguments common to every device.
inline void check_forward_args(const at::Tensor& ids, const at::Tensor& weight,
                               const at::Tensor& out, int64_t noise,
                               const std::optional<at::Tensor>& tok_mag, bool symmetric) {
  TORCH_CHECK(noise == kUniform || noise == kGaussian || noise == kBernoulli,
              "fastnoise: noise code must be 0 (uniform), 1 (gaussian) or 2 (bernoulli), got ",
              noise);
  TORCH_CHECK(ids.dim() == 1, "fastnoise: ids must be 1-D (flattened), got ", ids.dim(), "-D");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "fastnoise: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "fastnoise: ids must be contiguous");
  TORCH_CHECK(weight.dim() == 2, "fastnoise: weight must be 2-D (V, d)");
  TORCH_CHECK(supported_float(weight.scalar_type()),
              "fastnoise: weight dtype must be float32, float16, bfloat16 or float64, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) <= 1 || weight.stride(1) == 1,
              "fastnoise: weight rows must be contiguous (stride(1) == 1)");
  const int64_t n = ids.numel();
  const int64_t d = weight.size(1);
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(), "fastnoise: out dtype ",
              out.scalar_type(), " != weight dtype ", weight.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == (symmetric ? 2 * n : n) && out.size(1) == d,
              "fastnoise: out must have shape (", symmetric ? 2 * n : n, ", ", d, "), got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "fastnoise: out must be contiguous");
  TORCH_CHECK(ids.device() == weight.device() && out.device() == weight.device(),
              "fastnoise: ids, weight and out must be on the same device");
  if (tok_mag.has_value()) {
    const at::Tensor& t = *tok_mag;
    TORCH_CHECK(t.scalar_type() == at::kFloat, "fastnoise: tok_mag must be float32");
    TORCH_CHECK(t.numel() == n, "fastnoise: tok_mag must have one entry per token (", n,
                "), got ", t.numel());
    TORCH_CHECK(t.is_contiguous(), "fastnoise: tok_mag must be contiguous");
    TORCH_CHECK(t.device() == weight.device(), "fastnoise: tok_mag on the wrong device");
  }
}

// seed_tensor of embedding_forward: an int64 tensor of one element on the weight's device.
inline void check_seed_tensor(const std::optional<at::Tensor>& seed_tensor,
                              const at::Tensor& weight) {
  if (!seed_tensor.has_value()) return;
  const at::Tensor& t = *seed_tensor;
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastnoise: seed_tensor must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 1, "fastnoise: seed_tensor must have one element (shape (1,)), got ",
              t.sizes());
  TORCH_CHECK(t.device() == weight.device(), "fastnoise: seed_tensor is on ", t.device(),
              ", the weight on ", weight.device());
}

// error of embedding_forward (contract C1): an int64 tensor of 4 elements, contiguous, on the
// weight's device. Kernels that cannot raise record a bad id there.
inline void check_error_buffer(const std::optional<at::Tensor>& error, const at::Tensor& weight) {
  if (!error.has_value()) return;
  const at::Tensor& t = *error;
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastnoise: error must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 4, "fastnoise: error must have 4 elements (shape (4,)), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastnoise: error must be contiguous");
  TORCH_CHECK(t.device() == weight.device(), "fastnoise: error is on ", t.device(),
              ", the weight on ", weight.device());
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& ids,
                                int64_t num_weights, bool symmetric) {
  TORCH_CHECK(ids.dim() == 1, "fastnoise: ids must be 1-D (flattened), got ", ids.dim(), "-D");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "fastnoise: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "fastnoise: ids must be contiguous");
  TORCH_CHECK(grad_out.dim() == 2, "fastnoise: grad_out must be 2-D (rows, d)");
  TORCH_CHECK(supported_float(grad_out.scalar_type()),
              "fastnoise: grad_out dtype must be floating, got ", grad_out.scalar_type());
  const int64_t n = ids.numel();
  TORCH_CHECK(grad_out.size(0) == (symmetric ? 2 * n : n), "fastnoise: grad_out has ",
              grad_out.size(0), " rows, expected ", symmetric ? 2 * n : n);
  TORCH_CHECK(num_weights >= 0, "fastnoise: num_weights must be >= 0");
  TORCH_CHECK(ids.device() == grad_out.device(),
              "fastnoise: ids and grad_out must be on the same device");
}

// noisytune_'s list arguments: one start counter (and one given std, C5) per tensor; tensors
// contiguous, floating, on one device.
inline void check_noisytune_args(at::TensorList tensors, at::IntArrayRef starts,
                                 const std::optional<at::ArrayRef<double>>& stds) {
  TORCH_CHECK(tensors.size() == starts.size(), "fastnoise: noisytune_ got ", tensors.size(),
              " tensors but ", starts.size(), " start counters");
  TORCH_CHECK(!stds.has_value() || stds->size() == tensors.size(), "fastnoise: noisytune_ got ",
              tensors.size(), " tensors but ", stds.has_value() ? stds->size() : 0, " stds");
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device() == tensors[0].device(),
                "fastnoise: noisytune_ tensors must share one device (", tensors[0].device(),
                " vs ", t.device(), ")");
    TORCH_CHECK(t.is_contiguous(), "fastnoise: noisytune_ needs contiguous tensors");
    TORCH_CHECK(supported_float(t.scalar_type()),
                "fastnoise: noisytune_ needs float32, float16, bfloat16 or float64 tensors, got ",
                t.scalar_type());
  }
}

// padding_idx normalised to [0, V), or -1 for none.
inline int64_t normalize_padding_idx(const std::optional<int64_t>& padding_idx,
                                     int64_t num_weights) {
  if (!padding_idx.has_value()) return -1;
  int64_t p = *padding_idx;
  if (p < 0) p += num_weights;
  return (p >= 0 && p < num_weights) ? p : -1;
}

}  // namespace fastnoise
