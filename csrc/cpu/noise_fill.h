// CPU-only: the hot loops of the CPU kernels (Philox words -> noise values, and float32 rows
// e + n / e - n), with one implementation per instruction set picked at run time, the
// best the running CPU has: AVX-512 (noise_avx512.cpp), AVX2 (noise_avx2.cpp), each compiled
// for its ISA through `#pragma GCC target`, or portable C++ (noise_fill.cpp). All give the
// values of noise.h: uniform, +-1 and NoisyTune's u bit for bit, gaussian within ~1 ulp (own
// vectorized log/sin/cos). FASTNOISE_CPU_ISA=avx2 or =portable (read once per process) caps
// the pick, for tests and comparisons.
#pragma once

#include <cstdint>

#include "../noise.h"

namespace fastnoise {
namespace cpu {

// What fill_noise writes: the noise kinds of noise.h, times m, or NoisyTune's raw u.
enum FillKind : int {
  kFillUniform = kUniform,      // uniform_noise(w) * m
  kFillGaussian = kGaussian,    // box_muller(...) * m
  kFillBernoulli = kBernoulli,  // sign_noise(...) * m (exactly +-m)
  kFillUniform01 = 3,           // uniform01(w) (NoisyTune's u; m unused)
};

// The values of elements 0 .. count-1 of a run of counters starting at `first_counter`
// (4 elements per counter; 128 for kFillBernoulli), laid out as in the reference: element j
// comes from word j % 4 of counter j / 4 (bernoulli: bit j % 32 of word j / 32).
// `out` must hold fill_buffer_len(count) floats (the vector code writes whole vectors).
using FillNoiseFn = void (*)(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                             float m, float* out);

// A float32 row without embed_scale: o[j] = e[j] + n[j] and, when o2 is not null,
// o2[j] = e[j] - n[j], j < count, n = fill_noise's values. `scratch` holds
// fill_buffer_len(count) floats (the AVX-512 code adds from registers and leaves it alone).
using NoisyRowF32Fn = void (*)(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                               float m, const float* e, float* o, float* o2, float* scratch);

inline int64_t fill_buffer_len(int64_t count) { return (count + 63) / 64 * 64; }

struct CpuKernels {
  const char* isa;  // "avx512", "avx2" or "portable"
  FillNoiseFn fill_noise;
  NoisyRowF32Fn noisy_row_f32;
};

// The kernels for this CPU (decided once per process).
const CpuKernels& cpu_kernels();

// The portable implementations (noise_fill.cpp) and, when compiled in, the AVX-512 and AVX2
// ones (null where the compiler cannot target them).
void fill_noise_portable(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                         float m, float* out);
void noisy_row_f32_portable(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                            float m, const float* e, float* o, float* o2, float* scratch);
extern const FillNoiseFn kFillNoiseAvx512;
extern const NoisyRowF32Fn kNoisyRowF32Avx512;
extern const FillNoiseFn kFillNoiseAvx2;
extern const NoisyRowF32Fn kNoisyRowF32Avx2;

}  // namespace cpu
}  // namespace fastnoise
