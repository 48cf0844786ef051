// Small CUDA host helpers that need only c10/core headers and the CUDA runtime (no
// c10/cuda or ATen/cuda headers: the CPU torch wheel does not ship all of those, and the
// CI nvcc compile check builds these files against a CPU wheel).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"  // FASTNOISE_HD

#define FASTNOISE_CUDA_CHECK(expr)                                                       \
  do {                                                                                   \
    const cudaError_t fastnoise_err_ = (expr);                                           \
    TORCH_CHECK(fastnoise_err_ == cudaSuccess, "fastnoise CUDA error: ",                 \
                cudaGetErrorString(fastnoise_err_), " (", #expr, ")");                   \
  } while (0)

#define FASTNOISE_KERNEL_LAUNCH_CHECK() FASTNOISE_CUDA_CHECK(cudaGetLastError())

namespace fastnoise {
namespace cuda {

// torch's current CUDA stream on `device` (what at::cuda::getCurrentCUDAStream returns).
inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

inline int sm_count(int device) {
  static int cache[256] = {0};
  if (device < 0 || device >= 256) return 108;
  if (cache[device] == 0) {
    int n = 0;
    FASTNOISE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 108;
  }
  return cache[device];
}

// A 1-D grid of `blocks` blocks, refused past CUDA's limit (2^31 - 1) rather than truncated.
inline unsigned int grid_blocks(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= 0x7fffffff, "fastnoise: a launch of ", blocks,
              " blocks is beyond CUDA's grid limit");
  return static_cast<unsigned int>(blocks);
}

FASTNOISE_HD bool aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// A pack of N elements moved by one (or, for 32 bytes, two) vector instruction(s).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace cuda
}  // namespace fastnoise
