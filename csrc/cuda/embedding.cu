// CUDA ops of the fused noisy embedding: argument checks, device guard and stream, dtype
// dispatch. The kernels and their launch logic are in embedding_kernels.cuh (shared with the
// host emulator of tests/cuda_emu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"
#include "embedding_kernels.cuh"

namespace fastnoise {
namespace cuda {
namespace {

void embedding_forward_cuda(const at::Tensor& ids, const at::Tensor& weight,
                            const at::Tensor& out, int64_t noise, double mag,
                            const std::optional<at::Tensor>& tok_mag, int64_t seed,
                            int64_t offset, bool symmetric, double embed_scale,
                            const std::optional<at::Tensor>& seed_tensor,
                            const std::optional<at::Tensor>& error) {
  check_forward_args(ids, weight, out, noise, tok_mag, symmetric);
  check_seed_tensor(seed_tensor, weight);
  check_error_buffer(error, weight);
  TORCH_CHECK(weight.is_cuda(), "fastnoise: CUDA kernel got a weight on ", weight.device());
  const int64_t n = ids.numel();
  const int64_t d = weight.size(1);
  if (n == 0 || d == 0) return;
  c10::DeviceGuard guard(weight.device());
  cudaStream_t stream = current_stream(weight.device());
  const int sms = sm_count(weight.device().index());
  const float* tm = tok_mag.has_value() ? tok_mag->const_data_ptr<float>() : nullptr;
  // a seed_tensor is read in-kernel (no host sync): the value at launch time of each replay
  SeedArg sa;
  sa.seed = as_u64(seed);
  sa.offset = as_u64(offset);
  sa.seed_ptr = seed_tensor.has_value() ? seed_tensor->const_data_ptr<int64_t>() : nullptr;
  int64_t* err = error.has_value() ? error->data_ptr<int64_t>() : nullptr;
  const int64_t V = weight.size(0);
  const int64_t w_stride = V > 1 ? weight.stride(0) : d;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastnoise_embedding_forward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "fastnoise_embedding_forward_cuda",
        [&] {
          auto launch = embed_scale != 1.0 ? launch_forward<scalar_t, index_t, true>
                                           : launch_forward<scalar_t, index_t, false>;
          launch(ids.const_data_ptr<index_t>(), n, weight.const_data_ptr<scalar_t>(),
                 w_stride, V, out.data_ptr<scalar_t>(), d, noise, static_cast<float>(mag), tm,
                 sa, symmetric, embed_scale, err, stream, sms);
        });
  });
}

at::Tensor embedding_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids,
                                   int64_t num_weights, std::optional<int64_t> padding_idx,
                                   bool symmetric, bool deterministic, double embed_scale) {
  check_backward_args(grad_out, ids, num_weights, symmetric);
  TORCH_CHECK(grad_out.is_cuda(), "fastnoise: CUDA kernel got grad_out on ",
              grad_out.device());
  c10::DeviceGuard guard(grad_out.device());
  const int64_t n = ids.numel();
  const int64_t d = grad_out.size(1);
  const int64_t padding = normalize_padding_idx(padding_idx, num_weights);
  if (n == 0 || d == 0 || num_weights == 0) {
    return at::zeros({num_weights, d}, grad_out.options());
  }
  const at::Tensor g = grad_out.contiguous();
  cudaStream_t stream = current_stream(grad_out.device());
  // C3: float32 accumulation, float64 for float64 grads
  const at::ScalarType acc_type =
      g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // extra memory besides the (V, d) result (see embedding_kernels.cuh): the sorted path
  // 16 N bytes of sort output (+ 8 N for int32 ids cast to int64) and at::sort's O(N)
  // workspace, plus 4 d ceil(N / 32) bytes of partial sums (8 d ceil(N / 32) for float64);
  // the atomic path none
  const BackwardPlan plan = plan_backward(g.element_size(), deterministic, n);
  at::Tensor grad = at::zeros({num_weights, d}, grad_out.options());
  if (plan.sorted) {
    auto sorted_perm = at::sort(ids.to(at::kLong), /*stable=*/true, /*dim=*/0,
                                /*descending=*/false);
    const at::Tensor sorted = std::get<0>(sorted_perm).contiguous();
    const at::Tensor perm = std::get<1>(sorted_perm).contiguous();
    at::Tensor partial = at::empty({plan.partial_rows, d}, g.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, g.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
          using A = typename AddType<scalar_t>::type;
          launch_backward_sorted<scalar_t>(
              g.const_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(),
              perm.const_data_ptr<int64_t>(), n, d, num_weights, padding, symmetric,
              embed_scale, grad.data_ptr<scalar_t>(), partial.data_ptr<A>(), stream);
        });
    return grad;
  }
  // float32 / float64: atomics straight into the result (no temporary, no cast)
  const int sms = sm_count(grad_out.device().index());
  const at::Tensor idc = ids.contiguous();
  AT_DISPATCH_INDEX_TYPES(idc.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastnoise_embedding_backward_cuda", [&] {
      launch_backward_atomic<scalar_t, index_t>(
          g.const_data_ptr<scalar_t>(), idc.const_data_ptr<index_t>(), n, d, num_weights,
          padding, symmetric, embed_scale, grad.data_ptr<scalar_t>(), stream, sms);
    });
  });
  return grad;
}

}  // namespace

// For noisy_embedding.cu's gradient op.
at::Tensor embedding_backward_cuda_for_op(const at::Tensor& grad_out, const at::Tensor& ids,
                                          int64_t num_weights, std::optional<int64_t> padding_idx,
                                          bool symmetric, bool deterministic, double embed_scale) {
  return embedding_backward_cuda(grad_out, ids, num_weights, padding_idx, symmetric,
                                 deterministic, embed_scale);
}

}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("embedding_forward", &fastnoise::cuda::embedding_forward_cuda);
  m.impl("embedding_backward", &fastnoise::cuda::embedding_backward_cuda);
}
