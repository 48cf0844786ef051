// The portable hot loops of noise_fill.h and the run-time pick of the instruction set.
#include "noise_fill.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace fastnoise {
namespace cpu {

void fill_noise_portable(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                         float m, float* out) {
  if (kind == kFillBernoulli) {
    const int64_t counters = (count + 127) / 128;
    for (int64_t g = 0; g < counters; ++g) {
      const Words4 r = philox4x32_10(first_counter + static_cast<uint64_t>(g), seed);
      const int64_t end = std::min<int64_t>(count, 128 * (g + 1));
      for (int64_t j = 128 * g; j < end; ++j) {
        // sign_noise of noise.h without a branch (random bits mispredict): exactly +-1
        const uint32_t bit = (r.w[(j >> 5) & 3] >> (j & 31)) & 1u;
        out[j] = (1.0f - 2.0f * static_cast<float>(bit)) * m;
      }
    }
    return;
  }
  const int64_t counters = (count + 3) / 4;
  for (int64_t g = 0; g < counters; ++g) {
    const Words4 r = philox4x32_10(first_counter + static_cast<uint64_t>(g), seed);
    float* x = out + 4 * g;
    if (kind == kFillUniform01) {
      for (int k = 0; k < 4; ++k) x[k] = uniform01(r.w[k]);
    } else {
      words_to_noise4(r, kind, x);
      for (int k = 0; k < 4; ++k) x[k] = x[k] * m;
    }
  }
}

void noisy_row_f32_portable(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                            float m, const float* e, float* o, float* o2, float* scratch) {
  fill_noise_portable(kind, first_counter, count, seed, m, scratch);
  for (int64_t j = 0; j < count; ++j) o[j] = e[j] + scratch[j];
  if (o2 != nullptr) {
    for (int64_t j = 0; j < count; ++j) o2[j] = e[j] - scratch[j];
  }
}

namespace {

bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

CpuKernels pick_kernels() {
  // FASTNOISE_CPU_ISA caps the pick: "portable", "avx2" (or anything else: no cap)
  const char* cap = std::getenv("FASTNOISE_CPU_ISA");
  const bool portable_only = cap != nullptr && std::strcmp(cap, "portable") == 0;
  const bool avx2_at_most = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (!portable_only && !avx2_at_most && kFillNoiseAvx512 != nullptr && cpu_has_avx512()) {
    return CpuKernels{"avx512", kFillNoiseAvx512, kNoisyRowF32Avx512};
  }
  if (!portable_only && kFillNoiseAvx2 != nullptr && cpu_has_avx2()) {
    return CpuKernels{"avx2", kFillNoiseAvx2, kNoisyRowF32Avx2};
  }
  return CpuKernels{"portable", fill_noise_portable, noisy_row_f32_portable};
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels kernels = pick_kernels();
  return kernels;
}

}  // namespace cpu
}  // namespace fastnoise
