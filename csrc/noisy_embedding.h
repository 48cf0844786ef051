// The user-facing op `fastnoise::noisy_embedding` (and its gradient op): what every device's
// implementation shares on the host. One call does everything a training step needs: the
// shape of the output, the scale (alpha / sqrt(L * d), or per token for a mask or packed
// rows), the seed (drawn from torch's generator without a Python round trip), the lookup and
// the noise; its autograd formula is registered in C++ (csrc/autograd.cpp), so a call from
// Python costs one dispatch. See fastnoise/reference.py for every rule followed here.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

namespace fastnoise {

// The per-token scale's inputs, checked (common to every device).
struct Packing {
  const at::Tensor* mask = nullptr;       // attention_mask, shaped like ids (nonzero = keep)
  const at::Tensor* positions = nullptr;  // position_ids, shaped like ids
  const at::Tensor* cu = nullptr;         // cu_seqlens, 1-D boundaries over the flat ids
  bool any() const { return mask != nullptr || positions != nullptr || cu != nullptr; }
};

// Error codes of the device error buffer (contract C1 in fastnoise/reference.py).
constexpr int64_t kBadId = 1, kBadCuSeqlens = 2, kBadPositionIds = 3;

// mag = float32(alpha / sqrt(count * d)) computed in float64 (0 when count * d == 0): the
// reference's noise_scale and token_scale.
FASTNOISE_HD float scale_of(double alpha, int64_t count, int64_t d) {
  if (count <= 0 || d <= 0) return 0.0f;
  return static_cast<float>(alpha / sqrt(static_cast<double>(count) * static_cast<double>(d)));
}

// embed_scale rounded to the weight's dtype, as the model's own scaled embedding holds it
// (reference.round_to_dtype: through float32 first).
inline double round_embed_scale(double s, at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return s;
    case at::kHalf: return static_cast<float>(c10::Half(static_cast<float>(s)));
    case at::kBFloat16: return static_cast<float>(c10::BFloat16(static_cast<float>(s)));
    default: return static_cast<float>(s);
  }
}

// L: the last dim of the ids (1 for a 0-d tensor).
inline int64_t row_length(const at::Tensor& ids) { return ids.dim() > 0 ? ids.size(-1) : 1; }

// (*ids.shape, d), or (2 * ids.shape[0], *ids.shape[1:], d) for a symmetric pair.
inline std::vector<int64_t> output_shape(const at::Tensor& ids, int64_t d, bool symmetric) {
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  if (symmetric) shape[0] *= 2;
  shape.push_back(d);
  return shape;
}

inline bool is_index_like(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/true);
}

// The op's arguments (metadata only: no device data is read). Raises TypeError / ValueError
// with the frontend's messages, so direct op calls get the same errors.
inline Packing check_noisy_embedding_args(const at::Tensor& weight, const at::Tensor& ids,
                                          const std::optional<at::Tensor>& attention_mask,
                                          const std::optional<at::Tensor>& position_ids,
                                          const std::optional<at::Tensor>& cu_seqlens,
                                          int64_t noise, double alpha, bool symmetric,
                                          int64_t padding_idx) {
  TORCH_CHECK_VALUE(noise == kUniform || noise == kGaussian || noise == kBernoulli,
                    "fastnoise: noise code must be 0 (uniform), 1 (gaussian) or 2 (bernoulli), "
                    "got ", noise);
  TORCH_CHECK_TYPE(weight.is_floating_point(), "fastnoise: weight must be floating point, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "fastnoise: weight must be 2-D (num_embeddings, "
                    "embedding_dim), got shape ", weight.sizes());
  TORCH_CHECK_TYPE(supported_float(weight.scalar_type()),
                   "fastnoise: weight dtype must be float32, float16, bfloat16 or float64, got ",
                   weight.scalar_type());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "fastnoise: input ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == weight.device(), "fastnoise: input is on ", ids.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, "fastnoise: alpha must be finite and "
                    ">= 0, got ", alpha);
  TORCH_CHECK_VALUE(!symmetric || ids.dim() > 0,
                    "fastnoise: symmetric=True needs at least one dimension to double");
  TORCH_CHECK_VALUE(padding_idx >= -1 && padding_idx < weight.size(0),
                    "fastnoise: padding_idx must be -1 (none) or in [0, ", weight.size(0),
                    "), got ", padding_idx);
  Packing packing;
  auto like_ids = [&](const std::optional<at::Tensor>& t, const char* name) -> const at::Tensor* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK_VALUE(t->sizes() == ids.sizes(), "fastnoise: ", name,
                      " must have the shape of input ", ids.sizes(), ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == ids.device(), "fastnoise: ", name, " is on ", t->device(),
                      ", input on ", ids.device());
    TORCH_CHECK_TYPE(is_index_like(t->scalar_type()), "fastnoise: ", name,
                     " must be bool or integer, got ", t->scalar_type());
    return &*t;
  };
  packing.mask = like_ids(attention_mask, "attention_mask");
  packing.positions = like_ids(position_ids, "position_ids");
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(packing.positions == nullptr, "fastnoise: pass position_ids or cu_seqlens, "
                      "not both: each defines the packed sequences");
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1 &&
                          at::isIntegralType(cu.scalar_type(), /*includeBool=*/false),
                      "fastnoise: cu_seqlens must be a 1-D integer tensor of sequence "
                      "boundaries [0, len_0, len_0 + len_1, ..., input.numel()]");
    TORCH_CHECK_VALUE(cu.device() == ids.device(), "fastnoise: cu_seqlens is on ", cu.device(),
                      ", input on ", ids.device());
    packing.cu = &cu;
  }
  return packing;
}

// fastnoise::noisy_embedding_backward's arguments: grad_out shaped like the op's output.
inline void check_noisy_embedding_backward_args(const at::Tensor& grad_out, const at::Tensor& ids,
                                                int64_t num_weights, bool symmetric) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "fastnoise: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_TYPE(supported_float(grad_out.scalar_type()),
                   "fastnoise: grad_out must be float32, float16, bfloat16 or float64, got ",
                   grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == ids.dim() + 1,
                    "fastnoise: grad_out must have the output's shape (*ids.shape, d), got ",
                    grad_out.sizes(), " for ids of shape ", ids.sizes());
  const int64_t rows = grad_out.numel() == 0 || grad_out.size(-1) == 0
                           ? -1 : grad_out.numel() / grad_out.size(-1);
  TORCH_CHECK_VALUE(rows < 0 || rows == (symmetric ? 2 : 1) * ids.numel(),
                    "fastnoise: grad_out must have ", symmetric ? "2 x " : "", "the ",
                    ids.numel(), " tokens' rows, got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(num_weights >= 0, "fastnoise: num_weights must be >= 0, got ", num_weights);
  TORCH_CHECK_VALUE(ids.device() == grad_out.device(), "fastnoise: ids are on ", ids.device(),
                    ", grad_out on ", grad_out.device());
}

// The weight with contiguous rows (stride(1) == 1), as the kernels read it.
inline at::Tensor row_contiguous(const at::Tensor& weight) {
  return weight.size(1) <= 1 || weight.stride(1) == 1 ? weight : weight.contiguous();
}

// What every device's implementation of noisy_embedding starts from: the checked packing
// inputs, the weight with contiguous rows, the flat contiguous ids and the output allocated
// in its final shape (empty when there are no tokens or d == 0: nothing to launch).
struct PreparedCall {
  Packing packing;
  at::Tensor weight, ids, out;
  int64_t n = 0, d = 0, row = 1;
  bool empty() const { return n == 0 || d == 0; }
};

inline PreparedCall prepare_call(const at::Tensor& weight, const at::Tensor& ids,
                                 const std::optional<at::Tensor>& attention_mask,
                                 const std::optional<at::Tensor>& position_ids,
                                 const std::optional<at::Tensor>& cu_seqlens, int64_t noise,
                                 double alpha, bool symmetric, int64_t padding_idx) {
  PreparedCall p;
  p.packing = check_noisy_embedding_args(weight, ids, attention_mask, position_ids, cu_seqlens,
                                         noise, alpha, symmetric, padding_idx);
  p.weight = row_contiguous(weight);
  p.ids = ids.reshape({-1}).contiguous();
  p.n = p.ids.numel();
  p.d = p.weight.size(1);
  p.row = row_length(ids);
  p.out = at::empty(output_shape(ids, p.d, symmetric), p.weight.options());
  return p;
}

// noisy_embedding_backward's grad_out as (rows, d) (rows given, not -1: with d == 0 they could
// not be inferred) and padding_idx as the kernels take it.
inline at::Tensor grad_rows(const at::Tensor& grad_out, const at::Tensor& ids, bool symmetric) {
  return grad_out.reshape({(symmetric ? 2 : 1) * ids.numel(), grad_out.size(-1)});
}

inline std::optional<int64_t> optional_padding(int64_t padding_idx) {
  return padding_idx < 0 ? std::nullopt : std::optional<int64_t>(padding_idx);
}

// The error buffer (int64 (4,), contract C1) the kernels record into on `device`: the one
// fastnoise.errors registered through `fastnoise::set_error_buffer`, made outside any CUDA
// graph capture. Raises when none was registered.
at::Tensor registered_error_buffer(const c10::Device& device);

}  // namespace fastnoise
