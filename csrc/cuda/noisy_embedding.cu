// fastnoise::noisy_embedding and its gradient op on CUDA: the host side of one call (checks,
// the seed from the CUDA generator, the per-token scale kernel, the forward kernel). The
// kernels are in embedding_kernels.cuh and token_scale_kernels.cuh (run on the CPU by
// tests/cuda_emu too). Nothing here reads device data on the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>  // the generator's Philox state (no c10/cuda headers)
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <mutex>

#include "../noisy_embedding.h"
#include "cuda_utils.cuh"
#include "embedding_kernels.cuh"
#include "token_scale_kernels.cuh"

namespace fastnoise {
namespace cuda {

// embedding_backward's CUDA implementation (embedding.cu)
at::Tensor embedding_backward_cuda_for_op(const at::Tensor& grad_out, const at::Tensor& ids,
                                   int64_t num_weights, std::optional<int64_t> padding_idx,
                                   bool symmetric, bool deterministic, double embed_scale);

namespace {

IntRef int_ref(const at::Tensor* t) {
  IntRef r;
  if (t == nullptr) return r;
  r.p = t->const_data_ptr();
  const at::ScalarType type = t->scalar_type();
  r.bytes = type == at::kChar ? -1 : static_cast<int>(t->element_size());
  return r;
}

// The seed (contract C4): drawn from the device's default CUDA generator, PyTorch's Philox
// state (seed, offset advanced by 4 per counter), XORed with `mask` (the rank's). Under CUDA
// graph capture the state is device memory that each replay advances: the kernel reads it.
SeedArg draw_cuda_seed(const c10::Device& device, uint64_t counters, uint64_t mask) {
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(device.index());
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_cuda_state(4 * counters);
  }
  SeedArg sa;
  if (state.captured_) {
    sa.seed_ptr = reinterpret_cast<const int64_t*>(state.seed_.ptr);
    sa.offset_ptr = reinterpret_cast<const int64_t*>(state.offset_.ptr);
    sa.offset_add = state.offset_intragraph_;
    sa.xor_mask = mask;
  } else {
    sa.seed = state.seed_.val ^ mask;
    sa.offset = state.offset_.val / 4;
  }
  return sa;
}

at::Tensor noisy_embedding_cuda(const at::Tensor& weight_in, const at::Tensor& ids_in,
                                const std::optional<at::Tensor>& attention_mask,
                                const std::optional<at::Tensor>& position_ids,
                                const std::optional<at::Tensor>& cu_seqlens, int64_t noise,
                                double alpha, int64_t seed, int64_t offset, bool draw_seed,
                                bool symmetric, int64_t padding_idx, double embed_scale) {
  TORCH_CHECK(weight_in.is_cuda(), "fastnoise: CUDA kernel got a weight on ", weight_in.device());
  c10::DeviceGuard guard(weight_in.device());
  const PreparedCall p = prepare_call(weight_in, ids_in, attention_mask, position_ids, cu_seqlens,
                                      noise, alpha, symmetric, padding_idx);
  if (p.empty()) return p.out;
  const int64_t n = p.n, d = p.d, row = p.row, V = p.weight.size(0);
  const at::Tensor& weight = p.weight;
  const at::Tensor& ids = p.ids;
  const Packing& packing = p.packing;
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), "fastnoise: at most 2^31 - 1 tokens a call, got ", n);
  const at::Tensor error = registered_error_buffer(weight.device());
  cudaStream_t stream = current_stream(weight.device());
  const int sms = sm_count(weight.device().index());

  SeedArg sa;
  if (draw_seed) {
    const int64_t per = noise == kBernoulli ? 128 : 4;
    sa = draw_cuda_seed(weight.device(), static_cast<uint64_t>(n * ((d + per - 1) / per)),
                        as_u64(seed));
  } else {
    sa.seed = as_u64(seed);
    sa.offset = as_u64(offset);
  }

  at::Tensor tok_mag;
  if (packing.any()) {
    const at::Tensor mask = packing.mask ? packing.mask->contiguous() : at::Tensor();
    const at::Tensor positions = packing.positions ? packing.positions->contiguous() : at::Tensor();
    const at::Tensor cu = packing.cu ? packing.cu->contiguous() : at::Tensor();
    tok_mag = at::empty({n}, weight.options().dtype(at::kFloat));
    TokenScaleArgs a;
    a.n = n;
    a.row = row;
    a.d = d;
    a.alpha = alpha;
    a.mask = int_ref(mask.defined() ? &mask : nullptr);
    a.positions = int_ref(positions.defined() ? &positions : nullptr);
    a.cu = int_ref(cu.defined() ? &cu : nullptr);
    a.cu_len = cu.defined() ? cu.numel() : 0;
    a.mag = tok_mag.data_ptr<float>();
    at::Tensor scratch;
    if (positions.defined() || (cu.defined() && mask.defined())) {
      scratch = at::empty({positions.defined() ? n : a.cu_len}, weight.options().dtype(at::kInt));
      a.scratch = scratch.data_ptr<int32_t>();
    }
    a.error = error.data_ptr<int64_t>();
    launch_token_scale(a, stream, sms);  // scratch is freed stream-ordered (caching allocator)
  }

  const int64_t w_stride = V > 1 ? weight.stride(0) : d;
  const double es = round_embed_scale(embed_scale, weight.scalar_type());
  const float mag = scale_of(alpha, row, d);
  const float* tm = tok_mag.defined() ? tok_mag.const_data_ptr<float>() : nullptr;
  int64_t* err = error.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastnoise_noisy_embedding_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "fastnoise_noisy_embedding_cuda", [&] {
          auto launch = es != 1.0 ? launch_forward<scalar_t, index_t, true>
                                  : launch_forward<scalar_t, index_t, false>;
          launch(ids.const_data_ptr<index_t>(), n, weight.const_data_ptr<scalar_t>(), w_stride,
                 V, p.out.data_ptr<scalar_t>(), d, noise, mag, tm, sa, symmetric, es, err,
                 stream, sms);
        });
  });
  return p.out;
}

at::Tensor noisy_embedding_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids,
                                         int64_t num_weights, int64_t padding_idx,
                                         bool symmetric, double embed_scale) {
  check_noisy_embedding_backward_args(grad_out, ids, num_weights, symmetric);
  return embedding_backward_cuda_for_op(
      grad_rows(grad_out, ids, symmetric), ids.reshape({-1}), num_weights,
      optional_padding(padding_idx), symmetric, at::globalContext().deterministicAlgorithms(),
      round_embed_scale(embed_scale, grad_out.scalar_type()));
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("noisy_embedding", &fastnoise::cuda::noisy_embedding_cuda);
  m.impl("noisy_embedding_backward", &fastnoise::cuda::noisy_embedding_backward_cuda);
}
