// Autograd of fastnoise::noisy_embedding and fastnoise::noisy_embedding_backward, in C++ (as
// torchvision registers its ops' Autograd kernels): a call from Python is one dispatch, on
// every device. The weight's gradient is noisy_embedding_backward; that op's own gradient (a
// double backward) is a gather of rows. The ids and the other inputs get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/index_select.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "noisy_embedding.h"

namespace fastnoise {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& weight, const at::Tensor& ids,
                        const std::optional<at::Tensor>& attention_mask,
                        const std::optional<at::Tensor>& position_ids,
                        const std::optional<at::Tensor>& cu_seqlens, int64_t noise, double alpha,
                        int64_t seed, int64_t offset, bool draw_seed, bool symmetric,
                        int64_t padding_idx, double embed_scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastnoise::noisy_embedding", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            int64_t, double, int64_t, int64_t, bool, bool, int64_t, double)>();
  return op.call(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha, seed,
                 offset, draw_seed, symmetric, padding_idx, embed_scale);
}

at::Tensor call_backward(const at::Tensor& grad_out, const at::Tensor& ids, int64_t num_weights,
                         int64_t padding_idx, bool symmetric, double embed_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastnoise::noisy_embedding_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         bool, double)>();
  return op.call(grad_out, ids, num_weights, padding_idx, symmetric, embed_scale);
}

// d(grad_weight)/d(grad_out) applied to a grad of grad_weight: the rows of the ids (zero for
// padding_idx), times embed_scale (rounded to the dtype, as the forward does), both halves
// of a pair; shaped like grad_out (from the ids' symbolic sizes: no size is specialized
// when torch.compile traces it).
at::Tensor gather_rows(const at::Tensor& grad_grad_weight, const at::Tensor& ids,
                       int64_t padding_idx, bool symmetric, double embed_scale) {
  const at::Tensor flat = ids.reshape({-1});
  at::Tensor rows = grad_grad_weight.index_select(0, flat);
  if (padding_idx >= 0) {
    rows = at::mul(rows, flat.ne(padding_idx).unsqueeze(-1).to(rows.scalar_type()));
  }
  const double es = round_embed_scale(embed_scale, grad_grad_weight.scalar_type());
  if (es != 1.0) rows = at::mul(rows, es);
  std::vector<c10::SymInt> shape(ids.sym_sizes().begin(), ids.sym_sizes().end());
  if (symmetric) {
    rows = at::cat({rows, rows});
    shape[0] = shape[0] * 2;
  }
  shape.push_back(grad_grad_weight.sym_size(1));
  return rows.reshape_symint(shape);
}

class NoisyEmbeddingBackwardFunction
    : public torch::autograd::Function<NoisyEmbeddingBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out,
                            const at::Tensor& ids, int64_t num_weights, int64_t padding_idx,
                            bool symmetric, double embed_scale) {
    ctx->save_for_backward({ids});
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["symmetric"] = symmetric;
    ctx->saved_data["embed_scale"] = embed_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(grad_out, ids, num_weights, padding_idx, symmetric, embed_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids = ctx->get_saved_variables()[0];
    at::Tensor grad_grad_out =
        gather_rows(grads[0], ids, ctx->saved_data["padding_idx"].toInt(),
                    ctx->saved_data["symmetric"].toBool(),
                    ctx->saved_data["embed_scale"].toDouble());
    return {grad_grad_out, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class NoisyEmbeddingFunction : public torch::autograd::Function<NoisyEmbeddingFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& ids,
                            const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& position_ids,
                            const std::optional<at::Tensor>& cu_seqlens, int64_t noise,
                            double alpha, int64_t seed, int64_t offset, bool draw_seed,
                            bool symmetric, int64_t padding_idx, double embed_scale) {
    ctx->save_for_backward({ids});
    ctx->saved_data["num_weights"] = weight.size(0);
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["symmetric"] = symmetric;
    ctx->saved_data["embed_scale"] = embed_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha, seed,
                        offset, draw_seed, symmetric, padding_idx, embed_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids = ctx->get_saved_variables()[0];
    at::Tensor grad_weight;
    if (ctx->needs_input_grad(0)) {
      // through the dispatcher (not below autograd): differentiable for a double backward
      grad_weight = NoisyEmbeddingBackwardFunction::apply(
          grads[0], ids, ctx->saved_data["num_weights"].toInt(),
          ctx->saved_data["padding_idx"].toInt(), ctx->saved_data["symmetric"].toBool(),
          ctx->saved_data["embed_scale"].toDouble());
    }
    variable_list result(13);
    result[0] = grad_weight;
    return result;
  }
};

at::Tensor noisy_embedding_autograd(const at::Tensor& weight, const at::Tensor& ids,
                                    const std::optional<at::Tensor>& attention_mask,
                                    const std::optional<at::Tensor>& position_ids,
                                    const std::optional<at::Tensor>& cu_seqlens, int64_t noise,
                                    double alpha, int64_t seed, int64_t offset, bool draw_seed,
                                    bool symmetric, int64_t padding_idx, double embed_scale) {
  return NoisyEmbeddingFunction::apply(weight, ids, attention_mask, position_ids, cu_seqlens,
                                       noise, alpha, seed, offset, draw_seed, symmetric,
                                       padding_idx, embed_scale);
}

at::Tensor noisy_embedding_backward_autograd(const at::Tensor& grad_out, const at::Tensor& ids,
                                             int64_t num_weights, int64_t padding_idx,
                                             bool symmetric, double embed_scale) {
  return NoisyEmbeddingBackwardFunction::apply(grad_out, ids, num_weights, padding_idx,
                                               symmetric, embed_scale);
}

}  // namespace
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, Autograd, m) {
  m.impl("noisy_embedding", &fastnoise::noisy_embedding_autograd);
  m.impl("noisy_embedding_backward", &fastnoise::noisy_embedding_backward_autograd);
}
