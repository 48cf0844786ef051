// AVX2 hot loops of noise_fill.h, for CPUs without AVX-512: the code of noise_avx512.cpp
// on 8 lanes (Philox on 8 counters per vector, the same transforms, the same Cephes
// log/sin/cos). Compiled for AVX2 through `#pragma GCC target` after every header; run only
// where the CPU has AVX2 (cpu_kernels() in noise_fill.cpp). No FMA: each float operation is
// rounded once, as in noise.h, so uniform, +-1 and u are bit for bit the portable ones.
#include "noise_fill.h"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC only (`#pragma GCC target`); elsewhere these kernels are left out (null)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTNOISE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastnoise {
namespace cpu {
namespace {

struct Words8 {
  __m256i w[4];  // word k of counters base .. base + 7, lane l = counter base + l
};

inline __m256i set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// One Philox round on 4 counters held in the low 32 bits of 64-bit lanes: _mm256_mul_epu32
// reads only those, so the upper halves may hold anything, and one multiply gives both
// words (lo = the product's low half, hi = its high half).
inline void philox_round4(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i k0,
                          __m256i k1) {
  const __m256i prod_b = _mm256_mul_epu32(c2, _mm256_set1_epi64x(kPhiloxRoundB));
  const __m256i prod_a = _mm256_mul_epu32(c0, _mm256_set1_epi64x(kPhiloxRoundA));
  c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), c3), k1);
  c1 = prod_b;
  c3 = prod_a;
}

// The low 32-bit halves of a's 4 lanes, then b's.
inline __m256i pack_low(__m256i a, __m256i b) {
  const __m256 ab = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b),
                                      _MM_SHUFFLE(2, 0, 2, 0));  // a0 a1 b0 b1 | a2 a3 b2 b3
  return _mm256_permute4x64_epi64(_mm256_castps_si256(ab), _MM_SHUFFLE(3, 1, 2, 0));
}

// philox4x32_10 (philox.h) of the 8 counters base .. base + 7 (64-bit, wrapping): two
// sets of 4 (counters base + l and base + 4 + l in 64-bit lane l), packed at the end.
inline Words8 philox8(uint64_t base, uint64_t seed) {
  const __m256i ctr_a = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(base)),
                                         _mm256_setr_epi64x(0, 1, 2, 3));
  const __m256i ctr_b = _mm256_add_epi64(ctr_a, _mm256_set1_epi64x(4));
  __m256i a0 = ctr_a, a1 = _mm256_srli_epi64(ctr_a, 32);
  __m256i b0 = ctr_b, b1 = _mm256_srli_epi64(ctr_b, 32);
  __m256i a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
  __m256i b2 = _mm256_setzero_si256(), b3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i vk0 = _mm256_set1_epi64x(k0), vk1 = _mm256_set1_epi64x(k1);
    philox_round4(a0, a1, a2, a3, vk0, vk1);
    philox_round4(b0, b1, b2, b3, vk0, vk1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Words8{{pack_low(a0, b0), pack_low(a1, b1), pack_low(a2, b2), pack_low(a3, b3)}};
}

// Stores x0..x3 (value k of counter l in lane l of xk) as 32 consecutive floats in the
// reference's order: out[4 * l + k] = xk[l].
inline void store_interleaved(float* out, __m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  const __m256 t0 = _mm256_unpacklo_ps(x0, x1);  // (x0, x1) of lanes 0, 1 | 4, 5
  const __m256 t1 = _mm256_unpackhi_ps(x0, x1);  // lanes 2, 3 | 6, 7
  const __m256 t2 = _mm256_unpacklo_ps(x2, x3);
  const __m256 t3 = _mm256_unpackhi_ps(x2, x3);
  const __m256d u0 = _mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2));  // 0 | 4
  const __m256d u1 = _mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2));  // 1 | 5
  const __m256d u2 = _mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3));  // 2 | 6
  const __m256d u3 = _mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3));  // 3 | 7
  _mm256_storeu_ps(out, _mm256_castpd_ps(_mm256_permute2f128_pd(u0, u1, 0x20)));
  _mm256_storeu_ps(out + 8, _mm256_castpd_ps(_mm256_permute2f128_pd(u2, u3, 0x20)));
  _mm256_storeu_ps(out + 16, _mm256_castpd_ps(_mm256_permute2f128_pd(u0, u1, 0x31)));
  _mm256_storeu_ps(out + 24, _mm256_castpd_ps(_mm256_permute2f128_pd(u2, u3, 0x31)));
}

// uniform01 of noise.h: v = w < 2**31 ? w : ~w & 0x7FFFFFFF, float(v) * kUniformScale.
inline __m256 uniform01_8(__m256i w) {
  const __m256i v = _mm256_and_si256(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31)),
                                     set1(0x7FFFFFFFu));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(kUniformScale));
}

inline __m256 uniform_noise8(__m256i w) {
  return _mm256_sub_ps(_mm256_mul_ps(uniform01_8(w), _mm256_set1_ps(2.0f)),
                       _mm256_set1_ps(1.0f));
}

inline __m256 poly_step(__m256 acc, __m256 x, float c) {  // acc * x + c, two roundings
  return _mm256_add_ps(_mm256_mul_ps(acc, x), _mm256_set1_ps(c));
}

// Natural log for x in [1e-7, 1): Cephes logf (as log16 of noise_avx512.cpp).
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), set1(126));
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, set1(0x007FFFFFu)), set1(0x3F000000u)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // -1 where small
  const __m256 t = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)),
                                 _mm256_set1_ps(1.0f));
  const __m256 fe = _mm256_cvtepi32_ps(e);
  const __m256 z = _mm256_mul_ps(t, t);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = poly_step(y, t, -1.1514610310E-1f);
  y = poly_step(y, t, 1.1676998740E-1f);
  y = poly_step(y, t, -1.2420140846E-1f);
  y = poly_step(y, t, 1.4249322787E-1f);
  y = poly_step(y, t, -1.6668057665E-1f);
  y = poly_step(y, t, 2.0000714765E-1f);
  y = poly_step(y, t, -2.4999993993E-1f);
  y = poly_step(y, t, 3.3333331174E-1f);
  y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
  y = _mm256_add_ps(y, _mm256_mul_ps(fe, _mm256_set1_ps(-2.12194440e-4f)));
  y = _mm256_sub_ps(y, _mm256_mul_ps(z, _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_add_ps(t, y);
  return _mm256_add_ps(r, _mm256_mul_ps(fe, _mm256_set1_ps(0.693359375f)));
}

// sin and cos of x in [0, 2*pi]: Cephes sinf/cosf (as sincos16 of noise_avx512.cpp).
inline void sincos8(__m256 x, __m256& s, __m256& c) {
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f)));
  j = _mm256_and_si256(_mm256_add_epi32(j, set1(1)), set1(~1u));
  const __m256 y = _mm256_cvtepi32_ps(j);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(y, _mm256_set1_ps(0.78515625f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(y, _mm256_set1_ps(2.4187564849853515625e-4f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(y, _mm256_set1_ps(3.77489497744594108e-8f)));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 ps = _mm256_set1_ps(-1.9515295891E-4f);
  ps = poly_step(ps, z, 8.3321608736E-3f);
  ps = poly_step(ps, z, -1.6666654611E-1f);
  ps = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(ps, z), r), r);  // sin(r)
  __m256 pc = _mm256_set1_ps(2.443315711809948E-5f);
  pc = poly_step(pc, z, -1.388731625493765E-3f);
  pc = poly_step(pc, z, 4.166664568298827E-2f);
  pc = _mm256_mul_ps(_mm256_mul_ps(pc, z), z);
  pc = _mm256_sub_ps(pc, _mm256_mul_ps(z, _mm256_set1_ps(0.5f)));
  pc = _mm256_add_ps(pc, _mm256_set1_ps(1.0f));  // cos(r)
  // q = j / 2 mod 4: sin x = (sin r, cos r, -sin r, -cos r)[q], cos x = (cos r, -sin r,
  // -cos r, sin r)[q]
  const __m256i q = _mm256_srli_epi32(j, 1);
  const __m256 swap = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(q, set1(1)), set1(1)));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(q, 1), 31));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_srli_epi32(_mm256_add_epi32(q, set1(1)), 1), 31));
  s = _mm256_xor_ps(_mm256_blendv_ps(ps, pc, swap), sin_sign);
  c = _mm256_xor_ps(_mm256_blendv_ps(pc, ps, swap), cos_sign);
}

inline void box_muller8(__m256i wa, __m256i wb, __m256& xa, __m256& xb) {
  const __m256 ua = _mm256_max_ps(uniform01_8(wa), _mm256_set1_ps(kGaussianMinU));
  const __m256 th = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), uniform01_8(wb));
  const __m256 rad = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(ua)));
  __m256 s, c;
  sincos8(th, s, c);
  xa = _mm256_mul_ps(rad, c);
  xb = _mm256_mul_ps(rad, s);
}

void fill_noise_avx2(int kind, uint64_t first_counter, int64_t count, uint64_t seed, float m,
                     float* out) {
  const __m256 vm = _mm256_set1_ps(m);
  if (kind == kFillBernoulli) {
    const __m256 neg_m = _mm256_set1_ps(-m);
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const int64_t counters = (count + 127) / 128;
    alignas(32) uint32_t words[32];
    for (int64_t g0 = 0; g0 < counters; g0 += 8) {
      const Words8 r = philox8(first_counter + static_cast<uint64_t>(g0), seed);
      store_interleaved(reinterpret_cast<float*>(words), _mm256_castsi256_ps(r.w[0]),
                        _mm256_castsi256_ps(r.w[1]), _mm256_castsi256_ps(r.w[2]),
                        _mm256_castsi256_ps(r.w[3]));
      const int64_t begin = 128 * g0, end = std::min<int64_t>(count, begin + 1024);
      for (int64_t j = begin; j < end; j += 8) {
        // lane b: bit (j + b) % 32 of word (j + b) / 32; set = -m
        const uint32_t byte = (words[(j - begin) >> 5] >> (j & 31)) & 0xFFu;
        const __m256i hit = _mm256_cmpeq_epi32(
            _mm256_and_si256(set1(byte), lane_bit), lane_bit);
        _mm256_storeu_ps(out + j, _mm256_blendv_ps(vm, neg_m, _mm256_castsi256_ps(hit)));
      }
    }
    return;
  }
  const int64_t counters = (count + 3) / 4;
  for (int64_t g0 = 0; g0 < counters; g0 += 8) {
    const Words8 r = philox8(first_counter + static_cast<uint64_t>(g0), seed);
    __m256 x[4];
    if (kind == kFillGaussian) {
      box_muller8(r.w[0], r.w[1], x[0], x[1]);
      box_muller8(r.w[2], r.w[3], x[2], x[3]);
      for (int k = 0; k < 4; ++k) x[k] = _mm256_mul_ps(x[k], vm);
    } else if (kind == kFillUniform01) {
      for (int k = 0; k < 4; ++k) x[k] = uniform01_8(r.w[k]);
    } else {
      for (int k = 0; k < 4; ++k) x[k] = _mm256_mul_ps(uniform_noise8(r.w[k]), vm);
    }
    store_interleaved(out + 4 * g0, x[0], x[1], x[2], x[3]);
  }
}

void noisy_row_f32_avx2(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                        float m, const float* e, float* o, float* o2, float* scratch) {
  fill_noise_avx2(kind, first_counter, count, seed, m, scratch);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 ev = _mm256_loadu_ps(e + j);
    const __m256 nv = _mm256_loadu_ps(scratch + j);
    _mm256_storeu_ps(o + j, _mm256_add_ps(ev, nv));
    if (o2 != nullptr) _mm256_storeu_ps(o2 + j, _mm256_sub_ps(ev, nv));
  }
  for (; j < count; ++j) {
    o[j] = e[j] + scratch[j];
    if (o2 != nullptr) o2[j] = e[j] - scratch[j];
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // GCC on x86-64

namespace fastnoise {
namespace cpu {
#if defined(FASTNOISE_AVX2)
const FillNoiseFn kFillNoiseAvx2 = fill_noise_avx2;
const NoisyRowF32Fn kNoisyRowF32Avx2 = noisy_row_f32_avx2;
#else
const FillNoiseFn kFillNoiseAvx2 = nullptr;
const NoisyRowF32Fn kNoisyRowF32Avx2 = nullptr;
#endif
}  // namespace cpu
}  // namespace fastnoise
