// Philox words -> noise values, shared host/device. See fastnoise/reference.py.
// Every float operation is rounded once: on the device through __fmul_rn/__fadd_rn (nvcc
// never contracts those into an FMA), on the host the build passes -ffp-contract=off.
// FASTNOISE_DEVICE_MATH: the device's code path, also taken by the host emulator of the CUDA
// kernels (tests/cuda_emu, which implements __fmul_rn & co. for the host).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "philox.h"

#if defined(__CUDA_ARCH__) || defined(FASTNOISE_CUDA_EMU)
#define FASTNOISE_DEVICE_MATH 1
#else
#define FASTNOISE_DEVICE_MATH 0
#endif

namespace fastnoise {

enum NoiseKind : int { kUniform = 0, kGaussian = 1, kBernoulli = 2 };

constexpr float kUniformScale = 4.6566127342e-10f;  // (2**31 - 1) * scale < 1
constexpr float kGaussianMinU = 1e-7f;
constexpr float kTwoPi = 6.283185307179586f;

FASTNOISE_HD float mul_rn(float a, float b) {
#if FASTNOISE_DEVICE_MATH
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FASTNOISE_HD float add_rn(float a, float b) {
#if FASTNOISE_DEVICE_MATH
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FASTNOISE_HD float sub_rn(float a, float b) {
#if FASTNOISE_DEVICE_MATH
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

FASTNOISE_HD double add_rn(double a, double b) {
#if FASTNOISE_DEVICE_MATH
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

FASTNOISE_HD double sub_rn(double a, double b) {
#if FASTNOISE_DEVICE_MATH
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

FASTNOISE_HD double mul_rn(double a, double b) {
#if FASTNOISE_DEVICE_MATH
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// The type e + n is computed in: float32, but float64 for float64 weights (the contract).
template <typename T>
struct AddType {
  using type = float;
};
template <>
struct AddType<double> {
  using type = double;
};

// A scaled embedding (Gemma's embed_scale): the row element x (already in the add type A)
// times s (embed_scale in A), rounded once to the weight dtype T, back in A. The noise is
// added to this value. Only the HAS_SCALE instantiations of the kernels call it.
template <typename T, typename A>
FASTNOISE_HD A scale_embedding(A x, A s) {
  return static_cast<A>(static_cast<T>(mul_rn(x, s)));
}

// Triton's uint_to_uniform_float: [0, 1).
FASTNOISE_HD float uniform01(uint32_t w) {
  const uint32_t v = w < 0x80000000u ? w : (~w & 0x7FFFFFFFu);
  // v < 2**31: signed int -> float, round to nearest (both host and device).
  return mul_rn(static_cast<float>(static_cast<int32_t>(v)), kUniformScale);
}

// Uniform noise in (-1, 1): u * 2 - 1 (u * 2 is exact, so one rounding).
FASTNOISE_HD float uniform_noise(uint32_t w) {
  return sub_rn(mul_rn(uniform01(w), 2.0f), 1.0f);
}

// Box-Muller on (wa, wb) -> (xa, xb), Triton's randn4x op order.
FASTNOISE_HD void box_muller(uint32_t wa, uint32_t wb, float& xa, float& xb) {
  float ua = uniform01(wa);
  ua = ua < kGaussianMinU ? kGaussianMinU : ua;
  const float th = mul_rn(kTwoPi, uniform01(wb));
  const float rad = sqrtf(mul_rn(-2.0f, logf(ua)));
  float s, c;
#if FASTNOISE_DEVICE_MATH
  sincosf(th, &s, &c);
#else
  s = sinf(th);
  c = cosf(th);
#endif
  xa = mul_rn(rad, c);
  xb = mul_rn(rad, s);
}

// The 4 unscaled noise values of one counter's words, uniform or gaussian.
FASTNOISE_HD void words_to_noise4(const Words4& r, int kind, float xi[4]) {
  if (kind == kGaussian) {
    box_muller(r.w[0], r.w[1], xi[0], xi[1]);
    box_muller(r.w[2], r.w[3], xi[2], xi[3]);
  } else {
    xi[0] = uniform_noise(r.w[0]);
    xi[1] = uniform_noise(r.w[1]);
    xi[2] = uniform_noise(r.w[2]);
    xi[3] = uniform_noise(r.w[3]);
  }
}

// Bernoulli +-1 from one bit: bit 0 -> +1, bit 1 -> -1.
FASTNOISE_HD float sign_noise(uint32_t word, int bit) {
  return ((word >> bit) & 1u) ? -1.0f : 1.0f;
}

// NoisyTune: (u - 0.5) * s, each op rounded once; float32 for fp32 / fp16 / bf16 tensors.
FASTNOISE_HD float noisytune_delta(uint32_t w, float s) {
  return mul_rn(sub_rn(uniform01(w), 0.5f), s);
}

// NoisyTune on float64 tensors: (double(u) - 0.5) * s in float64 (contract C2).
FASTNOISE_HD double noisytune_delta(uint32_t w, double s) {
  return mul_rn(sub_rn(static_cast<double>(uniform01(w)), 0.5), s);
}

// NoisyTune's scale s from std64 (contract C2): float32(float32(lam) * float32(std64)) for
// fp32 / fp16 / bf16 tensors, lam * std64 in float64 for float64 tensors; NaN when s is zero
// or not finite (the tensor stays unchanged).
FASTNOISE_HD double noisytune_scale(double lam, double std64, bool float64_tensor) {
  const double s = float64_tensor
                       ? mul_rn(lam, std64)
                       : static_cast<double>(
                             mul_rn(static_cast<float>(lam), static_cast<float>(std64)));
  const bool finite_nonzero = s - s == 0.0 && s != 0.0;  // s - s: NaN for inf and NaN
  return finite_nonzero ? s : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace fastnoise
