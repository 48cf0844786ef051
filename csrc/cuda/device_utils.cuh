// What the kernel headers (*_kernels.cuh) share, for nvcc and for the host emulator of
// tests/cuda_emu: packs, alignment, the grid limit, and FASTNOISE_LAUNCH.
//
// FASTNOISE_LAUNCH(kernel, grid, block, stream, args...) is `kernel<<<grid, block, 0,
// stream>>>(args...)` plus the launch error check under nvcc, and the emulator's launch when
// tests/cuda_emu/cuda_emu.h was included first (FASTNOISE_CUDA_EMU). `kernel` is one name
// (a template instantiation goes through a variable: its commas would split the macro).
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

#include "../noise.h"
#include "../philox.h"  // FASTNOISE_HD

#if defined(FASTNOISE_CUDA_EMU)
#define FASTNOISE_LAUNCH(kernel, grid, block, stream, ...) \
  ::fastnoise_emu::launch((grid), (block), (kernel), __VA_ARGS__)
#else
#include <cuda_runtime.h>

#define FASTNOISE_CUDA_CHECK(expr)                                                       \
  do {                                                                                   \
    const cudaError_t fastnoise_err_ = (expr);                                           \
    TORCH_CHECK(fastnoise_err_ == cudaSuccess, "fastnoise CUDA error: ",                 \
                cudaGetErrorString(fastnoise_err_), " (", #expr, ")");                   \
  } while (0)

#define FASTNOISE_LAUNCH(kernel, grid, block, stream, ...)      \
  do {                                                          \
    (kernel)<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__);    \
    FASTNOISE_CUDA_CHECK(cudaGetLastError());                   \
  } while (0)
#endif

namespace fastnoise {
namespace cuda {

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

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// C1: a token id outside [0, V). Any one bad id wins error[1]; error[0] = 1 is written last,
// so a reader that sees the flag also sees the id and V. Not inlined: the rare path takes no
// registers from the forward kernels' loops.
__device__ __noinline__ void record_bad_id(int64_t* error, int64_t id, int64_t V) {
  auto* e = reinterpret_cast<unsigned long long*>(error);
  atomicExch(e + 1, static_cast<unsigned long long>(id));
  atomicExch(e + 2, static_cast<unsigned long long>(V));
  __threadfence();
  atomicExch(e, 1ull);
}

}  // namespace cuda
}  // namespace fastnoise
