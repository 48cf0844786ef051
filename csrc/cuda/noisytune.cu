// CUDA op of NoisyTune: argument checks, the plan's table copied to the device, the two
// launches. The kernels and the plan are in noisytune_kernels.cuh (shared with the host
// emulator of tests/cuda_emu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"
#include "noisytune_kernels.cuh"

namespace fastnoise {
namespace cuda {
namespace {

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "fastnoise: noisytune_ needs floating tensors, got ", t);
  }
}

void noisytune_cuda(at::TensorList tensors, double lam, int64_t seed, at::IntArrayRef starts,
                    std::optional<at::ArrayRef<double>> stds) {
  check_noisytune_args(tensors, starts, stds);
  if (tensors.empty()) return;
  const c10::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "fastnoise: CUDA noisytune_ got tensors on ", device);
  std::vector<NoisyTuneTensor> descs;
  descs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    descs.push_back(NoisyTuneTensor{t.numel() > 0 ? t.data_ptr() : nullptr, t.numel(),
                                    starts[i], dtype_code(t.scalar_type())});
  }
  const NoisyTunePlan plan = plan_noisytune(
      descs, lam, stds.has_value() ? stds->data() : nullptr, kStatBlockBudget);
  if (plan.tensors == 0) return;
  c10::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(device);
  at::Tensor table_host =
      at::empty({static_cast<int64_t>(plan.table.size())},
                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(plan.table.begin(), plan.table.end(), table_host.data_ptr<int64_t>());
  at::Tensor table = table_host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  at::Tensor partials = at::empty({std::max<int64_t>(1, 3 * plan.stat_blocks)},
                                  at::TensorOptions().device(device).dtype(at::kDouble));
  launch_noisytune(plan, table.data_ptr<int64_t>(), partials.data_ptr<double>(), lam,
                   as_u64(seed), stream);
}

}  // namespace
}  // namespace cuda
}  // namespace fastnoise

TORCH_LIBRARY_IMPL(fastnoise, CUDA, m) {
  m.impl("noisytune_", &fastnoise::cuda::noisytune_cuda);
}
