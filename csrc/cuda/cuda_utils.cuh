// Small CUDA host helpers of the .cu files that need only c10/core headers and the CUDA runtime
// (no c10/cuda or ATen/cuda headers: the CPU torch wheel does not ship all of those, and the CI
// nvcc compile check builds these files against a CPU wheel). What the kernels themselves use
// is in device_utils.cuh (shared with the host emulator of tests/cuda_emu).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"

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

}  // namespace cuda
}  // namespace fastnoise
